#!/bin/bash
# vgpu-launch on a real GPU with the real NVIDIA driver (not part of CI: CI has no GPU).
#
#   gpu/run.sh [--runs N] [--seconds S] [--size N] [--devices N] [--no-overhead]
#              [--results DIR] [--backend torch|stub] [--dry-run]
#
# Needs: an NVIDIA GPU and driver, gcc, a python3 with PyTorch (CUDA build) for the worker
# (PYTHON, default python3 from PATH), and vgpu-launch's own Python packages (python-ptrace,
# python-prctl, structlog) for the python3 that bin/vgpu-launch picks (docs/install.md, "From a
# checkout"), or for VGPU_LAUNCH_PYTHON, or else for the worker's PYTHON.
#
# 1. builds gpu/cuda-count-shim.c into .cache/gpu/libcuda-count-shim.so;
# 2. (a) without vgpu-launch: LD_PRELOAD=shim python3 gpu/parent.py. The parent's own
#        cuDeviceGetCount goes through the shim; the worker, started with an environment rebuilt
#        without LD_PRELOAD, bypasses it: no shim line from the worker's pid;
#    (b) under vgpu-launch: bin/vgpu-launch --preload shim --env VGPU_SHIM_DEVICES=N -- python3
#        gpu/parent.py. The worker's CUDA runtime (cudaGetDeviceCount) goes through the shim.
#        While the worker holds the GPU, `bin/vgpu-launch status PID` (where this checkout has
#        it) and /proc/PID/maps show which processes have the shim mapped;
#    (b0) the same with VGPU_SHIM_DEVICES=0: the worker's CUDA runtime sees the shim's 0 devices;
# 3. (c) overhead: the worker's matmul throughput started directly with the shim preloaded
#        (LD_PRELOAD=shim python3 gpu/worker.py) against the whole tree under vgpu-launch,
#        alternating, N runs each; medians, ratio, and a Markdown table.
# --backend stub checks the scripts on a machine without a GPU (see gpu/worker.py).
# --dry-run (what CI runs): builds the shim, checks the Python scripts and the launcher, prints
# the commands of every step, then does the same for gpu/hami.sh (HAMi-core's memory limit);
# nothing runs on a GPU.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
runs=5
seconds=10
size=8192
devices=""
overhead=1
backend=torch
dry=0
build=${GPU_BUILD_DIR:-$repo/.cache/gpu}
results=""
while [ $# -gt 0 ]; do
    case $1 in
    --runs) runs=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --devices) devices=$2; shift 2 ;;
    --no-overhead) overhead=0; shift ;;
    --results) results=$2; shift 2 ;;
    --backend) backend=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
results=${results:-$build/results}

me=run.sh
# shellcheck source=gpu/common.sh
source "$repo/gpu/common.sh"
shim=$build/libcuda-count-shim.so
worker_args=(--size "$size" --backend "$backend")

json_field() { # json_field FILE KEY: KEY of the last JSON line in FILE
    "$PYTHON" - "$1" "$2" <<'EOF'
import json, sys
lines = [l for l in open(sys.argv[1]) if l.startswith("{")]
v = json.loads(lines[-1]).get(sys.argv[2]) if lines else None
print("" if v is None else v)
EOF
}

if [ "$dry" = 1 ]; then
    heading "dry run: nothing is run on a GPU"
    mkdir -p "$build"
    show gcc -O2 -Wall -shared -fPIC -o "$shim" gpu/cuda-count-shim.c -ldl -lpthread
    gcc -O2 -Wall -Werror -shared -fPIC -o "$shim" "$here/cuda-count-shim.c" -ldl -lpthread
    "$PYTHON" -m py_compile "$here/parent.py" "$here/worker.py"
    "$PYTHON" "$here/worker.py" --help >/dev/null
    echo "$launch_version"
    devices=${devices:-1}
    show LD_PRELOAD="$shim" python3 gpu/parent.py --seconds 2 "${worker_args[@]}"
    show bin/vgpu-launch --preload "$shim" --env VGPU_SHIM_DEVICES="$devices" -- python3 gpu/parent.py --seconds 2 "${worker_args[@]}"
    show bin/vgpu-launch status --preload "$shim" PARENT_PID
    show bin/vgpu-launch --preload "$shim" --env VGPU_SHIM_DEVICES=0 -- python3 gpu/parent.py --seconds 2 "${worker_args[@]}"
    show LD_PRELOAD="$shim" VGPU_SHIM_DEVICES="$devices" python3 gpu/worker.py --seconds "$seconds" "${worker_args[@]}"
    show bin/vgpu-launch --preload "$shim" --env VGPU_SHIM_DEVICES="$devices" -- python3 gpu/parent.py --no-probe --seconds "$seconds" "${worker_args[@]}"
    echo "($runs runs of each of the last two, alternating)"
    exec "$here/hami.sh" --dry-run
