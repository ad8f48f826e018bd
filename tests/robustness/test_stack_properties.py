"""Property tests of the initial-stack rebuilder (vgpu_launch/trace/stack.py) and of the environment
merge (vgpu_launch/trace/policy.py), with hypothesis.

1. Synthetic stacks, laid out as the kernel's create_elf_tables does (strings at the top, then
   the execfn string and a NULL word; below the strings the platform string and AT_RANDOM bytes;
   then argc, argv, NULL, envp, NULL, auxv, AT_NULL at a 16-byte aligned stack pointer), with
   random argv, environments of up to 30,000 entries (LD_PRELOAD absent, empty, with ':' or ' '
   separators, $LIB tokens, bare names, duplicates, non-UTF-8 bytes), random auxv entries and
   both word sizes. Garbage fills the memory below the stack pointer. The plan is applied the
   way the injector applies it, and the result is parsed back: argv pointers unchanged, the
   environment exactly ``policy.apply(env, plan)``, auxv verbatim, the new stack pointer 16-byte
   aligned, the new block ending exactly where the old one ended, nothing above it touched.
2. Differential: a real program (rprobe --env0) is exec'd under vgpu-launch with generated
   environments (rtool execenv), prints its environment, and must print exactly
   ``policy.apply(env, policy.plan(policy, env))``.
"""

from __future__ import annotations

import random
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import launch
from support.build import Programs

from vgpu_launch.config import Config
from vgpu_launch.trace import preload, stack
from vgpu_launch.trace.policy import (
    LD_PRELOAD,
    Decision,
    Plan,
    Policy,
    apply,
    apply_to_entries,
    plan,
)

AT_PAGESZ, AT_PHDR, AT_BASE, AT_PLATFORM, AT_HWCAP = 6, 3, 7, 15, 16
AT_SECURE, AT_RANDOM, AT_EXECFN, AT_SYSINFO_EHDR = 23, 25, 31, 33
ROOM = 256 * 1024


# ---- a model of the kernel's initial stack ------------------------------------------------------


@dataclass
class Image:
    word: int
    base: int  # lowest address held in mem
    mem: bytearray
    sp: int
    argv_ptrs: list[int]
    env_ptrs: list[int]
    auxv: tuple[int, ...]
    end: int  # just past the AT_NULL pair

    def snapshot(self, at: int) -> bytes:
        """What the injector reads: from ``at`` to the top of the stack mapping."""
        return bytes(self.mem[at - self.base :])


def build_image(
    word: int,
    argv: Sequence[bytes],
    env: Sequence[bytes],
    extra_aux: Sequence[tuple[int, int]],
    rng: random.Random,
) -> Image:
    top = 0xFFFFE000 if word == 4 else 0x7FFF_FFFF_F000
    mask = (1 << (8 * word)) - 1
    execfn = argv[0] if argv else b"/bin/prog"
    strings_area = b"".join(s + b"\0" for s in [*argv, *env, execfn])
    p = top - word - len(strings_area)
    ptrs, addr = [], p
    for s in [*argv, *env, execfn]:
        ptrs.append(addr)
        addr += len(s) + 1
    argv_ptrs, env_ptrs, execfn_ptr = ptrs[: len(argv)], ptrs[len(argv) : -1], ptrs[-1]
    platform = b"i686\0" if word == 4 else b"x86_64\0"
    platform_ptr = p - len(platform)
    random_ptr = (platform_ptr - 16) & ~15
    pairs = [
        (AT_SYSINFO_EHDR, rng.getrandbits(8 * word) & ~0xFFF),
        (AT_HWCAP, 0x178BFBFF),
        (AT_PAGESZ, 4096),
        (AT_PHDR, 0x400040),
        (AT_BASE, rng.choice([0, 0x7F0000000000 & mask])),
        (AT_SECURE, 0),
        (AT_RANDOM, random_ptr),
        (AT_EXECFN, execfn_ptr),
        (AT_PLATFORM, platform_ptr),
        *extra_aux,
        (0, 0),
    ]
    auxv = tuple(v & mask for pair in pairs for v in pair)
    words = [len(argv), *argv_ptrs, 0, *env_ptrs, 0, *auxv]
    sp = (random_ptr - len(words) * word) & ~15
    base = sp - ROOM
    mem = bytearray(rng.randbytes(top - base))  # garbage everywhere not written below
    fmt = f"<{len(words)}{'I' if word == 4 else 'Q'}"
    block = struct.pack(fmt, *words)
    mem[sp - base : sp - base + len(block)] = block
    mem[random_ptr - base : random_ptr - base + 16] = rng.randbytes(16)
    mem[platform_ptr - base : p - base] = platform
    mem[p - base : top - word - base] = strings_area
    mem[top - word - base :] = bytes(word)
    return Image(word, base, mem, sp, argv_ptrs, env_ptrs, auxv, sp + len(block))


