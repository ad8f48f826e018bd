#!/bin/bash
# HAMi-core's memory limit on a real GPU, with and without vgpu-launch (not part of CI: CI has no
# GPU; CI runs --dry-run).
#
#   gpu/hami.sh --libvgpu PATH [--limit 8g] [--under GIB] [--over GIB] [--runs N]
#               [--seconds S] [--size N] [--results DIR] [--dry-run]
#
# PATH is HAMi-core's libvgpu.so, as HAMi's device plugin mounts it into pods (built from
# HAMi-core's source by its own build script; this project ships no copy of it).
# Needs: an NVIDIA GPU and driver, a python3 with PyTorch (CUDA build) for the worker (PYTHON,
# default python3 from PATH), and vgpu-launch's Python packages for the python3 that
# bin/vgpu-launch picks (docs/install.md, "From a checkout"), or for VGPU_LAUNCH_PYTHON, or else
# for the worker's PYTHON.
#
# (h1) without vgpu-launch: LD_PRELOAD=libvgpu.so CUDA_DEVICE_MEMORY_LIMIT=LIMIT python3
#      gpu/parent.py. HAMi-core limits the parent, but the parent starts its worker with
#      LD_PRELOAD and CUDA_DEVICE_MEMORY_LIMIT removed, as ollama's runners are started: the
#      worker sees the whole GPU and an allocation over the limit succeeds;
# (h2) under vgpu-launch: bin/vgpu-launch --preload libvgpu.so --env
#      CUDA_DEVICE_MEMORY_LIMIT=LIMIT -- python3 gpu/parent.py. The worker gets both back: it
#      sees only LIMIT, an allocation under it succeeds and one over it fails (out of memory);
# (h3) throughput of bf16 matrix products, alternating, N runs each: the worker alone (no
#      HAMi-core), the worker with HAMi-core preloaded directly, and the whole tree under
#      vgpu-launch (HAMi-core re-injected into the worker); medians and a Markdown table.
# --dry-run prints every command it would run, checks the scripts and the launcher, and runs
# nothing on a GPU (CI runs it through gpu/run.sh --dry-run).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
lib=""
limit=8g
under=4
over=12
runs=3
seconds=10
size=8192
results=""
dry=0
while [ $# -gt 0 ]; do
    case $1 in
    --libvgpu) lib=$2; shift 2 ;;
    --limit) limit=$2; shift 2 ;;
    --under) under=$2; shift 2 ;;
    --over) over=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --results) results=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "hami.sh: unknown option $1 (see gpu/hami.sh --help)" >&2; exit 2 ;;
    esac
done
if [ -z "$lib" ]; then
    [ $dry = 1 ] && lib=/usr/lib/libvgpu.so || {
        echo "hami.sh: give --libvgpu PATH (HAMi-core's libvgpu.so)" >&2; exit 2; }
fi
case $limit in
*[gG]) limit_gib=${limit%?} ;;
*) echo "hami.sh: --limit takes GiB with a g suffix (8g), not $limit" >&2; exit 2 ;;
esac

me=hami.sh
# shellcheck source=gpu/common.sh
source "$repo/gpu/common.sh"
results=${results:-$repo/.cache/gpu/hami}
probe=(--seconds 0 --alloc "$under,$over" --shim-name libvgpu)
timed=(--seconds "$seconds" --size "$size" --shim-name libvgpu)


if [ $dry = 1 ]; then
    heading "dry run: nothing is run on a GPU"
    "$PYTHON" -m py_compile "$here/parent.py" "$here/worker.py"
    "$PYTHON" "$here/worker.py" --help >/dev/null
    echo "$launch_version"
    show LD_PRELOAD="$lib" CUDA_DEVICE_MEMORY_LIMIT="$limit" python3 gpu/parent.py "${probe[@]}"
    show bin/vgpu-launch --preload "$lib" --env CUDA_DEVICE_MEMORY_LIMIT="$limit" -- \
        python3 gpu/parent.py "${probe[@]}"
    show python3 gpu/worker.py "${timed[@]}"
    show LD_PRELOAD="$lib" CUDA_DEVICE_MEMORY_LIMIT="$limit" python3 gpu/worker.py "${timed[@]}"
    show bin/vgpu-launch --preload "$lib" --env CUDA_DEVICE_MEMORY_LIMIT="$limit" -- \
        python3 gpu/parent.py --no-probe "${timed[@]}"
    echo "($runs runs of each of the last three, alternating)"
    exit 0
