#!/usr/bin/env python3
"""A service that starts its GPU worker the way ollama starts its runners.

    python3 gpu/parent.py [--no-probe] [WORKER OPTIONS...]

Like `ollama serve`, the parent first looks at the GPU itself (--no-probe skips this): it loads
libcuda.so.1 with ctypes and calls cuInit and cuDeviceGetCount, so a shim preloaded into the
parent answers the parent. Then it starts gpu/worker.py as a subprocess with an environment it
builds itself: os.environ without LD_PRELOAD and without the shim's VGPU_SHIM_* variables. A
preload set for the parent alone therefore never reaches the worker. Every other option is passed
to the worker; the worker's exit status is the parent's.
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
    print(f"[parent] pid={pid} cuInit/cuDeviceGetCount rc={rc} count={n.value}",
          file=sys.stderr, flush=True)


def main() -> int:
    args = sys.argv[1:]
    if "--no-probe" in args:
        args.remove("--no-probe")
    else:
        probe()
    env = {
        k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("VGPU_SHIM_")
    }
    print(f"[parent] pid={os.getpid()} starting the worker without LD_PRELOAD",
          file=sys.stderr, flush=True)
    return subprocess.run([sys.executable, WORKER, *args], env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
