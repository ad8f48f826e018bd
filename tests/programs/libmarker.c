/*
 * libmarker.so: the preload library of the tests (not a process; it is loaded into them).
 *
 * Its constructor writes one line to stderr,
 *
 *   [marker] loaded pid=N exe=<readlink /proc/self/exe>
 *
 * so a test sees in which processes it was loaded.  Built with -DMARKER_TAG='"other"' it becomes
 * libother.so, a second, unrelated preload library (for the "LD_PRELOAD already set" shape).
 *
 * It uses only write/getpid/readlink and formats numbers itself, so the same glibc-built file also
 * loads into musl programs.
 */
#include <string.h>
#include <unistd.h>

#ifndef MARKER_TAG
#define MARKER_TAG "marker"
#endif

static char *append(char *p, const char *s)
{
    size_t n = strlen(s);
    memcpy(p, s, n);
    return p + n;
}

__attribute__((constructor)) static void marker_loaded(void)
{
    char buf[4096 + 128];
    char exe[4096];
    char num[24];
    char *p = buf;
    char *q = num + sizeof num;
    long pid = (long)getpid();
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);

    exe[n > 0 ? n : 0] = '\0';
    *--q = '\0';
    do {
        *--q = (char)('0' + pid % 10);
        pid /= 10;
    } while (pid > 0);

    p = append(p, "[" MARKER_TAG "] loaded pid=");
    p = append(p, q);
    p = append(p, " exe=");
    p = append(p, exe);
    p = append(p, "\n");
    if (write(2, buf, (size_t)(p - buf)) < 0) {
        /* nothing sensible to do */
    }
}
