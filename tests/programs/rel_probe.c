/*
 * rel_probe: what a program of the tree got (tests/release).
 *
 *   rel_probe [--wait FILE] [--child PROG]
 *       Prints "relprobe pid=N tracer=T preload=VALUE marker=0|1": its TracerPid, its
 *       getenv("LD_PRELOAD") and whether librelmarker.so is loaded. With --wait, then waits
 *       until FILE exists; with --child, then runs PROG with an empty environment and waits.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int tracer(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    int t = -1;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "TracerPid: %d", &t) == 1)
            break;
    if (f)
        fclose(f);
    return t;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *wait_for = NULL, *child = NULL;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--wait") == 0)
            wait_for = argv[i + 1];
        else if (strcmp(argv[i], "--child") == 0)
            child = argv[i + 1];
    }
    const char *preload = getenv("LD_PRELOAD");
    printf("relprobe pid=%d tracer=%d preload=%s marker=%d\n", getpid(), tracer(),
           preload ? preload : "(unset)", dlsym(RTLD_DEFAULT, "rel_marker") != NULL);
    if (wait_for) {
        struct timespec ts = {0, 10000000};
        while (access(wait_for, F_OK) != 0)
            nanosleep(&ts, NULL);
    }
    if (child) {
        char *cargv[] = {(char *)child, NULL}, *cenv[] = {NULL};
        pid_t c;
        int st;
        if (posix_spawn(&c, child, NULL, NULL, cargv, cenv) != 0 || waitpid(c, &st, 0) < 0)
            return 3;
    }
    return 0;
}
