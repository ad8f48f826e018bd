"""``vgpu-launch release PID [PID...] [--tree]``: the channel to a running vgpu-launch.

Every vgpu-launch that traces listens on the abstract unix socket ``@vgpu-launch/<its pid>``:
no file, no configuration, nothing left behind. Abstract names live in the network namespace,
so the client must run in the same one (a unit with ``PrivateNetwork=yes`` or a container has
its own: ``nsenter -t PID -n vgpu-launch release ...``). Both sides check each other with
``SO_PEERCRED``: the server answers only root and its own user; the client talks only to the
process whose pid the name carries, so nobody can stand in for a vgpu-launch by taking its name
first.

The client finds the vgpu-launch of a process through ``/proc/PID/status``: ``TracerPid`` is
the tracer *thread*, whose ``Tgid`` is the vgpu-launch process.

Protocol: one JSON line each way. Request ``{"op": "release", "pids": [...], "tree": bool}``;
answer ``{"ok": true, "released": {"PID": threads}, "not_traced": [...], "gone": [...],
"pending": [...]}`` or ``{"ok": false, "error": "..."}``.

Exit status of ``release``: 0 every PID was released; 1 one was not (not traced by a
vgpu-launch, refused, not reached); 2 bad usage or no such process.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import Any

from . import procfs
from .errors import EXIT_PROBLEM_FOUND, EXIT_USAGE, LaunchError
from .launchers import launcher_args
from .options import subcommand_parser
from .trace.release import Job, Releaser

EXIT_OK = 0
MAX_REQUEST = 64 * 1024
# The answer waits this long for the tracer to detach every thread; a thread in an
# uninterruptible sleep is detached when it wakes, and reported "pending" meanwhile.
RELEASE_WAIT = 10.0
CLIENT_TIMEOUT = RELEASE_WAIT + 5.0
_CRED = struct.Struct("=iII")  # struct ucred: pid, uid, gid


def address(pid: int) -> bytes:
    """The abstract socket name of vgpu-launch ``pid`` (``@vgpu-launch/PID`` in ss -x)."""
    return b"\0vgpu-launch/" + str(pid).encode()


def peer(conn: socket.socket) -> tuple[int, int, int]:
    return _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError("request too long")
    return data.partition(b"\n")[0]


def _send(conn: socket.socket, obj: dict[str, Any]) -> None:
    conn.sendall(json.dumps(obj).encode() + b"\n")


def _command(pid: int) -> str:
    """The command line of ``pid``, as ``vgpu-launch ARGS`` for a vgpu-launch process."""
    argv = procfs.cmdline(pid)
    if argv is None:
        return "?"
    args = launcher_args(argv)
    if args is None and argv and argv[-3:-1] == ["bin/..", "release"]:
        args = argv[-2:]  # bin/vgpu-launch from a checkout: "-c CODE CHECKOUT release PID"
    return " ".join(argv if args is None else ["vgpu-launch", *args])


# ---------------------------------------------------------------------------------------------
# the server, in vgpu-launch


class Server:
    """Serves release requests on ``@vgpu-launch/<pid>``, one connection at a time."""

    def __init__(
        self,
        releaser: Releaser,
        log: Any,
        *,
        refuse: bool,
        wait: float = RELEASE_WAIT,
    ) -> None:
        self.releaser = releaser
        self.log = log
        self.refuse = refuse  # strict mode without strict_allow_release
        self.wait = wait
        self.uid = os.geteuid()
        self.name = address(os.getpid())
        self.sock: socket.socket | None = None

    def start(self) -> str | None:
        """Listen; an error message (logged by the caller) if that cannot be done."""
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        except OSError as exc:
            return (
                f"no unix socket ({exc.strerror}): RestrictAddressFamilies= or a seccomp "
                "profile without AF_UNIX"
            )
        try:
            sock.bind(self.name)
            sock.listen(8)
        except OSError as exc:
            sock.close()
            return f"cannot listen on @{self.name[1:].decode()} ({exc.strerror})"
        self.sock = sock
        threading.Thread(target=self._run, name="release-server", daemon=True).start()
        return None

    def _run(self) -> None:
        assert self.sock is not None
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                try:
                    conn.settimeout(CLIENT_TIMEOUT)
                    self._serve(conn)
                except Exception:  # one bad client must not end the server
                    self.log.warning("release-request-failed", traceback=traceback.format_exc())

    def _serve(self, conn: socket.socket) -> None:
        pid, uid, _gid = peer(conn)
        by = {"uid": uid, "pid": pid, "command": _command(pid)}
        try:
            req = json.loads(_read_line(conn))
            pids = [int(p) for p in req["pids"]]
            tree = bool(req.get("tree", False))
            if req.get("op") != "release" or not pids or any(p <= 0 for p in pids):
                raise ValueError(req)
        except (ValueError, KeyError, TypeError):
            _send(conn, {"ok": False, "error": "malformed request"})
            return
        if uid not in (0, self.uid):
            self.log.warning(
                "release-refused",
                pids=pids,
                by=by,
                reason=f"uid {uid} is neither root nor vgpu-launch's user (uid {self.uid})",
            )
            _send(
                conn,
                {
                    "ok": False,
                    "error": f"only root or uid {self.uid} (the user "
                    "vgpu-launch runs as) may release its processes",
                },
            )
            return
        if self.refuse:
            self.log.error(
                "release-refused",
                pids=pids,
                by=by,
                reason="strict mode",
                message="strict mode: release is not allowed (start vgpu-launch with "
                "--strict-allow-release, or strict_allow_release = true, to allow it)",
            )
            _send(
                conn,
                {
                    "ok": False,
                    "error": "strict mode: release is not allowed here "
                    "(vgpu-launch was not started with --strict-allow-release)",
                },
            )
            return
        if self.releaser.closed:
            _send(
                conn,
                {
                    "ok": False,
                    "error": "vgpu-launch no longer traces this tree "
                    "(CMD has exited, or the tracer failed)",
                },
            )
            return
        job = Job(pids, "request", by, tree=tree)
        self.releaser.submit(job)
        job.done.wait(self.wait)
        done = set(job.released) | set(job.not_traced) | set(job.gone)
        _send(
            conn,
            {
                "ok": True,
                "released": {str(p): n for p, n in job.released.items()},
                "not_traced": job.not_traced,
                "gone": job.gone,
                "pending": [p for p in job.pids if p not in done],
            },
        )


# ---------------------------------------------------------------------------------------------
# the client: vgpu-launch release


def _describe(pid: int) -> str:
    cmd = _command(pid)
    return f"{pid} ({cmd[:60]}{'...' if len(cmd) > 60 else ''})"


def request(
    tracer: int, pids: Sequence[int], tree: bool, timeout: float = CLIENT_TIMEOUT
) -> dict[str, Any]:
    """Ask vgpu-launch ``tracer``; raise OSError or LaunchError when it cannot be asked."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        sock.connect(address(tracer))
        holder = peer(sock)[0]
        if holder != tracer:
            raise LaunchError(
                f"@vgpu-launch/{tracer} is held by pid {holder} ({procfs.comm(holder)}), not "
                f"by vgpu-launch {tracer}: not asking it",
                EXIT_PROBLEM_FOUND,
            )
        _send(sock, {"op": "release", "pids": list(pids), "tree": tree})
        line = _read_line(sock)
    if not line:
        raise LaunchError(
            f"vgpu-launch {tracer} closed the connection without answering", EXIT_PROBLEM_FOUND
        )
    answer: dict[str, Any] = json.loads(line)
    return answer


