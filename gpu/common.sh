# Sourced by gpu/run.sh and gpu/hami.sh (bash): the interpreter of the worker and of vgpu-launch,
# and the helpers that print the run. Expects $repo and $me (the script's name, for messages).

PYTHON=$(command -v "${PYTHON:-python3}")
launch=$repo/bin/vgpu-launch
# bin/vgpu-launch picks an interpreter with its packages itself; failing that, the worker's one.
if ! launch_version=$("$launch" --version 2>&1); then
    if [ -z "${VGPU_LAUNCH_PYTHON:-}" ] &&
        launch_version=$(VGPU_LAUNCH_PYTHON=$PYTHON "$launch" --version 2>&1); then
        export VGPU_LAUNCH_PYTHON=$PYTHON
    else
        echo "$launch_version" >&2
        echo "$me: vgpu-launch cannot run here (see the line above); install what it names" \
            "or set VGPU_LAUNCH_PYTHON to a python3 that has python-ptrace, python-prctl and" \
            "structlog" >&2
        exit 1
    fi
fi

heading() { printf '\n==== %s ====\n' "$*"; }
show() { printf '$ %s\n' "$*"; }
indent() { sed 's/^/    /'; }

# exec_decisions FILE: the exec and verify events of vgpu-launch's JSON log FILE, and its end.
exec_decisions() {
    echo "vgpu-launch's exec decisions:"
    "$PYTHON" - "$1" <<'EOF' | indent
import json, sys
for line in open(sys.argv[1], errors="replace"):
    if not line.startswith("{"):
        continue
    e = json.loads(line)
    if e.get("event") in ("exec", "verify"):
        keep = ("event", "pid", "ppid", "exe", "decision", "preload_before", "preload_after",
                "env_set", "elapsed_us", "mapped", "result", "status")
        print(json.dumps({k: e[k] for k in keep if k in e}))
    elif e.get("event") == "end":
        print(json.dumps({k: e.get(k) for k in ("event", "counts", "spawned", "cmd_exit")}))
EOF
}