fi

[ -f "$lib" ] || { echo "hami.sh: $lib: no such file" >&2; exit 2; }
rm -rf "$results"
mkdir -p "$results" /tmp/vgpulock
work=$results

heading "Machine"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
        2>/dev/null || echo "(no nvidia-smi)"
    echo "kernel: $(uname -r)"
    "$PYTHON" -c 'import torch; print("torch:", torch.__version__, "CUDA", torch.version.cuda)'
    echo "$launch_version"
    [ -z "${VGPU_LAUNCH_PYTHON:-}" ] || echo "VGPU_LAUNCH_PYTHON=$VGPU_LAUNCH_PYTHON"
    echo "libvgpu.so: $lib ($(stat -c %s "$lib") bytes, sha256 $(sha256sum "$lib" | cut -c1-16))"
    echo "limit: CUDA_DEVICE_MEMORY_LIMIT=$limit; allocations tried: $under GiB and $over GiB"
} | indent

last_json() { grep '^{' "$1" | tail -n 1; }
field() { # field FILE EXPR: a Python expression over the worker's JSON line `w`
    "$PYTHON" - "$1" "$2" <<'EOF'
import json, sys
lines = [l for l in open(sys.argv[1]) if l.startswith("{")]
w = json.loads(lines[-1]) if lines else {}
try:
    print(eval(sys.argv[2], {"w": w}))
except Exception as exc:
    print(f"?({exc})")
EOF
}
hami_lines() { grep -a 'HAMI-core' "$1" | head -n 6 | cut -c1-160 || true; }
# A fresh shared region per step: HAMi-core keeps limits and usage in this file.
cache() { export CUDA_DEVICE_MEMORY_SHARED_CACHE=$work/cudevshr-$1.cache; }

# ---- (h1) ----
heading "(h1) without vgpu-launch: HAMi-core and the limit set for the parent only"
cache h1
show LD_PRELOAD="$lib" CUDA_DEVICE_MEMORY_LIMIT="$limit" python3 gpu/parent.py "${probe[@]}"
LD_PRELOAD=$lib CUDA_DEVICE_MEMORY_LIMIT=$limit "$PYTHON" "$here/parent.py" "${probe[@]}" \
    >"$work/h1.out" 2>"$work/h1.err" || { cat "$work/h1.err"; exit 1; }
grep -a '^\[parent\]' "$work/h1.err" | indent
hami_lines "$work/h1.err" | indent
last_json "$work/h1.out" | indent
h1_total=$(field "$work/h1.out" 'w["mem_get_info_gib"]["total"]')
h1_over=$(field "$work/h1.out" 'w["alloc"]["%g" % '"$over"']')
h1_mapped=$(field "$work/h1.out" 'w["shim_mapped"]')
echo "worker: sees $h1_total GiB; $over GiB allocation: $h1_over; libvgpu.so mapped: $h1_mapped"

# ---- (h2) ----
heading "(h2) under vgpu-launch"
cache h2
show bin/vgpu-launch --preload "$lib" --env CUDA_DEVICE_MEMORY_LIMIT="$limit" -- \
    python3 gpu/parent.py "${probe[@]}"
"$launch" --preload "$lib" --env CUDA_DEVICE_MEMORY_LIMIT="$limit" --log-format json -- \
    "$PYTHON" "$here/parent.py" "${probe[@]}" >"$work/h2.out" 2>"$work/h2.err" ||
    { cat "$work/h2.err"; exit 1; }
grep -a '^\[parent\]' "$work/h2.err" | indent
hami_lines "$work/h2.err" | indent
last_json "$work/h2.out" | indent
exec_decisions "$work/h2.err"
h2_total=$(field "$work/h2.out" 'w["mem_get_info_gib"]["total"]')
h2_under=$(field "$work/h2.out" 'w["alloc"]["%g" % '"$under"']')
h2_over=$(field "$work/h2.out" 'w["alloc"]["%g" % '"$over"']')
h2_mapped=$(field "$work/h2.out" 'w["shim_mapped"]')
h2_env=$(field "$work/h2.out" 'w["cuda_device_memory_limit"]')
echo "worker: sees $h2_total GiB (CUDA_DEVICE_MEMORY_LIMIT=$h2_env); $under GiB: $h2_under;" \
    "$over GiB: $h2_over; libvgpu.so mapped: $h2_mapped"

