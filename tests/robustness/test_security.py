"""Preload libraries and configuration files that someone else could change are refused
(vgpu_launch/security.py, docs/security.md).

End to end: vgpu-launch exits 2 with one line naming the offending path, its mode and owner, and
starts nothing; the override (--allow-insecure, VGPU_LAUNCH_ALLOW_INSECURE=1, allow_insecure =
true in a configuration file that is itself safe) lets it run. Unit tests cover the path walk
(symbolic links, sticky directories, groups, ACLs, "..") on trees made here.
"""

from __future__ import annotations

import errno
import os
import pwd
import shutil
import struct
from pathlib import Path

import pytest
from support import launch
from support.build import Programs

from vgpu_launch import security
from vgpu_launch.errors import ConfigError

NOBODY = pwd.getpwnam("nobody").pw_uid
NOGROUP = pwd.getpwnam("nobody").pw_gid  # nobody's own group: nobody is in it

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, setpriv)")


def lib_in(
    programs: Programs,
    directory: Path,
    name: str = "librobustmark.so",
    mode: int = 0o644,
    owner: int = 0,
    group: int = 0,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    shutil.copy(programs.librobustmark, path)
    os.chown(path, owner, group)
    path.chmod(mode)
    return path


def refused(
    programs: Programs,
    args: list[str],
    *,
    env: dict[str, str | None] | None = None,
    user: str | None = None,
    tmp: Path,
) -> str:
    ran = tmp / "ran"
    run = launch.run(
        [*args, "--", programs.rprobe, "--touch", str(ran)], env=env, user=user, log_format=""
    )
    assert run.returncode == 2, run.describe()
    (line,) = run.stderr.splitlines()
    assert line.startswith("vgpu-launch: refusing "), line
    assert not ran.exists()
    return line


def accepted(
    programs: Programs,
    args: list[str],
    *,
    env: dict[str, str | None] | None = None,
    user: str | None = None,
) -> launch.LaunchResult:
    run = launch.run([*args, "--", programs.rprobe], env=env, user=user)
    assert run.returncode == 0, run.describe()
    assert "marker=1" in run.stdout, run.describe()
    return run


# ---- preload libraries ---------------------------------------------------------------------


def test_world_writable_directory(programs: Programs, pub: Path) -> None:
    """A preload library in a world-writable directory is refused, naming the directory."""
    d = pub / "open"
    lib = lib_in(programs, d)
    d.chmod(0o777)
    line = refused(programs, ["--preload", str(lib)], tmp=pub)
    assert f"directory {d} (mode 0777, owner root:root) is writable by every user" in line
    assert "--allow-insecure" in line and "(from command line)" in line


def test_world_writable_file(programs: Programs, pub: Path) -> None:
    """A world-writable preload library is refused, naming its mode and owner."""
    lib = lib_in(programs, pub / "d", mode=0o666)
    line = refused(programs, ["--preload", str(lib)], tmp=pub)
    assert f"file {lib} (mode 0666, owner root:root) is writable by every user" in line


def test_group_writable_by_a_group_with_other_members(programs: Programs, pub: Path) -> None:
    """A library writable by a group with other members is refused."""
    lib = lib_in(programs, pub / "d", mode=0o664, group=NOGROUP)
    line = refused(programs, ["--preload", str(lib)], tmp=pub)
    assert "is writable by group" in line and "other members" in line


def test_group_writable_by_roots_own_group_is_fine(programs: Programs, pub: Path) -> None:
    """A library writable only by root's own group (no other members) is accepted."""
    if security._group_untrusted(0, {0}):
        pytest.skip("group root has members other than root here")
    lib = lib_in(programs, pub / "d", mode=0o664, group=0)
    accepted(programs, ["--preload", str(lib)])


def test_file_owned_by_another_user(programs: Programs, pub: Path) -> None:
    """A preload library owned by another user is refused."""
    lib = lib_in(programs, pub / "d", owner=NOBODY)
    line = refused(programs, ["--preload", str(lib)], tmp=pub)
    assert f"file {lib} (mode 0644, owner nobody:root) is owned by nobody, not root" in line


def test_directory_owned_by_another_user(programs: Programs, pub: Path) -> None:
    """A preload library in a directory owned by another user is refused."""
    d = pub / "theirs"
    lib = lib_in(programs, d)
    os.chown(d, NOBODY, 0)
    line = refused(programs, ["--preload", str(lib)], tmp=pub)
    assert f"directory {d} (mode 0755, owner nobody:root) is owned by nobody" in line


def test_sticky_directory_with_a_root_owned_entry_is_fine(programs: Programs, pub: Path) -> None:
    """A root-owned library in a sticky world-writable directory is accepted."""
    d = pub / "tmp-like"
    lib = lib_in(programs, d)
    d.chmod(0o1777)
    accepted(programs, ["--preload", str(lib)])


def test_sticky_directory_with_an_entry_owned_by_another_user(
    programs: Programs, pub: Path
) -> None:
    """In a sticky directory, an entry owned by another user on the path is refused."""
    d = pub / "tmp-like"
    d.mkdir()
    d.chmod(0o1777)
    sub = d / "theirs"
    lib = lib_in(programs, sub)
    os.chown(sub, NOBODY, 0)
    line = refused(programs, ["--preload", str(lib)], tmp=pub)
    assert f"directory {sub}" in line and "sticky" in line


def test_symlink_to_an_insecure_place(programs: Programs, pub: Path) -> None:
    """A symbolic link from a safe place into an unsafe one is refused, naming both."""
    bad = pub / "bad"
    real = lib_in(programs, bad)
    bad.chmod(0o777)
    (pub / "safe").mkdir()
    link = pub / "safe" / "librobustmark.so"
    link.symlink_to(real)
    line = refused(programs, ["--preload", str(link)], tmp=pub)
    assert f"refusing preload library {link}" in line and f"directory {bad}" in line


def test_symlink_in_a_sticky_directory_owned_by_another_user(programs: Programs, pub: Path) -> None:
    """A link that another user owns in a sticky directory is refused."""
    real = lib_in(programs, pub / "safe")
    d = pub / "tmp-like"
    d.mkdir()
    d.chmod(0o1777)
    link = d / "librobustmark.so"
    link.symlink_to(real)
    os.chown(link, NOBODY, 0, follow_symlinks=False)
    line = refused(programs, ["--preload", str(link)], tmp=pub)
    assert f"symbolic link {link}" in line and "owned by nobody" in line


def test_symlink_chain_between_safe_places(programs: Programs, pub: Path) -> None:
    """A chain of links between safe places is accepted and the library loads."""
    real = lib_in(programs, pub / "a" / "b")
    (pub / "c").mkdir()
    (pub / "c" / "lib.so").symlink_to("../a/b/librobustmark.so")
    (pub / "c" / "alias.so").symlink_to(pub / "c" / "lib.so")
    run = accepted(programs, ["--preload", str(pub / "c" / "alias.so")])
    assert real.exists() and run.end["counts"]["failed"] == 0


def _set_acl_user_write(path: Path, uid: int) -> None:
    # POSIX ACL xattr v2: (tag, perm, id) entries, sorted by tag then id.
    entries = [
        (0x01, 6, 0xFFFFFFFF),
        (0x02, 6, uid),
        (0x04, 4, 0xFFFFFFFF),
        (0x10, 6, 0xFFFFFFFF),
        (0x20, 4, 0xFFFFFFFF),
    ]
    raw = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    try:
        os.setxattr(path, "system.posix_acl_access", raw)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            pytest.skip("no POSIX ACLs on this file system")
        raise


def test_acl_granting_write_to_another_user(programs: Programs, pub: Path) -> None:
    """An ACL that lets another user write the library is refused."""
    lib = lib_in(programs, pub / "d")
    _set_acl_user_write(lib, NOBODY)
    line = refused(programs, ["--preload", str(lib)], tmp=pub)
    assert "writable by user nobody (ACL)" in line


def test_lib_token_checks_the_expanded_file(programs: Programs, pub: Path) -> None:
    """A $LIB path is checked where ld.so will look (the expanded directory)."""
    from vgpu_launch.diagnostics import libcheck

    values = libcheck.token_values(8)
    if values is None:
        pytest.skip("no 64-bit loader")
    d = pub / values[0]
    lib_in(programs, d)
    d.chmod(0o777)
    line = refused(programs, ["--preload", str(pub / "$LIB" / "librobustmark.so")], tmp=pub)
    assert f"directory {d}" in line


def test_origin_token_is_refused_unless_allowed(programs: Programs, pub: Path) -> None:
    """$ORIGIN (any program's directory) is refused unless insecure files are allowed."""
    line = refused(programs, ["--preload", "$ORIGIN/libshim.so"], tmp=pub)
    assert "$ORIGIN" in line
    run = launch.run(
        ["--allow-insecure", "--preload", "$ORIGIN/librobustmark.so", "--", programs.rprobe]
    )
    # rprobe lives next to librobustmark.so: $ORIGIN finds it.
    assert run.returncode == 0 and "marker=1" in run.stdout, run.describe()


@pytest.mark.parametrize("how", ["--allow-insecure", "VGPU_LAUNCH_ALLOW_INSECURE=1", "file"])
def test_override(programs: Programs, pub: Path, how: str) -> None:
    """Each form of the override lets an insecure library be used."""
    d = pub / "open"
    lib = lib_in(programs, d)
    d.chmod(0o777)
    args = ["--preload", str(lib)]
    env: dict[str, str | None] = {}
    if how.startswith("--"):
        args.insert(0, how)
    elif how == "file":
        conf = pub / "safe.conf"
        conf.write_text("allow_insecure = true\n")
        args = ["--config", str(conf), *args]
    else:
        env["VGPU_LAUNCH_ALLOW_INSECURE"] = "1"
    accepted(programs, args, env=env)


# ---- the configuration file -------------------------------------------------------------------


def _conf(directory: Path, text: str, mode: int = 0o644, owner: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "vgpu-launch.conf"
    path.write_text(text)
    os.chown(path, owner, 0)
    path.chmod(mode)
    return path


@pytest.mark.parametrize(
    "flaw", ["world-writable file", "world-writable directory", "owned by nobody"]
)
def test_insecure_configuration_file(programs: Programs, pub: Path, flaw: str) -> None:
    """A configuration file others could change is refused (option or variable)."""
    d = pub / "etc"
    conf = _conf(
        d,
        f'preload = ["{programs.librobustmark}"]\n',
        mode=0o666 if flaw == "world-writable file" else 0o644,
        owner=NOBODY if flaw == "owned by nobody" else 0,
    )
    if flaw == "world-writable directory":
        d.chmod(0o777)
    line = refused(programs, ["--config", str(conf)], tmp=pub)
    assert f"refusing configuration file {conf}" in line
    line = refused(programs, [], env={"VGPU_LAUNCH_CONFIG": str(conf)}, tmp=pub)
    assert f"refusing configuration file {conf}" in line


def test_insecure_configuration_file_cannot_allow_itself(programs: Programs, pub: Path) -> None:
    """An insecure configuration file cannot switch the check off itself."""
    conf = _conf(
        pub / "etc", f'preload = ["{programs.librobustmark}"]\nallow_insecure = true\n', mode=0o666
    )
    line = refused(programs, ["--config", str(conf)], tmp=pub)
    assert "mode 0666" in line


@pytest.mark.parametrize("how", ["--allow-insecure", "VGPU_LAUNCH_ALLOW_INSECURE=1"])
def test_insecure_configuration_file_accepted_from_above(
    programs: Programs, pub: Path, how: str
) -> None:
    """The override from the command line or environment accepts an insecure file."""
    conf = _conf(pub / "etc", f'preload = ["{programs.librobustmark}"]\n', mode=0o666)
    args = ["--config", str(conf)]
    env: dict[str, str | None] = {}
    if how.startswith("--"):
        args.insert(0, how)
    else:
        env["VGPU_LAUNCH_ALLOW_INSECURE"] = "1"
    accepted(programs, args, env=env)


def test_safe_file_pointing_at_an_insecure_library(programs: Programs, pub: Path) -> None:
    """A safe configuration file naming an insecure library: the library is refused."""
    d = pub / "open"
    lib = lib_in(programs, d)
    d.chmod(0o777)
    conf = _conf(pub / "etc", f'preload = ["{lib}"]\n')
    line = refused(programs, ["--config", str(conf)], tmp=pub)
    assert f"(from file {conf})" in line and f"directory {d}" in line


# ---- running as a service user ----------------------------------------------------------------


def test_service_user_may_own_its_files(programs: Programs, pub: Path) -> None:
    """Run as a service user, vgpu-launch accepts a library that user owns."""
    d = pub / "svc"
    lib = lib_in(programs, d, owner=NOBODY)
    os.chown(d, NOBODY, 0)
    accepted(programs, ["--preload", str(lib)], user="nobody")


def test_service_user_refuses_a_third_users_file(programs: Programs, pub: Path) -> None:
    """Run as a service user, a library a third user owns is refused."""
    third = 4242
    assert not any(p.pw_uid == third for p in pwd.getpwall())
    lib = lib_in(programs, pub / "d", owner=third)
    line = refused(programs, ["--preload", str(lib)], user="nobody", tmp=pub)
    assert "owned by 4242, not root or nobody" in line
    assert "run code as nobody" in line


# ---- unit tests of the walk -------------------------------------------------------------------


def test_walk_follows_dotdot_and_relative_links(pub: Path) -> None:
    """The walk follows '..' and relative links, and finds a writable directory on the way."""
    (pub / "a" / "b").mkdir(parents=True)
    target = pub / "a" / "f"
    target.write_text("x")
    (pub / "a" / "b" / "up").symlink_to("../f")
    assert security.find_problem(str(pub / "a" / "b" / ".." / "b" / "up"), {0}) is None
    (pub / "a").chmod(0o777)
    found = security.find_problem(str(pub / "a" / "b" / "up"), {0})
    assert found is not None and found.path == str(pub / "a")


def test_walk_symlink_loop_raises(pub: Path) -> None:
    """A symbolic link loop ends the walk with an error, not a hang."""
    (pub / "x").symlink_to("y")
    (pub / "y").symlink_to("x")
    with pytest.raises(OSError):
        security.find_problem(str(pub / "x"), {0})


def test_check_open_notices_a_replaced_file(pub: Path) -> None:
    """A file replaced between its check and its opening is refused."""
    a = pub / "a.conf"
    a.write_text("x")
    b = pub / "b.conf"
    b.write_text("y")
    with open(b, "rb") as f, pytest.raises(ConfigError, match="replaced"):
        security.check_open(str(a), f.fileno(), "configuration file")


def test_allow_insecure_accepts_what_is_refused_without_it(pub: Path) -> None:
    """With allow_insecure a world-writable file passes the check that refuses it without."""
    f = pub / "f"
    f.write_text("x")
    f.chmod(0o666)
    with pytest.raises(ConfigError, match="mode 0666"):
        security.check(str(f), "preload library")
    security.check(str(f), "preload library", allow_insecure=True)
