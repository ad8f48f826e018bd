/*
 * rel_ptrace: ptrace requests as debuggers, test harnesses and sanitizers make them
 * (tests/release).
 *
 *   rel_ptrace traceme      fork; the child calls PTRACE_TRACEME and stops; the parent
 *                           continues it and collects its exit
 *   rel_ptrace attach       fork a child that sleeps; PTRACE_ATTACH it, see it stop, detach
 *   rel_ptrace seize        the same with PTRACE_SEIZE + PTRACE_INTERRUPT
 *   rel_ptrace vfork-traceme PROG
 *                           vfork; the child calls PTRACE_TRACEME between vfork and exec,
 *                           then execs PROG; the parent sees the exec stop and continues it
 *
 * Prints "MODE=ok" or "MODE=ERRNAME" (the errno of the failed request, e.g. EPERM, ENOSYS)
 * and exits 0 only on ok.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef PTRACE_SEIZE
#define PTRACE_SEIZE 0x4206
#define PTRACE_INTERRUPT 0x4207
#endif

static const char *errname(int e)
{
    switch (e) {
    case EPERM: return "EPERM";
    case ENOSYS: return "ENOSYS";
    case ESRCH: return "ESRCH";
    case EIO: return "EIO";
    default: return strerror(e);
    }
}

static int fail(const char *mode, int e)
{
    printf("%s=%s\n", mode, errname(e));
    return 1;
}

/* The child reports a failed PTRACE_TRACEME through its exit status: 100 + errno. */
static int child_status(const char *mode, int st, int want_sig)
{
    if (WIFEXITED(st) && WEXITSTATUS(st) >= 100)
        return fail(mode, WEXITSTATUS(st) - 100);
    if (!WIFSTOPPED(st) || WSTOPSIG(st) != want_sig) {
        printf("%s=unexpected-status-%#x\n", mode, st);
        return 1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *mode = argc > 1 ? argv[1] : "";
    int st;
    if (strcmp(mode, "traceme") == 0) {
        pid_t c = fork();
        if (c == 0) {
            if (ptrace(PTRACE_TRACEME, 0, 0, 0) != 0)
                _exit(100 + errno);
            raise(SIGSTOP);
            _exit(7);
        }
        waitpid(c, &st, 0);
        if (child_status(mode, st, SIGSTOP))
            return 1;
        ptrace(PTRACE_CONT, c, 0, 0);
        waitpid(c, &st, 0);
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 7)
            return fail(mode, EIO);
    } else if (strcmp(mode, "attach") == 0 || strcmp(mode, "seize") == 0) {
        pid_t c = fork();
        if (c == 0) {
            for (;;)
                pause();
        }
        int seize = mode[0] == 's';
        long r = seize ? ptrace(PTRACE_SEIZE, c, 0, 0) : ptrace(PTRACE_ATTACH, c, 0, 0);
        if (r != 0) {
            int e = errno;
            kill(c, SIGKILL);
            waitpid(c, &st, 0);
            return fail(mode, e);
        }
        if (seize)
            ptrace(PTRACE_INTERRUPT, c, 0, 0);
        waitpid(c, &st, __WALL);
        int ok = WIFSTOPPED(st);
        ptrace(PTRACE_DETACH, c, 0, 0);
        kill(c, SIGKILL);
        waitpid(c, &st, __WALL);
        if (!ok)
            return fail(mode, EIO);
    } else if (strcmp(mode, "vfork-traceme") == 0 && argc > 2) {
        pid_t c = vfork();
        if (c == 0) {
            if (ptrace(PTRACE_TRACEME, 0, 0, 0) != 0)
                _exit(100 + errno);
            execv(argv[2], argv + 2);
            _exit(127);
        }
        waitpid(c, &st, 0);
        if (child_status(mode, st, SIGTRAP))
            return 1;
        ptrace(PTRACE_CONT, c, 0, 0);
        waitpid(c, &st, 0);
        if (!WIFEXITED(st))
            return fail(mode, EIO);
        printf("%s=ok rc=%d\n", mode, WEXITSTATUS(st));
        return 0;
    } else {
        fprintf(stderr, "usage: rel_ptrace traceme|attach|seize|vfork-traceme PROG\n");
        return 2;
    }
    printf("%s=ok\n", mode);
    return 0;
}
