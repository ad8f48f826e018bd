#!/bin/bash
# The ollama-like demo: a server whose GPU helper processes lose LD_PRELOAD, first without and then
# with vgpu-launch.
#
#   examples/ollama-like/demo.sh
#
# On a Debian/Ubuntu machine, run as root, it installs what is missing with apt-get (gcc, golang-go,
# python3 and the launcher's Python packages: Debian's, for /usr/bin/python3, whatever python3
# comes first in PATH), builds the example into .cache/demo in the checkout, then runs
# "ollama serve --once" twice:
#   (a) with LD_PRELOAD=libvgpu-test-shim.so set for the server only: its runners report 0 devices;
#   (b) under bin/vgpu-launch: the preload reaches every runner, which reports 1 device, and the
#       launcher's decision log shows one "injected" exec event per runner.
# Each command is shown as it is run, from the top of the checkout. Exits 0 when (b) finds 1 device.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${VGPU_DEMO_CACHE:-$repo/.cache/demo}
cd "$repo"

bold=""
plain=""
if [ -t 1 ]; then
    bold=$(printf '\033[1m')
    plain=$(printf '\033[0m')
fi
heading() {
    printf '\n%s==== %s ====%s\n' "$bold" "$*" "$plain"
}
indent() {
    sed 's/^/    /'
}
# show ARGV...: the command line exactly as it is run, from the top of the checkout
show() {
    local line='$'
    line+=$(printf ' %q' "$@")
    echo "$line"
}

# ---- 1. what the demo needs ----
# vgpu-launch's Python packages are Debian's, for /usr/bin/python3 (which bin/vgpu-launch prefers
# to PATH's python3), so dpkg is asked, not whichever python3 comes first in PATH.
missing=()
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
[ -e /usr/include/stdio.h ] || missing+=(libc6-dev)
command -v go >/dev/null 2>&1 || missing+=(golang-go)
if [ -z "${VGPU_LAUNCH_PYTHON:-}" ] && command -v dpkg-query >/dev/null 2>&1; then
    for p in python3 python3-ptrace python3-prctl python3-structlog; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
fi
if [ ${#missing[@]} -gt 0 ]; then
    heading "Installing: ${missing[*]}"
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "demo.sh: missing ${missing[*]}; install them (Debian/Ubuntu:" \
            "apt-get install ${missing[*]}) or run this script as root" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# bin/vgpu-launch says itself, in one line, when no interpreter it would use has its packages.
if ! version=$(bin/vgpu-launch --version 2>&1); then
    echo "$version" >&2
    echo "demo.sh: bin/vgpu-launch cannot run here; see the line above" >&2
    exit 1
fi
# The decision log is formatted with the interpreter vgpu-launch itself prefers (stdlib only).
python=${VGPU_LAUNCH_PYTHON:-/usr/bin/python3}

# ---- 2. build ----
heading "Building the example into ${cache#"$repo"/}"
"$here/build.sh" "$cache"
ollama=$cache/ollama
case $ollama in "$repo"/*) ollama=${ollama#"$repo"/} ;; esac  # shorter to show; we run from $repo
shim=$cache/libvgpu-test-shim.so  # absolute: a preload path must be
ls -l "$ollama" "$cache/libcuda.so.1" "$shim" | indent

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

count_of() {
    sed -n 's/^initial_count=\([0-9-]*\)$/\1/p' "$1" | tail -n 1
}

# ---- 3. without vgpu-launch ----
heading "(a) without vgpu-launch: LD_PRELOAD set for 'ollama serve' only"
run_a=(env "LD_PRELOAD=$shim" VGPU_TEST_DEVICES=1 "$ollama" serve --once)
show "${run_a[@]}"
rc_a=0
"${run_a[@]}" 2>"$work/a.err" || rc_a=$?
indent <"$work/a.err"
count_a=$(count_of "$work/a.err")
echo "exit status $rc_a"

# ---- 4. with vgpu-launch ----
heading "(b) with vgpu-launch"
run_b=(bin/vgpu-launch --log-format json --preload "$shim" --env VGPU_TEST_DEVICES=1
    -- "$ollama" serve --once)
show "${run_b[@]}"
rc_b=0
"${run_b[@]}" 2>"$work/b.err" || rc_b=$?
# stderr holds vgpu-launch's JSON lines and ollama's own lines; without vgpu-launch's "start"
# event it never started ollama, and without its "end" event it did not see ollama to the end:
# then the other lines are not (only) ollama's.
events() { grep -c "^{.*\"event\": *\"$1\"" "$work/b.err" || true; }
started=$(events start)
if [ "$started" = 0 ]; then
    echo "vgpu-launch did not start ollama; its output:"
elif [ "$(events end)" = 0 ]; then
    echo "output of ollama and of vgpu-launch, which did not finish normally (its JSON lines left out):"
else
    echo "ollama's own output (stderr, the launcher's JSON lines left out):"
fi
grep -v '^{' "$work/b.err" | indent || true
count_b=$(count_of "$work/b.err")
echo "exit status $rc_b"

heading "(b) decision log of vgpu-launch (its JSON lines on stderr, formatted)"
"$python" -I - "$work/b.err" <<'PY'
import json
import sys

injected = 0
for line in open(sys.argv[1], encoding="utf-8", errors="replace"):
    line = line.strip()
    if not line.startswith("{"):
        continue
    try:
        ev = json.loads(line)
    except ValueError:
        continue
    kind = ev.get("event")
    if kind == "exec":
        argv = " ".join(str(a) for a in ev.get("argv") or [])
        static = "  (static)" if ev.get("static") else ""
        print(f"    exec pid={ev.get('pid')} ppid={ev.get('ppid')}  {ev.get('decision', '?'):<9} {argv}{static}")
        print(f"         LD_PRELOAD before: {ev.get('preload_before') or '(unset)'}")
        print(f"         LD_PRELOAD after:  {ev.get('preload_after') or '(unset)'}")
        if ev.get("env_set"):
            print(f"         variables put back: {', '.join(ev['env_set'])}")
        if ev.get("decision") == "injected" and "runner" in (ev.get("argv") or []):
            injected += 1
    elif kind == "start":
        print(f"    start: cmd={' '.join(ev.get('cmd') or [])}")
        print(f"           preload={ev.get('preload')} env={ev.get('env')}")
    elif kind == "end":
        print(f"    end:   counts={json.dumps(ev.get('counts'))} cmd_exit={ev.get('cmd_exit')}")
print(f"    -> {injected} runner(s) got the preload put back ('injected')")
PY

# ---- 5. summary ----
heading "Result"
printf '    %-48s %s\n' "" "initial_count (GPUs found at start-up)"
printf '    %-48s %s\n' "(a) LD_PRELOAD=shim ollama serve" "${count_a:-?}"
printf '    %-48s %s\n' "(b) vgpu-launch --preload shim -- ollama serve" "${count_b:-?}"
if [ "${count_b:-}" = 1 ]; then
    echo
    echo "    Without vgpu-launch the runners lost the shim and found no GPU;"
    echo "    with it every runner loaded the shim and found 1."
    exit 0
fi
echo
if [ "$started" = 0 ]; then
    echo "demo.sh: vgpu-launch failed (exit status $rc_b) before it started ollama: see (b)" >&2
else
    echo "demo.sh: expected initial_count=1 under vgpu-launch, got '${count_b:-nothing}'" >&2
fi
exit 1
