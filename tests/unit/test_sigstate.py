"""The environment hand-over of bin/vgpu-launch: what its shell and CPython set for themselves
is put back as it was given (vgpu_launch/sigstate.py)."""

from __future__ import annotations

from vgpu_launch import sigstate


def test_restore_environment() -> None:
    """PWD, SHLVL, _ and LC_CTYPE are restored from the record; without one, nothing changes."""
    env = {
        "PWD": "/set/by/sh",
        "SHLVL": "2",
        "_": "/usr/bin/python3",
        "LC_CTYPE": "C.UTF-8",
        "KEEP": "x",
        sigstate.ENV0_VAR: "LC_CTYPE\nPWD=/given\nOLDPWD\nSHLVL=1\n_",
    }
    sigstate.restore_environment(env)
    assert env == {"PWD": "/given", "SHLVL": "1", "KEEP": "x"}
    env = {"PWD": "/x"}
    sigstate.restore_environment(env)  # no record (not started by bin/vgpu-launch)
    assert env == {"PWD": "/x"}
