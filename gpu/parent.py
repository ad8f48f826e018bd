#!/usr/bin/env python3
"""A service that starts its GPU worker the way ollama starts its runners.

    python3 gpu/parent.py [--no-probe] [WORKER OPTIONS...]

Like `ollama serve`, the parent first looks at the GPU itself (--no-probe skips this): it loads
libcuda.so.1 with ctypes and calls cuInit, cuDeviceGetCount and cuDeviceTotalMem_v2, so a shim
preloaded into the parent answers the parent. Then it starts gpu/worker.py as a subprocess with
an environment it builds itself: os.environ without LD_PRELOAD, without the test shim's
VGPU_SHIM_* variables and without HAMi-core's limits (CUDA_DEVICE_MEMORY_LIMIT,
CUDA_DEVICE_MEMORY_LIMIT_<N>, CUDA_DEVICE_SM_LIMIT). A preload or a limit set for the parent
alone therefore never reaches the worker. Every other option is passed to the worker; the
worker's exit status is the parent's.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")


def probe() -> None:
    pid = os.getpid()
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        print(f"[parent] pid={pid} no libcuda.so.1: {exc}", file=sys.stderr, flush=True)
        return
    rc = lib.cuInit(0)
    n = ctypes.c_int(-1)
    if rc == 0:
        rc = lib.cuDeviceGetCount(ctypes.byref(n))  # ctypes finds it with dlsym
    total = ctypes.c_size_t(0)
    if rc == 0 and n.value > 0:
        dev = ctypes.c_int(0)
        if lib.cuDeviceGet(ctypes.byref(dev), 0) == 0:
            lib.cuDeviceTotalMem_v2(ctypes.byref(total), dev)
    print(
        f"[parent] pid={pid} cuInit/cuDeviceGetCount rc={rc} count={n.value} "
        f"device0_total_mib={total.value >> 20}",
        file=sys.stderr,
        flush=True,
    )


def stripped(name: str) -> bool:
    """The variables the parent leaves out of its worker's environment."""
    return (
        name in ("LD_PRELOAD", "CUDA_DEVICE_SM_LIMIT")
        or name.startswith("VGPU_SHIM_")
        or name.startswith("CUDA_DEVICE_MEMORY_LIMIT")
    )


def main() -> int:
    args = sys.argv[1:]
    if "--no-probe" in args:
        args.remove("--no-probe")
    else:
        probe()
    env = {k: v for k, v in os.environ.items() if not stripped(k)}
    print(
        f"[parent] pid={os.getpid()} starting the worker without LD_PRELOAD and the limits",
        file=sys.stderr,
        flush=True,
    )
    return subprocess.run([sys.executable, WORKER, *args], env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