ok=1
"$PYTHON" -c "import sys; sys.exit(not float('$h1_total') > 1.5 * $limit_gib)" 2>/dev/null || ok=0
[ "$h1_over" = ok ] && [ "$h1_mapped" = False ] || ok=0
"$PYTHON" -c "import sys; sys.exit(not abs(float('$h2_total') - $limit_gib) < 0.5)" 2>/dev/null ||
    ok=0
[ "$h2_under" = ok ] && [[ $h2_over == "out of memory"* ]] && [ "$h2_mapped" = True ] || ok=0
heading "Before/after: $([ $ok = 1 ] && echo as expected || echo NOT as expected)"

# ---- (h3) ----
heading "(h3) throughput: $runs runs each, ${seconds} s of ${size}x${size} bf16 products per run"
show python3 gpu/worker.py "${timed[@]}"
show LD_PRELOAD="$lib" CUDA_DEVICE_MEMORY_LIMIT="$limit" python3 gpu/worker.py "${timed[@]}"
show bin/vgpu-launch --preload "$lib" --env CUDA_DEVICE_MEMORY_LIMIT="$limit" -- \
    python3 gpu/parent.py --no-probe "${timed[@]}"
modes=(none direct vgpu-launch)
for i in $(seq "$runs"); do
    for j in 0 1 2; do
        mode=${modes[$(((i + j) % 3))]}
        cache "h3-$mode-$i"
        t0=$(date +%s%N)
        case $mode in
        none) "$PYTHON" "$here/worker.py" "${timed[@]}" ;;
        direct) LD_PRELOAD=$lib CUDA_DEVICE_MEMORY_LIMIT=$limit \
            "$PYTHON" "$here/worker.py" "${timed[@]}" ;;
        vgpu-launch) "$launch" --preload "$lib" --env CUDA_DEVICE_MEMORY_LIMIT="$limit" \
            --log-format json -- "$PYTHON" "$here/parent.py" --no-probe "${timed[@]}" ;;
        esac >"$work/h3-$mode-$i.out" 2>"$work/h3-$mode-$i.err" ||
            { tail -n 20 "$work/h3-$mode-$i.err"; exit 1; }
        t1=$(date +%s%N)
        echo "{\"mode\": \"$mode\", \"run\": $i, \"wall_ms\": $(((t1 - t0) / 1000000))," \
            "\"worker\": $(last_json "$work/h3-$mode-$i.out")}" >>"$work/throughput.jsonl"
        printf '    run %d %-12s %s TFLOP/s\n' "$i" "$mode" \
            "$(field "$work/h3-$mode-$i.out" 'w["tflops"]')"
    done
done
"$PYTHON" - "$work/throughput.jsonl" "$size" "$seconds" "$limit" <<'EOF' | tee "$work/throughput.md"
import json, statistics, sys
path, size, seconds, limit = sys.argv[1:5]
rows = [json.loads(l) for l in open(path)]
labels = {"none": "worker alone, no HAMi-core",
          "direct": f"worker with HAMi-core preloaded directly ({limit})",
          "vgpu-launch": f"whole tree under vgpu-launch, HAMi-core re-injected ({limit})"}
med = {}
print(f"\nbf16 {size}x{size} matrix products, {seconds} s per run\n")
print("| mode | runs | median TFLOP/s | min | max | libvgpu.so in worker | median wall s |")
print("|---|---|---|---|---|---|---|")
for mode, label in labels.items():
    r = [x for x in rows if x["mode"] == mode]
    t = [x["worker"]["tflops"] for x in r]
    med[mode] = statistics.median(t)
    mapped = sum(1 for x in r if x["worker"].get("shim_mapped"))
    wall = statistics.median(x["wall_ms"] for x in r) / 1000
    print(f"| {label} | {len(t)} | {med[mode]:.1f} | {min(t):.1f} | {max(t):.1f} "
          f"| {mapped}/{len(r)} | {wall:.2f} |")
print(f"\nvgpu-launch / direct (medians): {med['vgpu-launch'] / med['direct']:.4f}; "
      f"direct / none: {med['direct'] / med['none']:.4f}")
print("per run, in the order run: " + ", ".join(
    f"{x['mode']} {x['worker']['tflops']:.1f}" for x in rows))
EOF
echo
echo "results and logs: $work"
[ $ok = 1 ]