def main(args: Sequence[str]) -> int:
    ns = subcommand_parser("release").parse_args(list(args))
    pids: list[int] = []
    for word in ns.pids:
        if not word.isdigit() or int(word) <= 0:
            raise LaunchError(f"release: {word!r} is not a process id", EXIT_USAGE)
        if not os.path.exists(f"/proc/{word}"):
            raise LaunchError(f"release: no process {word}", EXIT_USAGE)
        pids.append(int(word))
    code = EXIT_OK
    by_tracer: dict[int, list[int]] = {}
    for pid in pids:
        tid = procfs.status_field(pid, "TracerPid") or "0"
        tracer = procfs.tgid_of(int(tid)) if tid.isdigit() and tid != "0" else None
        if tracer is None:
            print(
                f"not traced: {_describe(pid)}: no tracer (already released, or not "
                "under vgpu-launch)"
            )
            code = EXIT_PROBLEM_FOUND
            continue
        by_tracer.setdefault(tracer, []).append(pid)
    for tracer, group in by_tracer.items():
        try:
            answer = request(tracer, group, ns.tree)
        except LaunchError as exc:
            sys.stderr.write(f"vgpu-launch release: {exc}\n")
            code = EXIT_PROBLEM_FOUND
            continue
        except (OSError, ValueError) as exc:
            why = getattr(exc, "strerror", None) or str(exc)
            sys.stderr.write(
                f"vgpu-launch release: cannot ask pid {tracer} ({procfs.comm(tracer)}), which "
                f"traces {', '.join(map(str, group))}: {why}. It is not a vgpu-launch (a "
                "debugger?), or one without a release channel (see its log), or it runs in "
                f"another network namespace: then run `nsenter -t {tracer} -n vgpu-launch "
                "release ...`\n"
            )
            code = EXIT_PROBLEM_FOUND
            continue
        if not answer.get("ok"):
            sys.stderr.write(
                f"vgpu-launch release: vgpu-launch {tracer} refused: {answer.get('error')}\n"
            )
            code = EXIT_PROBLEM_FOUND
            continue
        for p, threads in answer.get("released", {}).items():
            print(f"released: {_describe(int(p))}: {threads} thread{'s' if threads != 1 else ''}")
        for p in answer.get("not_traced", []):
            print(f"not traced: {_describe(p)}: vgpu-launch {tracer} does not trace it")
            if p in group:
                code = EXIT_PROBLEM_FOUND
        for p in answer.get("gone", []):
            print(f"gone: {p} exited")
            if p in group:
                code = EXIT_PROBLEM_FOUND
        for p in answer.get("pending", []):
            print(
                f"pending: {_describe(p)}: a thread has not stopped yet (uninterruptible "
                "sleep?); it is released when it does"
            )
            code = EXIT_PROBLEM_FOUND
    return code