fi

# ---- what is here ----
heading "Machine"
if command -v nvidia-smi >/dev/null 2>&1; then
    gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)
else
    gpu="(no nvidia-smi)"
fi
echo "GPU, driver: $gpu" | indent
{
    echo "kernel: $(uname -r)"
    echo "gcc: $(gcc -dumpfullversion 2>/dev/null || echo missing)"
    echo "worker python: $PYTHON ($("$PYTHON" -c 'import sys; print(sys.version.split()[0])'))"
    if [ "$backend" = torch ]; then
        "$PYTHON" -c 'import torch; print("torch:", torch.__version__, "CUDA", torch.version.cuda)'
    fi
    echo "$launch_version"
    [ -z "${VGPU_LAUNCH_PYTHON:-}" ] || echo "VGPU_LAUNCH_PYTHON=$VGPU_LAUNCH_PYTHON"
} | indent

# ---- build ----
heading "Building the shim"
mkdir -p "$build"
chmod 755 "$build"
show gcc -O2 -Wall -shared -fPIC -o "$shim" gpu/cuda-count-shim.c -ldl -lpthread
gcc -O2 -Wall -shared -fPIC -o "$shim" "$here/cuda-count-shim.c" -ldl -lpthread
rm -rf "$results"
mkdir -p "$results"
work=$results

