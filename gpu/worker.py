#!/usr/bin/env python3
"""The GPU worker that gpu/parent.py starts: counts the devices, then times a matmul loop.

    python3 gpu/worker.py [--seconds S] [--size N] [--hold-file PATH] [--backend torch|stub]
                          [--alloc GIB[,GIB...]] [--shim-name NAME]

torch backend (the default): the CUDA runtime's device count (cudaGetDeviceCount, through
`torch._C._cuda_getDeviceCount()`: the runtime reaches the driver's cuDeviceGetCount through
cuGetProcAddress), also `torch.cuda.device_count()` (which asks NVML first, so a shim of
cuDeviceGetCount alone does not change it), then bf16 N x N matrix products for S seconds,
synchronising the device before the clock is read, reported in TFLOP/s.

stub backend: for checking the scripts on a machine without a GPU or PyTorch. It loads
libcuda.so.1 with ctypes (a real driver or a stand-in found on LD_LIBRARY_PATH), fetches
cuDeviceGetCount through cuGetProcAddress_v2 as the runtime does, and times a float32 numpy
matrix product on the CPU instead (the "tflops" field is then CPU TFLOP/s).

With --alloc (torch backend), before the timed loop: the device memory the worker is shown
(`torch.cuda.mem_get_info()`, which is cudaMemGetInfo; the device's total_memory; NVML's total),
then one allocation of each size in GiB, freed again, each reported as "ok" or the error: a
memory-limiting shim such as HAMi-core's libvgpu.so shows its limit and refuses what is over it.
--seconds 0 skips the timed loop. --shim-name: the library file name whose mapping in
/proc/self/maps is reported as shim_mapped (default cuda-count-shim).

With --hold-file, once the device is initialised and warmed up the worker writes
{"pid": ..., "ppid": ...} to PATH and waits (at most 120 s) until PATH is removed, so that its
process tree can be inspected while it holds the driver; the timed loop comes after.

Prints one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
import warnings
from typing import Any

T0 = time.perf_counter()
SHIM_NAME = "cuda-count-shim"


def shim_mapped(name: str = SHIM_NAME) -> bool:
    try:
        with open("/proc/self/maps") as f:
            return any(name in line for line in f)
    except OSError:
        return False


def hold(path: str | None) -> None:
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"pid": os.getpid(), "ppid": os.getppid()}, f)
    os.replace(tmp, path)
    deadline = time.monotonic() + 120
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)


def run_torch(args: argparse.Namespace, out: dict) -> None:
    import torch

    out["torch"] = torch.__version__
    out["cuda_runtime"] = torch.version.cuda
    # The CUDA runtime's count: cudaGetDeviceCount, which reaches the driver's cuDeviceGetCount
    # through the entry point that cuGetProcAddress handed the runtime. (torch.cuda.device_count()
    # asks NVML first and only falls back to the runtime when NVML is unusable.)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        n = torch._C._cuda_getDeviceCount()
    out["device_count"] = n
    out["nvml_device_count"] = torch.cuda.device_count()
    if caught:
        out["cuda_warning"] = str(caught[0].message)[:300]
    if n < 1:
        return
    dev = torch.device("cuda", 0)
    out["device_name"] = torch.cuda.get_device_name(dev)
    if args.alloc:
        memory_probe(torch, dev, args.alloc, out)
    if args.seconds <= 0:
        return
    size = args.size
    dtype = torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(size, size, device=dev, dtype=dtype, generator=g)
    b = torch.randn(size, size, device=dev, dtype=dtype, generator=g)
    c = torch.empty(size, size, device=dev, dtype=dtype)
    for _ in range(10):
        torch.matmul(a, b, out=c)
    torch.cuda.synchronize(dev)
    out["init_s"] = round(time.perf_counter() - T0, 3)
    hold(args.hold_file)

    chunk = 25
    iters = 0
    start = time.perf_counter()
    while True:
        for _ in range(chunk):
            torch.matmul(a, b, out=c)
        torch.cuda.synchronize(dev)
        iters += chunk
        elapsed = time.perf_counter() - start
        if elapsed >= args.seconds:
            break
    out.update(
        dtype="bf16",
        size=size,
        iters=iters,
        seconds=round(elapsed, 4),
        tflops=round(2.0 * size**3 * iters / elapsed / 1e12, 2),
        checksum=float(c[0, :8].float().sum().item()),
    )


def memory_probe(torch: Any, dev: Any, sizes: list[float], out: dict) -> None:
    gib = 1 << 30
    free, total = torch.cuda.mem_get_info(dev)
    out["mem_get_info_gib"] = {"free": round(free / gib, 2), "total": round(total / gib, 2)}
    out["total_memory_gib"] = round(torch.cuda.get_device_properties(dev).total_memory / gib, 2)
    try:
        import pynvml

        pynvml.nvmlInit()
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0))
        out["nvml_total_gib"] = round(info.total / gib, 2)
    except Exception as exc:  # NVML is a side note here: report why it is missing
        out["nvml_total_gib"] = f"unavailable: {exc}"[:120]
    results = {}
    for size in sizes:
        try:
            block = torch.empty(int(size * gib), dtype=torch.uint8, device=dev)
            block.fill_(1)
            torch.cuda.synchronize(dev)
            results[f"{size:g}"] = "ok"
            del block
        except torch.OutOfMemoryError as exc:
            results[f"{size:g}"] = "out of memory: " + str(exc).splitlines()[0][:200]
        except RuntimeError as exc:
            results[f"{size:g}"] = "error: " + str(exc).splitlines()[0][:200]
        torch.cuda.empty_cache()
    out["alloc"] = results


def run_stub(args: argparse.Namespace, out: dict) -> None:
    lib = ctypes.CDLL("libcuda.so.1")
    if lib.cuInit(0) != 0:
        raise SystemExit("worker: cuInit failed")
    gpa = lib.cuGetProcAddress_v2  # ctypes looks it up with dlsym, as libcudart does
    gpa.argtypes = [
        ctypes.c_char_p,
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.c_int,
        ctypes.c_uint64,
        ctypes.c_void_p,
    ]
    fn = ctypes.c_void_p()
    if gpa(b"cuDeviceGetCount", ctypes.byref(fn), 12000, 0, None) != 0 or not fn.value:
        raise SystemExit("worker: cuGetProcAddress_v2(cuDeviceGetCount) failed")
    count_fn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int))(fn.value)
    n = ctypes.c_int(-1)
    rc = count_fn(ctypes.byref(n))
    out["device_count"] = n.value if rc == 0 else 0
    if out["device_count"] < 1:
        return
    import numpy as np

    size = min(args.size, 1024)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    c = a @ b
    out["init_s"] = round(time.perf_counter() - T0, 3)
    hold(args.hold_file)
    iters = 0
    start = time.perf_counter()
    while True:
        np.matmul(a, b, out=c)
        iters += 1
        elapsed = time.perf_counter() - start
        if elapsed >= args.seconds:
            break
    out.update(
        dtype="f32-cpu",
        size=size,
        iters=iters,
        seconds=round(elapsed, 4),
        tflops=round(2.0 * size**3 * iters / elapsed / 1e12, 4),
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0, help="length of the timed loop")
    p.add_argument("--size", type=int, default=8192, help="matrix side")
    p.add_argument("--hold-file", help="write PATH when ready, wait until it is removed")
    p.add_argument("--backend", choices=("torch", "stub"), default="torch")
    p.add_argument(
        "--alloc",
        type=lambda v: [float(x) for x in v.split(",")],
        default=[],
        help="GiB to allocate once each, comma-separated (torch backend)",
    )
    p.add_argument("--shim-name", default=SHIM_NAME, help="library reported as shim_mapped")
    args = p.parse_args()
    out: dict = {
        "worker_pid": os.getpid(),
        "parent_pid": os.getppid(),
        "backend": args.backend,
        "ld_preload": os.environ.get("LD_PRELOAD"),
        "vgpu_shim_devices": os.environ.get("VGPU_SHIM_DEVICES"),
        "cuda_device_memory_limit": os.environ.get("CUDA_DEVICE_MEMORY_LIMIT"),
    }
    (run_torch if args.backend == "torch" else run_stub)(args, out)
    out["shim_mapped"] = shim_mapped(args.shim_name)
    out.setdefault("tflops", None)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
