"""Plumbing shared by the tests/test_launcher_*.py modules (it holds no tests itself).

The launcher's behaviour is tested with real processes: small C programs compiled once per
session into a temporary directory (fixture ``lbin``), vgpu-launch started through
``bin/vgpu-launch`` (what users run; ``VGPU_LAUNCH_PYTHON`` picks the interpreter), and every
wait bounded by a deadline on an observable event (a line of output, a /proc state), never a
bare sleep. Every process a test starts is killed with its process group at the end.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

REPO = Path(__file__).resolve().parent.parent
WRAPPER = REPO / "bin" / "vgpu-launch"
PYTHON = os.environ.get("VGPU_LAUNCH_PYTHON", sys.executable)

SIGREC_C = r"""
/*
 * sigrec: record the signals it takes, in the order it takes them, and print them.
 *
 *   sigrec [-d SIG]... [-t] [-n] [-e SIG] [-T N]
 *
 * Prints "ready pid=P pgid=G sid=S" once its handlers are in place, then one line per signal
 * taken, "sig=N code=C pid=P value=V" (SA_SIGINFO handlers; value is the sigqueue value), and
 * "done n=N" when it ends: at the end of stdin or a line "q" (exit 0), or with -e SIG after
 * taking SIG. -d SIG leaves SIG at its default action (-d 20: Ctrl-Z stops it). -t: SIGTSTP as
 * less(1) does it: record it, then stop with SIGTSTP at its default action; catch it again
 * after SIGCONT. -n: do not read stdin (run until -e SIG, or a signal kills it). -T N: also run
 * N threads with every signal unblocked, so that (as in a Go program) any thread may take a
 * signal sent to the process.
 * Catches 1-31 except KILL, STOP, CHLD, and every real-time signal.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAXREC 8192
static struct { int sig, code, pid; long value; } rec[MAXREC];
static int nrec;  /* slots taken (atomically: any thread may take a signal) */
static volatile int ndone;  /* slots filled */
static volatile sig_atomic_t tstp_pending;
static int less_mode;
static int wake[2];

static void on_signal(int sig, siginfo_t *si, void *uc)
{
    int saved = errno, i = __atomic_fetch_add(&nrec, 1, __ATOMIC_SEQ_CST);
    (void)uc;
    if (i < MAXREC) {
        rec[i].sig = sig;
        rec[i].code = si->si_code;
        rec[i].pid = si->si_pid;
        rec[i].value = (long)si->si_value.sival_ptr;
    }
    __atomic_fetch_add(&ndone, 1, __ATOMIC_SEQ_CST);
    if (sig == SIGTSTP && less_mode)
        tstp_pending = 1;
    (void)!write(wake[1], "x", 1);
    errno = saved;
}

static void *idle_thread(void *arg)
{
    sigset_t none;
    (void)arg;
    sigemptyset(&none);
    pthread_sigmask(SIG_SETMASK, &none, NULL);
    for (;;)
        pause();
    return NULL;
}

static void catch(int sig)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_signal;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigfillset(&sa.sa_mask);
    if (sigaction(sig, &sa, NULL) != 0) {
        perror("sigaction");
        exit(3);
    }
}