# pids of ROOT and of all its descendants, parents first
tree() {
    local root=$1 d s rest ppid pids=()
    declare -A kids=()
    for d in /proc/[0-9]*; do
        s=$(cat "$d/stat" 2>/dev/null) || continue
        rest=${s##*) }
        # shellcheck disable=SC2086
        set -- $rest
        ppid=$2
        kids[$ppid]="${kids[$ppid]:-} ${d#/proc/}"
    done
    pids=("$root")
    local i=0
    while [ $i -lt ${#pids[@]} ]; do
        for d in ${kids[${pids[$i]}]:-}; do pids+=("$d"); done
        i=$((i + 1))
    done
    echo "${pids[@]}"
}

shim_lines() { grep -a '^\[cuda-count-shim\]' "$1" || true; }

# ---- (a) ----
heading "(a) without vgpu-launch: LD_PRELOAD set for the parent only"
show LD_PRELOAD="$shim" python3 gpu/parent.py --seconds 2
LD_PRELOAD=$shim "$PYTHON" "$here/parent.py" --seconds 2 "${worker_args[@]}" \
    >"$work/a.out" 2>"$work/a.err" || { cat "$work/a.err"; exit 1; }
grep -a -v '^{' "$work/a.err" | indent
cat "$work/a.out" | indent
a_worker=$(json_field "$work/a.out" worker_pid)
a_parent=$(json_field "$work/a.out" parent_pid)
a_count=$(json_field "$work/a.out" device_count)
a_mapped=$(json_field "$work/a.out" shim_mapped)
a_worker_lines=$(grep -a -c "^\[cuda-count-shim\] pid=$a_worker " "$work/a.err" || true)
a_parent_lines=$(grep -a -c "^\[cuda-count-shim\] pid=$a_parent cuDeviceGetCount" "$work/a.err" || true)
echo "parent pid $a_parent: $a_parent_lines cuDeviceGetCount line(s) from the shim" \
    "| worker pid $a_worker: $a_worker_lines shim line(s), shim mapped: $a_mapped," \
    "CUDA runtime device count = $a_count (the driver's own answer)"
if [ -z "$devices" ]; then
    devices=$a_count
fi

# ---- (b) ----
heading "(b) under vgpu-launch"
show bin/vgpu-launch --preload "$shim" --env VGPU_SHIM_DEVICES="$devices" -- python3 gpu/parent.py --seconds 2
hold=$work/hold
rm -f "$hold"
"$launch" --preload "$shim" --env VGPU_SHIM_DEVICES="$devices" --log-format json -- \
    "$PYTHON" "$here/parent.py" --seconds 2 --hold-file "$hold" "${worker_args[@]}" \
    >"$work/b.out" 2>"$work/b.err" &
lpid=$!
for _ in $(seq 1200); do
    [ -e "$hold" ] && break
    kill -0 "$lpid" 2>/dev/null || break
    sleep 0.1
done
if [ ! -e "$hold" ]; then
    wait "$lpid" || true
    echo "run.sh: the worker never became ready under vgpu-launch" >&2
    cat "$work/b.err" >&2
    exit 1
fi
b_worker=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$hold")
b_parent=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["ppid"])' "$hold")
echo "while the worker (pid $b_worker) holds the GPU:"
show bin/vgpu-launch status --preload "$shim" "$b_parent"
status_rc=0
"$launch" status --preload "$shim" "$b_parent" >"$work/status.out" 2>&1 || status_rc=$?
if [ $status_rc -eq 0 ]; then
    indent <"$work/status.out"
else
    echo "    vgpu-launch status is not usable in this checkout (exit $status_rc):" \
        "$(grep -v '^ ' "$work/status.out" | tail -n 1)"
fi
echo "/proc/PID/maps of the tree (launcher pid $lpid; CMD is the parent, pid $b_parent):"
for pid in $(tree "$lpid"); do
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || echo '?')
    args=$(tr '\0\n' '  ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-70 || true)
    if ! maps=$(cat "/proc/$pid/maps" 2>/dev/null); then
        mapped="unreadable"
    elif grep -q "$shim" <<<"$maps"; then
        mapped="shim mapped"
    else
        mapped="NOT mapped"
    fi
    role=""
    [ "$pid" = "$lpid" ] && role="(vgpu-launch itself)"
    [ "$pid" = "$b_parent" ] && role="(parent)"
    [ "$pid" = "$b_worker" ] && role="(worker)"
    printf '    %-7s %-12s %-22s %s %s\n' "$pid" "$comm" "$role" "$mapped" "| $args"
done | tee "$work/maps.txt"
b_unmapped=$(grep -c -v -e 'shim mapped' -e 'vgpu-launch itself' "$work/maps.txt" || true)
rm -f "$hold"
wait "$lpid" || { echo "run.sh: (b) failed" >&2; cat "$work/b.err" >&2; exit 1; }
shim_lines "$work/b.err" | indent
cat "$work/b.out" | indent
exec_decisions "$work/b.err"
b_count=$(json_field "$work/b.out" device_count)
b_mapped=$(json_field "$work/b.out" shim_mapped)
b_worker_lines=$(grep -a -c "^\[cuda-count-shim\] pid=$b_worker cuDeviceGetCount" "$work/b.err" || true)
echo "worker pid $b_worker: $b_worker_lines cuDeviceGetCount line(s) from the shim," \
    "shim mapped: $b_mapped, CUDA runtime device count = $b_count (VGPU_SHIM_DEVICES=$devices);" \
    "processes of CMD's tree without the shim: $b_unmapped"

# ---- (b0) ----
heading "(b0) under vgpu-launch, VGPU_SHIM_DEVICES=0: the worker's answer is the shim's"
show bin/vgpu-launch --preload "$shim" --env VGPU_SHIM_DEVICES=0 -- python3 gpu/parent.py
"$launch" --preload "$shim" --env VGPU_SHIM_DEVICES=0 --log-format json -- \
    "$PYTHON" "$here/parent.py" --seconds 2 "${worker_args[@]}" \
    >"$work/b0.out" 2>"$work/b0.err" || { cat "$work/b0.err"; exit 1; }
shim_lines "$work/b0.err" | indent
cat "$work/b0.out" | indent
b0_count=$(json_field "$work/b0.out" device_count)
echo "worker: CUDA runtime device count = $b0_count" \
    "(NVML, which this shim does not interpose, still counts $(json_field "$work/b0.out" nvml_device_count))"

verdict_ok=1
[ "$a_worker_lines" = 0 ] && [ "$a_mapped" = False ] || verdict_ok=0
[ "$b_worker_lines" -ge 1 ] && [ "$b_mapped" = True ] && [ "$b_unmapped" = 0 ] || verdict_ok=0
[ "$b_count" = "$devices" ] && [ "$b0_count" = 0 ] || verdict_ok=0
heading "Before/after: $([ $verdict_ok = 1 ] && echo as expected || echo NOT as expected)"

# ---- (c) ----
if [ "$overhead" = 1 ] && [ "$devices" -ge 1 ]; then
    heading "(c) overhead: $runs runs each, ${seconds} s of ${size}x${size} matrix products per run"
    show LD_PRELOAD="$shim" VGPU_SHIM_DEVICES="$devices" python3 gpu/worker.py --seconds "$seconds" --size "$size"
    show bin/vgpu-launch --preload "$shim" --env VGPU_SHIM_DEVICES="$devices" -- python3 gpu/parent.py --no-probe --seconds "$seconds" --size "$size"
    for i in $(seq "$runs"); do
        if [ $((i % 2)) = 1 ]; then order="direct vgpu-launch"; else order="vgpu-launch direct"; fi
        for mode in $order; do
            t0=$(date +%s%N)
            if [ "$mode" = direct ]; then
                LD_PRELOAD=$shim VGPU_SHIM_DEVICES=$devices "$PYTHON" "$here/worker.py" \
                    --seconds "$seconds" "${worker_args[@]}" \
                    >"$work/c-$mode-$i.out" 2>"$work/c-$mode-$i.err"
            else
                "$launch" --preload "$shim" --env VGPU_SHIM_DEVICES="$devices" --log-format json -- \
                    "$PYTHON" "$here/parent.py" --no-probe --seconds "$seconds" "${worker_args[@]}" \
                    >"$work/c-$mode-$i.out" 2>"$work/c-$mode-$i.err"
            fi
            t1=$(date +%s%N)
            echo "{\"mode\": \"$mode\", \"run\": $i, \"wall_ms\": $(((t1 - t0) / 1000000))," \
                "\"worker\": $(grep '^{' "$work/c-$mode-$i.out" | tail -n 1)}" >>"$work/overhead.jsonl"
            printf '    run %d %-12s %s TFLOP/s\n' "$i" "$mode" "$(json_field "$work/c-$mode-$i.out" tflops)"
        done
    done
    "$PYTHON" - "$work/overhead.jsonl" "$gpu" "$size" "$seconds" <<'EOF' | tee "$work/overhead.md"
import json, statistics, sys
path, gpu, size, seconds = sys.argv[1:5]
rows = [json.loads(l) for l in open(path)]
modes = {"direct": "worker started directly, shim preloaded", "vgpu-launch": "whole tree under vgpu-launch"}
med = {}
print()
print(f"GPU, driver: {gpu}; bf16 {size}x{size} matrix products, {seconds} s per run\n")
print("| mode | runs | median TFLOP/s | min | max | spread | shim in worker | median worker start-up s | median wall s |")
print("|---|---|---|---|---|---|---|---|---|")
for mode, label in modes.items():
    r = [x for x in rows if x["mode"] == mode]
    t = [x["worker"]["tflops"] for x in r]
    med[mode] = statistics.median(t)
    spread = (max(t) - min(t)) / med[mode] * 100
    mapped = sum(1 for x in r if x["worker"].get("shim_mapped"))
    init = statistics.median(x["worker"]["init_s"] for x in r)
    wall = statistics.median(x["wall_ms"] for x in r) / 1000
    print(f"| {label} | {len(t)} | {med[mode]:.1f} | {min(t):.1f} | {max(t):.1f} | {spread:.2f} % "
          f"| {mapped}/{len(r)} | {init:.2f} | {wall:.2f} |")
ratio = med["vgpu-launch"] / med["direct"]
print(f"\nratio (vgpu-launch / direct, medians): {ratio:.4f} ({(ratio - 1) * 100:+.2f} %)")
print("per run (TFLOP/s, in the order run): " + ", ".join(
    f"{x['mode']} {x['worker']['tflops']:.1f}" for x in rows))
EOF
fi
echo
echo "results and logs: $work"
[ $verdict_ok = 1 ]
