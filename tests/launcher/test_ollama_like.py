"""The headline: ollama's runners lose the shim without vgpu-launch and keep it with it.

examples/ollama-like (fixture ``ollama_like``) is a Go server that strips LD_PRELOAD from the
runners it starts, as ollama does; its stand-in CUDA shim reports ``VGPU_TEST_DEVICES`` devices
when it is loaded, and the runners report what they found.
"""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest
from support.build import Programs
from support.launch import LaunchResult, clean_env, preload_entries, run

RUNNER_RE = re.compile(r"^runner pid=(\d+) port=(\d+) count=(-?\d+)$", re.M)
INITIAL_RE = re.compile(r"^initial_count=(-?\d+)$", re.M)


def _runners(stderr: str) -> list[tuple[int, int]]:
    return [(int(m[1]), int(m[3])) for m in RUNNER_RE.finditer(stderr)]


def _initial(stderr: str) -> int | None:
    m = INITIAL_RE.search(stderr)
    return int(m[1]) if m else None


def _ollama_under_launch(ollama_like: Programs, devices: str) -> LaunchResult:
    res = run(
        [
            "--preload",
            ollama_like.shim,
            "--env",
            f"VGPU_TEST_DEVICES={devices}",
            "--",
            ollama_like.ollama,
            "serve",
            "--once",
        ]
    )
    assert res.returncode == 0, res.describe()
    runners = _runners("\n".join(res.lines))
    assert len(runners) == 4, res.describe()
    assert [c for _, c in runners] == [int(devices)] * 4, res.describe()
    assert _initial("\n".join(res.lines)) == int(devices), res.describe()
    for pid, _ in runners:
        (ev,) = [
            e
            for e in res.exec_events(pid=pid)
            if (e.get("argv") or [None, None])[1:2] == ["runner"]
        ]
        assert ev.get("decision") == "injected", ev
        assert _same(ev.get("preload_after"), ollama_like.shim), ev
        assert f"[vgpu-test-shim] cuDeviceGetCount() pid={pid} count={devices}" in res.lines
    return res


def _same(value: str | None, lib: str) -> bool:
    return str(lib) in preload_entries(value or "")


def test_ollama_like_runners_get_the_shim(ollama_like: Programs) -> None:
    """Without vgpu-launch the runners find no GPU; under it every runner loads the shim."""
    # without vgpu-launch: the shim is in the server only, the runners find no GPU
    plain = subprocess.run(
        [str(ollama_like.ollama), "serve", "--once"],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env({"LD_PRELOAD": str(ollama_like.shim), "VGPU_TEST_DEVICES": "1"}),
        check=False,
    )
    assert plain.returncode == 0, plain.stderr
    assert [c for _, c in _runners(plain.stderr)] == [0, 0, 0, 0], plain.stderr
    assert _initial(plain.stderr) == 0, plain.stderr
    assert "cuDeviceGetCount()" not in plain.stderr

    # under vgpu-launch: every runner loads the shim and finds 1
    res = _ollama_under_launch(ollama_like, "1")
    assert len(res.exec_events(exe=ollama_like.ollama, decision="injected")) == 4, res.describe()


def test_ollama_like_configured_env_reaches_runners(ollama_like: Programs) -> None:
    """A variable set with --env (the shim's device count) reaches every runner."""
    _ollama_under_launch(ollama_like, "3")


@pytest.mark.parametrize("devices", ["0", "5"])
def test_ollama_like_fixture_without_launcher(ollama_like: Programs, devices: str) -> None:
    """The fixture itself: the shim, when loaded, decides the count; the runner strips it."""
    env = clean_env(
        {
            "LD_PRELOAD": str(ollama_like.shim),
            "VGPU_TEST_DEVICES": devices,
            "LD_LIBRARY_PATH": str(ollama_like.dir),
        }
    )
    port = _free_port()
    proc = subprocess.Popen(
        [str(ollama_like.ollama), "runner", "--ollama-engine", "--port", str(port)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        body = _get_info(port)
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert body == {"count": int(devices)}, err
    assert f"cuDeviceGetCount() pid={proc.pid} count={devices}" in err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_info(port: int) -> Any:
    import json
    import time
    import urllib.request

    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/info", timeout=2) as r:
                return json.load(r)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