def injector_env(st_: stack.InitialStack, p: Plan) -> list[int | bytes]:
    """The new environment as injector.inject builds it from a plan: kept entries by address,
    replacements and additions as new strings."""
    return apply_to_entries(st_.envp, p)


# ---- strategies ---------------------------------------------------------------------------------

LIBS = [b"/opt/vgpu/libvgpu.so", b"/opt/vgpu/$LIB/libvgpu.so", b"/usr/lib/libother.so"]

preload_entries = st.sampled_from(
    [
        b"LD_PRELOAD=",
        b"LD_PRELOAD=/usr/lib/libother.so",
        b"LD_PRELOAD=/opt/vgpu/libvgpu.so",
        b"LD_PRELOAD=/usr/lib/libother.so:/opt/vgpu/libvgpu.so",
        b"LD_PRELOAD=/usr/lib/libother.so /opt/vgpu/$LIB/libvgpu.so",
        b"LD_PRELOAD=::/a.so:: /b.so  ",
        b"LD_PRELOAD=${LIB}/x.so",
        b"LD_PRELOAD",  # a bare name: not a variable for getenv, but a name to the policy
        b"LD_PRELOAD==/weird.so",
        b"LD_PRELOAD=/l\xffatin1.so",
    ]
)
names = st.sampled_from([b"VGPU_A", b"VGPU_B", b"CUDA_DEVICE_MEMORY_LIMIT_0", b"PATH", b"HOME"])
entry = st.one_of(
    preload_entries,
    st.builds(lambda n, v: n + b"=" + v, names, st.binary(max_size=12)),
    st.binary(max_size=24),  # anything: no '=', empty, non-UTF-8
).map(lambda b: b.replace(b"\0", b"\x01"))


