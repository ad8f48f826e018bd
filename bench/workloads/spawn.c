/* Spawn heavy: N sequential posix_spawn()s of PROGRAM with an empty environment, each waited for.
 * Prints how many children had the benchmark's preload library loaded (see child.c).
 * With --hold SECONDS (used to measure the tracer itself): after the spawns print "ready PID",
 * sleep SECONDS, print "done", then wait for end of file on stdin. */
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: spawn N PROGRAM [--hold SECONDS]\n");
        return 2;
    }
    long n = atol(argv[1]);
    char *child_argv[] = {argv[2], NULL};
    char *empty_env[] = {NULL};
    long preloaded = 0;
    for (long i = 0; i < n; i++) {
        pid_t pid;
        int status, err = posix_spawn(&pid, argv[2], NULL, NULL, child_argv, empty_env);
        if (err != 0) {
            fprintf(stderr, "posix_spawn: %s\n", strerror(err));
            return 2;
        }
        if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) > 1) {
            fprintf(stderr, "child %d ended abnormally (status 0x%x)\n", (int)pid, status);
            return 2;
        }
        preloaded += WEXITSTATUS(status) == 0;
    }
    printf("preloaded=%ld/%ld\n", preloaded, n);
    if (argc == 5 && strcmp(argv[3], "--hold") == 0) {
        printf("ready %d\n", (int)getpid());
        fflush(stdout);
        double hold = atof(argv[4]);
        struct timespec ts = {(time_t)hold, (long)((hold - (time_t)hold) * 1e9)};
        while (nanosleep(&ts, &ts) != 0) {
        }
        printf("done\n");
        fflush(stdout);
        char buf[64];
        while (fread(buf, 1, sizeof buf, stdin) > 0) {
        }
    }
    return 0;
}
