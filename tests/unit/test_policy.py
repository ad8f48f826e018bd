"""The per-exec decision and the environment it produces."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vgpu_launch.trace.policy import Decision, Policy, apply, plan

SHIM = b"/usr/lib/libvgpu.so"
POLICY = Policy(
    preload=(SHIM,),
    env=((b"CUDA_DEVICE_MEMORY_LIMIT_0", b"8g"),),
    force_env=((b"VGPU_MODE", b"strict"),),
    exclude=("nvidia-smi", "/usr/sbin/*"),
)


def run(env: list[bytes], **kw: object) -> tuple[Decision, list[bytes]]:
    p = plan(POLICY, env, **kw)  # type: ignore[arg-type]
    return p.decision, apply(env, p)


def test_stripped_environment_gets_everything() -> None:
    """A stripped environment gets LD_PRELOAD and every configured variable."""
    decision, env = run([b"PATH=/bin"])
    assert decision is Decision.INJECTED
    assert env == [
        b"PATH=/bin",
        b"LD_PRELOAD=" + SHIM,
        b"CUDA_DEVICE_MEMORY_LIMIT_0=8g",
        b"VGPU_MODE=strict",
    ]


def test_existing_preload_is_merged_into_one_entry() -> None:
    """Several LD_PRELOAD entries become one, the configured library first."""
    decision, env = run([b"LD_PRELOAD=/other.so", b"A=1", b"LD_PRELOAD=/third.so"])
    assert decision is Decision.MERGED
    assert [e for e in env if e.startswith(b"LD_PRELOAD=")] == [
        b"LD_PRELOAD=" + SHIM + b":/other.so:/third.so"
    ]


def test_present_changes_nothing_when_all_is_there() -> None:
    """An environment that has everything already is left unchanged."""
    env = [
        b"LD_PRELOAD=/x.so:" + SHIM,
        b"CUDA_DEVICE_MEMORY_LIMIT_0=4g",  # the program's own value wins for --env
        b"VGPU_MODE=strict",
    ]
    p = plan(POLICY, env)
    assert p.decision is Decision.PRESENT and not p.changes


def test_force_env_overrides_a_different_value() -> None:
    """A forced variable replaces the program's own value."""
    _, env = run([b"LD_PRELOAD=" + SHIM, b"VGPU_MODE=off", b"CUDA_DEVICE_MEMORY_LIMIT_0=1"])
    assert b"VGPU_MODE=strict" in env and b"VGPU_MODE=off" not in env


def test_exclude_matches_basename_or_absolute_path() -> None:
    """An exclude pattern matches a program's name or its absolute path."""
    assert plan(POLICY, [], exe="/usr/bin/nvidia-smi").decision is Decision.EXCLUDED
    assert plan(POLICY, [], exe="/usr/sbin/sshd").decision is Decision.EXCLUDED
    assert plan(POLICY, [], exe="/usr/bin/sshd").decision is Decision.INJECTED


def test_setuid_program_is_left_alone() -> None:
    """A setuid program (AT_SECURE) is left alone."""
    p = plan(POLICY, [b"PATH=/bin"], exe="/usr/bin/passwd", secure=True)
    assert p.decision is Decision.SETUID and not p.changes


names = st.sampled_from([b"LD_PRELOAD", b"PATH", b"CUDA_DEVICE_MEMORY_LIMIT_0", b"VGPU_MODE", b"X"])
values = st.sampled_from([b"", b"/a.so", SHIM, b"/a.so " + SHIM, b"8g", b"strict"])


@given(st.lists(st.tuples(names, values), max_size=12))
def test_result_is_always_complete_and_single(pairs: list[tuple[bytes, bytes]]) -> None:
    """For any environment, the result has one LD_PRELOAD naming the library."""
    env = [n + b"=" + v for n, v in pairs]
    p = plan(POLICY, env)
    out = apply(env, p)
    preloads = [e for e in out if e.startswith(b"LD_PRELOAD=")]
    assert len(preloads) == 1
    assert SHIM in preloads[0].split(b"=", 1)[1].replace(b" ", b":").split(b":")
    assert sum(e.startswith(b"VGPU_MODE=") for e in out) == 1 and b"VGPU_MODE=strict" in out
    assert any(e.startswith(b"CUDA_DEVICE_MEMORY_LIMIT_0=") for e in out)
    # entries we do not manage are untouched and in order
    others = [e for e in env if e.split(b"=")[0] in (b"PATH", b"X")]
    assert [e for e in out if e.split(b"=")[0] in (b"PATH", b"X")] == others
    # applying the plan again changes nothing
    again = plan(POLICY, out)
    assert not again.changes and again.decision is Decision.PRESENT
