/*
 * execkill: children killed while the tracer handles their exec event.
 *
 *   execkill ROUNDS VARS PROG
 *
 * Each round forks a child that execs PROG (no arguments) with VARS environment variables of
 * 64 bytes (a large environment makes the tracer's work at the exec event take a while); as
 * soon as /proc/CHILD/exe names PROG (the exec has happened: the child is at, or past, its exec
 * event) the parent sends it SIGKILL and reaps it. Prints "rounds=N killed=K", K being the
 * children that died of that SIGKILL (the others had exited first).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: execkill ROUNDS VARS PROG\n");
        return 2;
    }
    int rounds = atoi(argv[1]), vars = atoi(argv[2]);
    char prog[PATH_MAX];
    if (!realpath(argv[3], prog)) {
        perror(argv[3]);
        return 2;
    }
    char **env = calloc(vars + 1, sizeof *env);
    for (int i = 0; i < vars; i++) {
        env[i] = malloc(65);
        snprintf(env[i], 65, "EXECKILL_%06d=%048d", i % 1000000, i);
    }
    int killed = 0;
    for (int r = 0; r < rounds; r++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 100;
        }
        if (pid == 0) {
            char *args[] = {prog, NULL};
            execve(prog, args, env);
            _exit(127);
        }
        char link[64], exe[PATH_MAX];
        snprintf(link, sizeof link, "/proc/%d/exe", (int)pid);
        for (;;) {
            ssize_t n = readlink(link, exe, sizeof exe - 1);
            if (n < 0 && errno != EACCES)
                break; /* gone already */
            if (n > 0) {
                exe[n] = 0;
                if (strcmp(exe, prog) == 0)
                    break;
            }
        }
        kill(pid, SIGKILL);
        int st;
        while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
            ;
        killed += WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL;
    }
    printf("rounds=%d killed=%d\n", rounds, killed);
    return 0;
}