@st.composite
def environments(draw: st.DrawFn, bulk_max: int = 30_000) -> list[bytes]:
    special = draw(st.lists(entry, max_size=12))
    # Small counts are the common case; tens of thousands come from the sampled sizes (an
    # integer strategy alone would seldom draw them).
    bulk = draw(
        st.one_of(
            st.integers(0, 200),
            st.integers(0, bulk_max),
            st.sampled_from([bulk_max // 8, bulk_max // 2, bulk_max]),
        )
    )
    rng = random.Random(draw(st.integers(0, 2**32)))
    env = [b"V%d=%s" % (i, b"x" * rng.randrange(0, 20)) for i in range(bulk)]
    for e in special:
        env.insert(rng.randrange(0, len(env) + 1), e)
    return env


assignments = st.dictionaries(
    names.filter(lambda n: n != b"PATH"),
    st.binary(max_size=10).map(lambda b: b.replace(b"\0", b"")),
    max_size=3,
)
# A name in both env and force_env is test_same_name_in_env_and_force_env's (xfail) business.
policies = st.builds(
    lambda libs, env, force: Policy(
        preload=tuple(libs),
        env=tuple((k, v) for k, v in env.items() if k not in force),
        force_env=tuple(force.items()),
    ),
    st.lists(st.sampled_from(LIBS), min_size=1, max_size=3, unique=True),
    assignments,
    assignments,
)


# ---- 1. the rebuilder ------------------------------------------------------------------------


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    word=st.sampled_from([4, 8]),
    argv=st.lists(
        st.binary(min_size=0, max_size=30).map(lambda b: b.replace(b"\0", b"")),
        min_size=0,
        max_size=40,
    ),
    env=environments(),
    extra_aux=st.lists(st.tuples(st.integers(40, 60), st.integers(0, 2**32 - 1)), max_size=4),
    pol=policies,
    secure=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_rebuild_round_trip(
    word: int,
    argv: list[bytes],
    env: list[bytes],
    extra_aux: list[tuple[int, int]],
    pol: Policy,
    secure: bool,
    seed: int,
) -> None:
    """A rebuilt stack parses back to the planned environment, argv and auxv untouched."""
    rng = random.Random(seed)
    img = build_image(word, argv, env, extra_aux, rng)
    snap = img.snapshot(img.sp)
    st_ = stack.parse(snap, img.sp, word)
    # The parser reads back exactly what the kernel wrote.
    assert st_.argv == tuple(img.argv_ptrs)
    assert st_.envp == tuple(img.env_ptrs)
    assert st_.auxv == img.auxv
    assert st_.end == img.end
    assert stack.strings(snap, img.sp, st_.envp) == env
    assert stack.strings(snap, img.sp, st_.argv) == argv

    p = plan(pol, env, exe="/usr/bin/prog", secure=secure)
    expected = apply(env, p)
    if secure:
        assert p.decision is Decision.SETUID and not p.changes and expected == env
        return
    check_merge(pol, env, p, expected)
    if not p.changes:
        assert expected == env
        return

    new_sp, blob = stack.rebuild(st_, injector_env(st_, p))
    assert new_sp % 16 == 0
    assert new_sp + len(blob) == st_.end  # ends exactly where the old block ended
    assert new_sp >= img.base, "the model's room below the stack pointer is too small"
    before = bytes(img.mem)
    img.mem[new_sp - img.base : new_sp - img.base + len(blob)] = blob
    assert img.mem[st_.end - img.base :] == before[st_.end - img.base :]  # nothing above

    snap2 = img.snapshot(new_sp)
    st2 = stack.parse(snap2, new_sp, word)
    assert st2.argv == st_.argv  # argv pointers unchanged (the strings did not move)
    assert st2.auxv == st_.auxv  # auxv verbatim: AT_RANDOM, AT_EXECFN... still point right
    assert (
        st2.end + sum(len(e) + 1 for e in injector_env(st_, p) if isinstance(e, bytes)) <= st_.end
    )  # the new strings sit between the new auxv and the old block's end
    assert stack.strings(snap2, new_sp, st2.argv) == argv
    assert stack.strings(snap2, new_sp, st2.envp) == expected
    # Kept entries keep their address: only new strings are written.
    kept = [ptr for ptr in injector_env(st_, p) if isinstance(ptr, int)]
    assert set(kept) <= set(st2.envp)


def check_merge(pol: Policy, env: list[bytes], p: Plan, result: list[bytes]) -> None:
    """The environment merge rules (docs: one LD_PRELOAD, tokens kept, nothing lost)."""
    named = [e for e in result if e.split(b"=", 1)[0] == LD_PRELOAD]
    assert len(named) == 1, named
    value = named[0][len(LD_PRELOAD) + 1 :]
    entries = preload.split(value)
    configured = list(dict.fromkeys(pol.preload))
    if p.decision is Decision.PRESENT:
        assert named[0] in env
    else:
        assert entries[: len(configured)] == configured  # configured first, $LIB unexpanded
    old = [
        e
        for x in env
        if x.split(b"=", 1)[0] == LD_PRELOAD
        for e in preload.split(x[len(LD_PRELOAD) + 1 :])
    ]
    assert set(old) <= set(entries)  # nothing the program had is lost
    assert len(entries) == len(set(entries)) or p.decision is Decision.PRESENT
    for name, v in pol.force_env:
        assert [e for e in result if e.split(b"=", 1)[0] == name] == [name + b"=" + v]
    for name, v in pol.env:
        if name in dict(pol.force_env):
            continue
        have = [e for e in result if e.split(b"=", 1)[0] == name]
        assert have, name
        if not any(e.split(b"=", 1)[0] == name for e in env):
            assert have == [name + b"=" + v]
    # Everything else is untouched, in order.
    managed = {LD_PRELOAD, *(n for n, _ in pol.env), *(n for n, _ in pol.force_env)}
    assert [e for e in result if e.split(b"=", 1)[0] not in managed] == [
        e for e in env if e.split(b"=", 1)[0] not in managed
    ]


def test_same_name_in_env_and_force_env() -> None:
    """A name both in env and force_env ends up once, with the forced value."""
    pol = Policy(
        preload=(LIBS[0],), env=((b"VGPU_A", b"soft"),), force_env=((b"VGPU_A", b"forced"),)
    )
    result = apply([b"PATH=/bin"], plan(pol, [b"PATH=/bin"]))
    assert [e for e in result if e.startswith(b"VGPU_A=")] == [b"VGPU_A=forced"]


# ---- 2. differential: a real program's environment ------------------------------------------


def _envfile(path: Path, env: Sequence[bytes]) -> None:
    path.write_bytes(b"".join(struct.pack("<I", len(e)) + e for e in env))


real_entry = entry.filter(lambda e: not e.startswith(b"LD_") or e.startswith(b"LD_PRELOAD"))
real_env = st.lists(real_entry, max_size=30)
cli_names = st.sampled_from(["VGPU_A", "VGPU_B", "CUDA_DEVICE_MEMORY_LIMIT_0", "HOME"])
cli_values = st.text(alphabet="abcxyz019/:._ -", max_size=10)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)
@given(
    envs=st.lists(
        st.one_of(
            real_env,
            environments(bulk_max=20_000).map(
                lambda env: [
                    e for e in env if not e.startswith(b"LD_") or e.startswith(b"LD_PRELOAD")
                ]
            ),
        ),
        min_size=1,
        max_size=6,
    ),
    env_opts=st.dictionaries(cli_names, cli_values, max_size=2),
    force_opts=st.dictionaries(cli_names, cli_values, max_size=2),
    two_libs=st.booleans(),
)
def test_real_program_sees_exactly_the_planned_environment(
    programs: Programs,
    tmp_path_factory: pytest.TempPathFactory,
    envs: list[list[bytes]],
    env_opts: dict[str, str],
    force_opts: dict[str, str],
    two_libs: bool,
) -> None:
    """A real program exec'd under vgpu-launch prints exactly the environment planned for it."""
    tmp = tmp_path_factory.mktemp("diff")
    libs = [programs.librobustmark]
    if two_libs:
        second = Path(programs.dir) / "librobustmark.so"  # the same file twice: merged once
        libs.append(str(second))
    args: list[str] = []
    for lib in libs:
        args += ["--preload", lib]
    for k, v in env_opts.items():
        args += ["--env", f"{k}={v}"]
    for k, v in force_opts.items():
        args += ["--force-env", f"{k}={v}"]
    pairs: list[str] = []
    for i, env in enumerate(envs):
        _envfile(tmp / f"env{i}", env)
        pairs += [str(tmp / f"env{i}"), str(tmp / f"out{i}")]
    run = launch.run([*args, "--", programs.rtool, "execenv", programs.rprobe, *pairs], timeout=120)
    assert run.returncode == 0, run.describe()
    cfg = Config(preload=libs, env=dict(env_opts), force_env=dict(force_opts))
    pol = cfg.policy()
    for i, env in enumerate(envs):
        got = (tmp / f"out{i}").read_bytes().split(b"\0")
        assert got[-1] == b""
        expected = apply(env, plan(pol, env, exe=programs.rprobe))
        assert got[:-1] == expected, (env[:50], got[:50], expected[:50])
    assert run.end["counts"]["failed"] == 0


def test_differential_harness_sees_a_plain_run(programs: Programs, tmp_path: Path) -> None:
    """A control for the harness itself: without vgpu-launch the program prints exactly the
    environment it was given."""
    env = [b"A=1", b"", b"noequals", b"LD_PRELOAD", b"B=\xff\x01"]
    _envfile(tmp_path / "e", env)
    subprocess.run(
        [programs.rtool, "execenv", programs.rprobe, str(tmp_path / "e"), str(tmp_path / "o")],
        check=True,
        timeout=30,
    )
    assert (tmp_path / "o").read_bytes().split(b"\0")[:-1] == env
