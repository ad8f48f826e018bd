/*
 * chain: a chain of N levels, each of which strips LD_PRELOAD before starting the next.
 *
 *   chain N PROG [ARG...]
 *
 * Process shape: level N (this process) starts "chain N-1 PROG ARG..." from its own executable with
 * its environment minus LD_PRELOAD; levels alternate between fork+execve+wait (odd N) and execve in
 * place (even N), so the tree is both deep and has exec-over-exec steps.  Level 0 execve()s PROG with
 * the stripped environment.  Prints nothing except on error; the exit status is PROG's.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

static char **stripped_env(void)
{
    size_t n = 0;
    char **env;

    while (environ[n])
        n++;
    env = calloc(n + 1, sizeof *env);
    if (!env)
        exit(127);
    n = 0;
    for (char **e = environ; *e; e++) {
        if (strncmp(*e, "LD_PRELOAD=", 11) != 0)
            env[n++] = *e;
    }
    env[n] = NULL;
    return env;
}

int main(int argc, char **argv)
{
    char self[4096];
    char level[16];
    char **env;
    char **next;
    ssize_t len;
    int n;

    if (argc < 3) {
        fprintf(stderr, "usage: chain N PROG [ARG...]\n");
        return 2;
    }
    n = atoi(argv[1]);
    env = stripped_env();
    if (n <= 0) {
        execve(argv[2], &argv[2], env);
        fprintf(stderr, "chain: execve %s: %s\n", argv[2], strerror(errno));
        return 127;
    }

    len = readlink("/proc/self/exe", self, sizeof self - 1);
    if (len < 0) {
        perror("chain: readlink /proc/self/exe");
        return 127;
    }
    self[len] = '\0';
    snprintf(level, sizeof level, "%d", n - 1);
    next = calloc((size_t)argc + 1, sizeof *next);
    if (!next)
        return 127;
    next[0] = argv[0];
    next[1] = level;
    for (int i = 2; i < argc; i++)
        next[i] = argv[i];
    next[argc] = NULL;

    if (n % 2 == 1) {
        pid_t pid = fork();
        int st;

        if (pid < 0) {
            perror("chain: fork");
            return 127;
        }
        if (pid == 0) {
            execve(self, next, env);
            _exit(127);
        }
        while (waitpid(pid, &st, 0) < 0) {
            if (errno != EINTR) {
                perror("chain: waitpid");
                return 127;
            }
        }
        if (WIFEXITED(st))
            return WEXITSTATUS(st);
        return WIFSIGNALED(st) ? 128 + WTERMSIG(st) : 1;
    }
    execve(self, next, env);
    fprintf(stderr, "chain: execve %s: %s\n", self, strerror(errno));
    return 127;
}
