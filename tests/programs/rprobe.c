/*
 * rprobe: the leaf program of the robustness tests.
 *
 *   rprobe [--touch PATH] [--check] [--env0] [--sleep MS] [--exit N]
 *
 * --touch PATH  creates PATH before anything else in main (proof that main ran)
 * --check       prints nothing; exits 0 when LD_PRELOAD is set and a library whose file name
 *               starts with "librobustmark" is mapped, 3 otherwise
 * --env0        prints every environment entry followed by a NUL byte, and nothing else
 * otherwise one line: rprobe pid=P uid=U euid=E secure=S bits=B marker=M LD_PRELOAD=<value|(unset)>
 *
 * "marker" reads /proc/self/maps: /proc/PID/environ does not show variables put in at exec time.
 * Built 64-bit (rprobe) and 32-bit (rprobe32).
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <time.h>
#include <unistd.h>

#include "testprog.h"

extern char **environ;

int main(int argc, char **argv)
{
    int check = 0, env0 = 0, code = 0;
    long sleep_ms = 0;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--touch") == 0 && i + 1 < argc) {
            int fd = open(argv[++i], O_WRONLY | O_CREAT | O_TRUNC, 0644);
            if (fd >= 0)
                close(fd);
        } else if (strcmp(argv[i], "--check") == 0) {
            check = 1;
        } else if (strcmp(argv[i], "--env0") == 0) {
            env0 = 1;
        } else if (strcmp(argv[i], "--sleep") == 0 && i + 1 < argc) {
            sleep_ms = atol(argv[++i]);
        } else if (strcmp(argv[i], "--exit") == 0 && i + 1 < argc) {
            code = atoi(argv[++i]);
        }
    }
    if (sleep_ms > 0) {
        struct timespec ts = {sleep_ms / 1000, (sleep_ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
    if (check) {
        const char *lp = getenv("LD_PRELOAD");
        return lp && *lp && library_mapped("librobustmark") ? code : 3;
    }
    if (env0) {
        for (char **e = environ; *e; e++)
            fwrite(*e, 1, strlen(*e) + 1, stdout);
        return fflush(stdout) == 0 ? code : 1;
    }
    const char *lp = getenv("LD_PRELOAD");
    printf("rprobe pid=%ld uid=%ld euid=%ld secure=%lu bits=%d marker=%d LD_PRELOAD=%s\n",
           (long)getpid(), (long)getuid(), (long)geteuid(), getauxval(AT_SECURE),
           (int)(sizeof(void *) * 8), library_mapped("librobustmark"), lp ? lp : "(unset)");
    return fflush(stdout) == 0 ? code : 1;
}
