/* Helpers shared by the test programs: included by them, not built on its own. */
#ifndef TESTPROG_H
#define TESTPROG_H

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

/* Whether a library whose file name starts with PREFIX is mapped in this process: proof that
 * ld.so loaded it, which LD_PRELOAD in the environment alone is not. */
static inline int library_mapped(const char *prefix)
{
    FILE *f = fopen("/proc/self/maps", "r");
    char line[4096];
    int found = 0;

    if (!f)
        return 0;
    while (!found && fgets(line, sizeof line, f)) {
        char *slash = strrchr(line, '/');
        if (slash && strncmp(slash + 1, prefix, strlen(prefix)) == 0)
            found = 1;
    }
    fclose(f);
    return found;
}

/* Sleep US microseconds, signals that interrupt the sleep included. */
static inline void sleep_us(long us)
{
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* CLOCK_MONOTONIC in seconds. */
static inline double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

#endif
