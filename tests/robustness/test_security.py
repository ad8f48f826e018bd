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
import robustlib as rl

from vgpu_launch import security
from vgpu_launch.errors import ConfigError

FAST = rl.FAST
NOBODY = pwd.getpwnam("nobody").pw_uid
NOGROUP = pwd.getpwnam("nobody").pw_gid  # nobody's own group: nobody is in it

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, setpriv)")




def lib_in(built: rl.Built, directory: Path, name: str = "librobustmark.so", mode: int = 0o644,
           owner: int = 0, group: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    shutil.copy(built.lib, path)
    os.chown(path, owner, group)
    path.chmod(mode)
    return path


def refused(built: rl.Built, args: list[str], *, env: dict[str, str | None] | None = None,
            user: str | None = None, tmp: Path) -> str:
    ran = tmp / "ran"
    run = rl.launch(built, [*args, "--", built.rprobe, "--touch", str(ran)],
                    env={**({} if user else FAST), **(env or {})}, user=user, log_format="")
    assert run.returncode == 2, run.describe()
    (line,) = run.stderr.splitlines()
    assert line.startswith("vgpu-launch: refusing "), line
    assert not ran.exists()
    return line


def accepted(built: rl.Built, args: list[str], *, env: dict[str, str | None] | None = None,
             user: str | None = None) -> rl.Run:
    run = rl.launch(built, [*args, "--", built.rprobe],
                    env={**({} if user else FAST), **(env or {})}, user=user)
    assert run.returncode == 0, run.describe()
    assert "marker=1" in run.out, run.describe()
    return run


# ---- preload libraries ---------------------------------------------------------------------


def test_world_writable_directory(built: rl.Built, pub: Path) -> None:
    d = pub / "open"
    lib = lib_in(built, d)
    d.chmod(0o777)
    line = refused(built, ["--preload", str(lib)], tmp=pub)
    assert f"directory {d} (mode 0777, owner root:root) is writable by every user" in line
    assert "--allow-insecure" in line and "(from command line)" in line


def test_world_writable_file(built: rl.Built, pub: Path) -> None:
    lib = lib_in(built, pub / "d", mode=0o666)
    line = refused(built, ["--preload", str(lib)], tmp=pub)
    assert f"file {lib} (mode 0666, owner root:root) is writable by every user" in line


def test_group_writable_by_a_group_with_other_members(built: rl.Built, pub: Path) -> None:
    lib = lib_in(built, pub / "d", mode=0o664, group=NOGROUP)
    line = refused(built, ["--preload", str(lib)], tmp=pub)
    assert "is writable by group" in line and "other members" in line


def test_group_writable_by_roots_own_group_is_fine(built: rl.Built, pub: Path) -> None:
    if security._group_untrusted(0, {0}):
        pytest.skip("group root has members other than root here")
    lib = lib_in(built, pub / "d", mode=0o664, group=0)
    accepted(built, ["--preload", str(lib)])


def test_file_owned_by_another_user(built: rl.Built, pub: Path) -> None:
    lib = lib_in(built, pub / "d", owner=NOBODY)
    line = refused(built, ["--preload", str(lib)], tmp=pub)
    assert f"file {lib} (mode 0644, owner nobody:root) is owned by nobody, not root" in line


def test_directory_owned_by_another_user(built: rl.Built, pub: Path) -> None:
    d = pub / "theirs"
    lib = lib_in(built, d)
    os.chown(d, NOBODY, 0)
    line = refused(built, ["--preload", str(lib)], tmp=pub)
    assert f"directory {d} (mode 0755, owner nobody:root) is owned by nobody" in line


def test_sticky_directory_with_a_root_owned_entry_is_fine(built: rl.Built, pub: Path) -> None:
    d = pub / "tmp-like"
    lib = lib_in(built, d)
    d.chmod(0o1777)
    accepted(built, ["--preload", str(lib)])


def test_sticky_directory_with_an_entry_owned_by_another_user(
    built: rl.Built, pub: Path
) -> None:
    d = pub / "tmp-like"
    d.mkdir()
    d.chmod(0o1777)
    sub = d / "theirs"
    lib = lib_in(built, sub)
    os.chown(sub, NOBODY, 0)
    line = refused(built, ["--preload", str(lib)], tmp=pub)
    assert f"directory {sub}" in line and "sticky" in line


def test_symlink_to_an_insecure_place(built: rl.Built, pub: Path) -> None:
    bad = pub / "bad"
    real = lib_in(built, bad)
    bad.chmod(0o777)
    (pub / "safe").mkdir()
    link = pub / "safe" / "librobustmark.so"
    link.symlink_to(real)
    line = refused(built, ["--preload", str(link)], tmp=pub)
    assert f"refusing preload library {link}" in line and f"directory {bad}" in line


def test_symlink_in_a_sticky_directory_owned_by_another_user(built: rl.Built, pub: Path) -> None:
    real = lib_in(built, pub / "safe")
    d = pub / "tmp-like"
    d.mkdir()
    d.chmod(0o1777)
    link = d / "librobustmark.so"
    link.symlink_to(real)
    os.chown(link, NOBODY, 0, follow_symlinks=False)
    line = refused(built, ["--preload", str(link)], tmp=pub)
    assert f"symbolic link {link}" in line and "owned by nobody" in line


def test_symlink_chain_between_safe_places(built: rl.Built, pub: Path) -> None:
    real = lib_in(built, pub / "a" / "b")
    (pub / "c").mkdir()
    (pub / "c" / "lib.so").symlink_to("../a/b/librobustmark.so")
    (pub / "c" / "alias.so").symlink_to(pub / "c" / "lib.so")
    run = accepted(built, ["--preload", str(pub / "c" / "alias.so")])
    assert real.exists() and run.end["counts"]["failed"] == 0


def _set_acl_user_write(path: Path, uid: int) -> None:
    # POSIX ACL xattr v2: (tag, perm, id) entries, sorted by tag then id.
    entries = [(0x01, 6, 0xFFFFFFFF), (0x02, 6, uid), (0x04, 4, 0xFFFFFFFF),
               (0x10, 6, 0xFFFFFFFF), (0x20, 4, 0xFFFFFFFF)]
    raw = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    try:
        os.setxattr(path, "system.posix_acl_access", raw)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            pytest.skip("no POSIX ACLs on this file system")
        raise


def test_acl_granting_write_to_another_user(built: rl.Built, pub: Path) -> None:
    lib = lib_in(built, pub / "d")
    _set_acl_user_write(lib, NOBODY)
    line = refused(built, ["--preload", str(lib)], tmp=pub)
    assert "writable by user nobody (ACL)" in line


def test_lib_token_checks_the_expanded_file(built: rl.Built, pub: Path) -> None:
    from vgpu_launch.diagnostics import libcheck

    values = libcheck.token_values(8)
    if values is None:
        pytest.skip("no 64-bit loader")
    d = pub / values[0]
    lib_in(built, d)
    d.chmod(0o777)
    line = refused(built, ["--preload", str(pub / "$LIB" / "librobustmark.so")], tmp=pub)
    assert f"directory {d}" in line


def test_origin_token_is_refused_unless_allowed(built: rl.Built, pub: Path) -> None:
    line = refused(built, ["--preload", "$ORIGIN/libshim.so"], tmp=pub)
    assert "$ORIGIN" in line
    run = rl.launch(built, ["--allow-insecure", "--preload", "$ORIGIN/librobustmark.so", "--",
                            built.rprobe], env=FAST)
    # rprobe lives next to librobustmark.so: $ORIGIN finds it.
    assert run.returncode == 0 and "marker=1" in run.out, run.describe()


@pytest.mark.parametrize("how", ["--allow-insecure", "VGPU_LAUNCH_ALLOW_INSECURE=1", "file"])
def test_override(built: rl.Built, pub: Path, how: str) -> None:
    d = pub / "open"
    lib = lib_in(built, d)
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
    accepted(built, args, env=env)


# ---- the configuration file -------------------------------------------------------------------


def _conf(directory: Path, text: str, mode: int = 0o644, owner: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "vgpu-launch.conf"
    path.write_text(text)
    os.chown(path, owner, 0)
    path.chmod(mode)
    return path


@pytest.mark.parametrize("flaw", ["world-writable file", "world-writable directory",
                                  "owned by nobody"])
def test_insecure_configuration_file(built: rl.Built, pub: Path, flaw: str) -> None:
    d = pub / "etc"
    conf = _conf(d, f'preload = ["{built.lib}"]\n',
                 mode=0o666 if flaw == "world-writable file" else 0o644,
                 owner=NOBODY if flaw == "owned by nobody" else 0)
    if flaw == "world-writable directory":
        d.chmod(0o777)
    line = refused(built, ["--config", str(conf)], tmp=pub)
    assert f"refusing configuration file {conf}" in line
    line = refused(built, [], env={"VGPU_LAUNCH_CONFIG": str(conf)}, tmp=pub)
    assert f"refusing configuration file {conf}" in line


def test_insecure_configuration_file_cannot_allow_itself(built: rl.Built, pub: Path) -> None:
    conf = _conf(pub / "etc", f'preload = ["{built.lib}"]\nallow_insecure = true\n', mode=0o666)
    line = refused(built, ["--config", str(conf)], tmp=pub)
    assert "mode 0666" in line


@pytest.mark.parametrize("how", ["--allow-insecure", "VGPU_LAUNCH_ALLOW_INSECURE=1"])
def test_insecure_configuration_file_accepted_from_above(
    built: rl.Built, pub: Path, how: str
) -> None:
    conf = _conf(pub / "etc", f'preload = ["{built.lib}"]\n', mode=0o666)
    args = ["--config", str(conf)]
    env: dict[str, str | None] = {}
    if how.startswith("--"):
        args.insert(0, how)
    else:
        env["VGPU_LAUNCH_ALLOW_INSECURE"] = "1"
    accepted(built, args, env=env)


def test_safe_file_pointing_at_an_insecure_library(built: rl.Built, pub: Path) -> None:
    d = pub / "open"
    lib = lib_in(built, d)
    d.chmod(0o777)
    conf = _conf(pub / "etc", f'preload = ["{lib}"]\n')
    line = refused(built, ["--config", str(conf)], tmp=pub)
    assert f"(from file {conf})" in line and f"directory {d}" in line


# ---- running as a service user ----------------------------------------------------------------


def test_service_user_may_own_its_files(built: rl.Built, pub: Path) -> None:
    d = pub / "svc"
    lib = lib_in(built, d, owner=NOBODY)
    os.chown(d, NOBODY, 0)
    accepted(built, ["--preload", str(lib)], user="nobody")


def test_service_user_refuses_a_third_users_file(built: rl.Built, pub: Path) -> None:
    third = 4242
    assert not any(p.pw_uid == third for p in pwd.getpwall())
    lib = lib_in(built, pub / "d", owner=third)
    line = refused(built, ["--preload", str(lib)], user="nobody", tmp=pub)
    assert "owned by 4242, not root or nobody" in line
    assert "run code as nobody" in line


# ---- unit tests of the walk -------------------------------------------------------------------


def test_walk_follows_dotdot_and_relative_links(pub: Path) -> None:
    (pub / "a" / "b").mkdir(parents=True)
    target = pub / "a" / "f"
    target.write_text("x")
    (pub / "a" / "b" / "up").symlink_to("../f")
    assert security.find_problem(str(pub / "a" / "b" / ".." / "b" / "up"), {0}) is None
    (pub / "a").chmod(0o777)
    found = security.find_problem(str(pub / "a" / "b" / "up"), {0})
    assert found is not None and found.path == str(pub / "a")


def test_walk_symlink_loop_raises(pub: Path) -> None:
    (pub / "x").symlink_to("y")
    (pub / "y").symlink_to("x")
    with pytest.raises(OSError):
        security.find_problem(str(pub / "x"), {0})


def test_check_open_notices_a_replaced_file(pub: Path) -> None:
    a = pub / "a.conf"
    a.write_text("x")
    b = pub / "b.conf"
    b.write_text("y")
    with open(b, "rb") as f, pytest.raises(ConfigError, match="replaced"):
        security.check_open(str(a), f.fileno(), "configuration file")


def test_overridden_problems_are_recorded(pub: Path) -> None:
    f = pub / "f"
    f.write_text("x")
    f.chmod(0o666)
    before = len(security.overridden)
    security.check(str(f), "preload library", allow_insecure=True)
    assert len(security.overridden) == before + 1
    assert "mode 0666" in security.overridden[-1]