int main(int argc, char **argv)
{
    int dflt[65] = {0};
    int use_stdin = 1, exit_on = 0, opt, printed = 0, threads = 0;
    sigset_t all, none;
    char line[256];

    while ((opt = getopt(argc, argv, "d:tne:T:")) != -1) {
        switch (opt) {
        case 'd': dflt[atoi(optarg) & 63] = 1; break;
        case 't': less_mode = 1; break;
        case 'n': use_stdin = 0; break;
        case 'e': exit_on = atoi(optarg); break;
        case 'T': threads = atoi(optarg); break;
        default: return 2;
        }
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (pipe(wake) != 0)
        return 3;
    sigfillset(&all);
    sigemptyset(&none);
    sigprocmask(SIG_BLOCK, &all, NULL);
    for (int s = 1; s < NSIG; s++) {
        if (s == SIGKILL || s == SIGSTOP || s == SIGCHLD || dflt[s & 63])
            continue;
        if (s > 31 && s < SIGRTMIN)
            continue;
        catch(s);
    }
    for (int s = 1; s < 64; s++)
        if (dflt[s])
            sigdelset(&all, s);
    sigprocmask(SIG_SETMASK, &all, NULL);
    for (int t = 0; t < threads; t++) {
        pthread_t th;
        pthread_create(&th, NULL, idle_thread, NULL);
    }
    printf("ready pid=%d pgid=%d sid=%d\n", (int)getpid(), (int)getpgrp(), (int)getsid(0));
    for (;;) {
        struct pollfd pfd[2] = {{wake[0], POLLIN, 0}, {0, POLLIN, 0}};
        int r = ppoll(pfd, use_stdin ? 2 : 1, NULL, &none);
        int stop = 0;
        char drain[64];
        if (r < 0 && errno != EINTR) {
            perror("ppoll");
            return 3;
        }
        if (r > 0 && (pfd[0].revents & POLLIN))
            (void)!read(wake[0], drain, sizeof drain);
        while (printed < __atomic_load_n(&ndone, __ATOMIC_SEQ_CST) && printed < MAXREC) {
            printf("sig=%d code=%d pid=%d value=%ld\n", rec[printed].sig, rec[printed].code,
                   rec[printed].pid, rec[printed].value);
            if (exit_on && rec[printed].sig == exit_on)
                stop = 1;
            printed++;
        }
        if (stop)
            break;
        if (tstp_pending) {
            /* like less: back to the default action, stop, catch again once continued */
            sigset_t tstp;
            tstp_pending = 0;
            signal(SIGTSTP, SIG_DFL);
            sigemptyset(&tstp);
            sigaddset(&tstp, SIGTSTP);
            raise(SIGTSTP);
            sigprocmask(SIG_UNBLOCK, &tstp, NULL);
            sigprocmask(SIG_BLOCK, &tstp, NULL);
            catch(SIGTSTP);
        }
        if (r > 0 && use_stdin && (pfd[1].revents & (POLLIN | POLLHUP))) {
            ssize_t n = read(0, line, sizeof line - 1);
            if (n <= 0 || line[0] == 'q')
                break;
        }
    }
    printf("done n=%d\n", (int)ndone);
    fflush(stdout);
    _exit(0);
}
"""

SHOWSIG_C = r"""
/*
 * showsig [LABEL]: print "LABEL ign=<SigIgn> blk=<SigBlk> cwd=<cwd> umask=<octal>" (LABEL
 * defaults to "cmd"); unless LABEL is "child", then start itself as "showsig child" (fork and
 * execve) and wait for it, so that what a child of CMD inherits is shown too. Exit 0.
 */
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    const char *label = argc > 1 ? argv[1] : "cmd";
    char line[512], ign[64] = "?", blk[64] = "?", cwd[4096];
    FILE *f = fopen("/proc/self/status", "r");
    mode_t m = umask(0);

    umask(m);
    while (f && fgets(line, sizeof line, f)) {
        if (!strncmp(line, "SigIgn:", 7))
            sscanf(line + 7, "%63s", ign);
        if (!strncmp(line, "SigBlk:", 7))
            sscanf(line + 7, "%63s", blk);
    }
    if (!getcwd(cwd, sizeof cwd))
        strcpy(cwd, "?");
    printf("%s ign=%s blk=%s cwd=%s umask=%03o\n", label, ign, blk, cwd, (unsigned)m);
    fflush(stdout);
    if (strcmp(label, "child") != 0) {
        pid_t pid = fork();
        if (pid == 0) {
            char *args[] = {argv[0], "child", NULL};
            execv("/proc/self/exe", args);
            _exit(127);
        }
        waitpid(pid, NULL, 0);
    }
    return 0;
}
"""

DIE_C = r"""
/*
 * die exit N | die signal N: exit with status N, or die of signal N at its default action.
 * Core dumps are off in this process (RLIMIT_CORE 0): a core file next to it can only be
 * someone else's.
 */
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    struct rlimit none = {0, 0};
    sigset_t set;
    int n;

    if (argc != 3)
        return 100;
    n = atoi(argv[2]);
    if (!strcmp(argv[1], "exit"))
        return n;
    setrlimit(RLIMIT_CORE, &none);
    signal(n, SIG_DFL);
    sigemptyset(&set);
    sigaddset(&set, n);
    sigprocmask(SIG_UNBLOCK, &set, NULL);
    raise(n);
    return 101;
}
"""

ORPHANS_C = r"""
/*
 * orphans N: make N orphans that exit at the same moment. N children each start a grandchild
 * and exit at once, so the grandchildren are re-parented to the nearest subreaper; every
 * grandchild blocks reading one pipe, which this process closes once the N children are
 * reaped: the N orphans then exit together. Prints "released N", then waits until no process
 * but itself has its parent (getppid()) as parent, at most 30 s, and prints
 * "left=K zombies=Z" (K such processes, Z of them zombies). Exit 0 if K is 0, else 1.
 */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void count(pid_t parent, int *left, int *zombies)
{
    DIR *d = opendir("/proc");
    struct dirent *e;
    *left = *zombies = 0;
    while (d && (e = readdir(d))) {
        char path[64], buf[1024], *p;
        FILE *f;
        int ppid;
        char state;
        if (e->d_name[0] < '0' || e->d_name[0] > '9' || atoi(e->d_name) == getpid())
            continue;
        snprintf(path, sizeof path, "/proc/%s/stat", e->d_name);
        if (!(f = fopen(path, "r")))
            continue;
        if (!fgets(buf, sizeof buf, f) || !(p = strrchr(buf, ')'))) {
            fclose(f);
            continue;
        }
        fclose(f);
        if (sscanf(p + 2, "%c %d", &state, &ppid) == 2 && ppid == parent) {
            (*left)++;
            if (state == 'Z')
                (*zombies)++;
        }
    }
    if (d)
        closedir(d);
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 100, fds[2], left = 0, zombies = 0;
    pid_t parent = getppid();
    struct timespec t0, t;

    if (pipe(fds))
        return 3;
    for (int i = 0; i < n; i++) {
        pid_t c = fork();
        if (c < 0)
            return 3;
        if (c == 0) {
            if (fork() == 0) {
                char b;
                close(fds[1]);
                (void)!read(fds[0], &b, 1);
                _exit(0);
            }
            _exit(0);
        }
    }
    close(fds[0]);
    for (int i = 0; i < n; i++)
        wait(NULL);
    close(fds[1]);
    printf("released %d\n", n);
    fflush(stdout);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        count(parent, &left, &zombies);
        clock_gettime(CLOCK_MONOTONIC, &t);
        if (left == 0 || t.tv_sec - t0.tv_sec > 30)
            break;
        usleep(10000);
    }
    printf("left=%d zombies=%d\n", left, zombies);
    return left != 0;
}
"""

LIB_C = "int vgpu_launch_test_lib_loaded = 1;\n"

PROGRAMS = {"sigrec": SIGREC_C, "showsig": SHOWSIG_C, "die": DIE_C, "orphans": ORPHANS_C}


@dataclass(frozen=True)
class Bin:
    dir: Path
    lib: Path
    sigrec: Path
    showsig: Path
    die: Path
    orphans: Path


def build(dest: Path) -> Bin:
    for name, source in PROGRAMS.items():
        src = dest / f"{name}.c"
        src.write_text(source)
        subprocess.run(["gcc", "-O1", "-Wall", "-pthread", "-o", str(dest / name), str(src)],
                       check=True, capture_output=True, timeout=120)
    (dest / "lib.c").write_text(LIB_C)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(dest / "libtest.so"),
                    str(dest / "lib.c")], check=True, capture_output=True, timeout=120)
    return Bin(dest, dest / "libtest.so", *(dest / n for n in PROGRAMS))


@pytest.fixture(scope="session")
def lbin(tmp_path_factory: pytest.TempPathFactory) -> Bin:
    if subprocess.run(["gcc", "--version"], capture_output=True).returncode != 0:
        pytest.fail("gcc is needed to build the launcher test programs (apt-get install gcc)")
    return build(tmp_path_factory.mktemp("launcher-bin"))


# ---------------------------------------------------------------------------------------------
# running vgpu-launch


def launch_argv(lib: Path | str, *cmd: str | os.PathLike[str], options: Sequence[str] = (),
                module: bool = False) -> list[str]:
    """vgpu-launch --preload LIB [OPTIONS] -- CMD...: through bin/vgpu-launch, or with
    ``module`` as ``python -m vgpu_launch`` (then PYTHONPATH must name the repository)."""
    head = [PYTHON, "-m", "vgpu_launch"] if module else [str(WRAPPER)]
    return [*head, "--preload", str(lib), "--log-format", "json", *options, "--",
            *(str(c) for c in cmd)]


def launch_env(**updates: str | None) -> dict[str, str]:
    """This environment without LD_PRELOAD and VGPU_LAUNCH_* settings, PYTHONPATH naming the
    repository (for ``python -m vgpu_launch``), updated (None removes)."""
    env = {k: v for k, v in os.environ.items()
           if k != "LD_PRELOAD"
           and not (k.startswith("VGPU_LAUNCH_") and k != "VGPU_LAUNCH_PYTHON")}
    env["PYTHONPATH"] = str(REPO)
    for k, v in updates.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T], timeout: float = 20.0,
             interval: float = 0.005) -> T:
    """Poll ``check`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) of ``pid`` from /proc, None when it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1]), int(fields[2])


def state(pid: int) -> str:
    st = proc_stat(pid)
    return st[0] if st else "gone"


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = proc_stat(int(entry))
            if st and st[1] == pid:
                out.append(int(entry))
    return out


def status_mask(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1], 16)
    raise KeyError(field)


def mask_of(*sigs: int) -> int:
    bits = 0
    for s in sigs:
        bits |= 1 << (s - 1)
    return bits


class Lines:
    """Lines of a pipe, read without blocking past a deadline."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""
        self.lines: list[str] = []
        self.seen: list[str] = []  # lines passed over by expect()
        self.eof = False

    def _fill(self, timeout: float) -> None:
        r, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not r:
            return
        chunk = os.read(self.fd, 65536)
        if not chunk:
            self.eof = True
            return
        self.buf += chunk
        *done, self.buf = self.buf.split(b"\n")
        self.lines.extend(d.decode(errors="replace") for d in done)

    def expect(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """Wait for a line (from the first unread one on) matching ``pattern``; return the
        match. Lines before it stay read."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            while self.lines:
                line = self.lines.pop(0)
                m = rx.search(line)
                if m:
                    return m
                self.seen.append(line)
            if self.eof or time.monotonic() > deadline:
                pytest.fail(f"no line matching {pattern!r} within {timeout} s; "
                            f"read: {self.seen[-20:]!r}")
            self._fill(deadline - time.monotonic())

    def rest(self, timeout: float = 20.0) -> list[str]:
        """Every line up to the end of the stream."""
        deadline = time.monotonic() + timeout
        while not self.eof and time.monotonic() < deadline:
            self._fill(deadline - time.monotonic())
        if not self.eof:
            pytest.fail(f"the stream did not end within {timeout} s")
        out, self.lines = self.lines, []
        if self.buf:
            out.append(self.buf.decode(errors="replace"))
            self.buf = b""
        return out

    def poll_lines(self, duration: float) -> list[str]:
        """What arrives within ``duration`` seconds (for checking that nothing more comes)."""
        deadline = time.monotonic() + duration
        while not self.eof and time.monotonic() < deadline:
            self._fill(deadline - time.monotonic())
        out, self.lines = self.lines, []
        return out


class Run:
    """A started vgpu-launch: ``proc`` (Popen, stdin/stdout pipes), ``out`` (its stdout's
    lines), ``err`` (a file with its stderr)."""

    def __init__(self, proc: subprocess.Popen[bytes], err: Path) -> None:
        self.proc = proc
        assert proc.stdout is not None
        self.out = Lines(proc.stdout.fileno())
        self.err = err

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def close_stdin(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()

    def wait_status(self, timeout: float = 30.0) -> int:
        """The raw wait status, as a parent (a shell, systemd) sees it."""
        deadline = time.monotonic() + timeout
        while True:
            pid, status = os.waitpid(self.proc.pid, os.WNOHANG)
            if pid:
                self.proc.returncode = (-os.WTERMSIG(status) if os.WIFSIGNALED(status)
                                        else os.WEXITSTATUS(status))
                return status
            if time.monotonic() > deadline:
                pytest.fail(f"vgpu-launch did not exit within {timeout} s; stderr:\n"
                            f"{self.stderr()[-3000:]}")
            time.sleep(0.005)


def kill_tree(pgids: Sequence[int], pids: Sequence[int] = ()) -> None:
    for pgid in pgids:
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def started(argv: Sequence[str], tmp_path: Path, *, env: dict[str, str] | None = None,
            new_session: bool = True, cwd: Path | str | None = None,
            **popen: Any) -> Iterator[Run]:
    """Start ``argv`` (stdin and stdout pipes, stderr to a file) in a session of its own (or,
    ``new_session`` false, a process group of its own in this session: not orphaned, so that
    stop signals act); kill its process group and its children at the end."""
    err = tmp_path / f"stderr-{time.monotonic_ns()}"
    with open(err, "wb") as ferr:
        group: dict[str, Any] = ({"start_new_session": True} if new_session
                                 else {"process_group": 0})
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=ferr, env=env or launch_env(), cwd=cwd, **group, **popen)
    run = Run(proc, err)
    try:
        yield run
    finally:
        leftovers = children(proc.pid)
        kill_tree([proc.pid], [proc.pid, *leftovers])
        with contextlib.suppress(Exception):
            proc.wait(timeout=10)
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                with contextlib.suppress(Exception):
                    f.close()


def parse_sig(line: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", line)}


def libc_sigqueue(pid: int, sig: int, value: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.sigqueue(ctypes.c_int(pid), ctypes.c_int(sig), ctypes.c_void_p(value)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


__all__ = [
    "PYTHON",
    "REPO",
    "WRAPPER",
    "Bin",
    "Lines",
    "Run",
    "build",
    "children",
    "kill_tree",
    "launch_argv",
    "launch_env",
    "lbin",
    "libc_sigqueue",
    "mask_of",
    "parse_sig",
    "proc_stat",
    "started",
    "state",
    "status_mask",
    "wait_for",
]
