/*
 * manyenv: execve PROG with an environment of N variables and nothing else.
 *
 *   manyenv [-l LEN] N PROG [ARG...]
 *
 * Process shape: a single exec in place (same pid).  The environment holds exactly N entries
 * V00000=vvv... V<N-1>=vvv... with values of LEN characters (default 8), to test environments
 * close to the kernel's limits (with 20000 entries the pointer arrays alone take 160 KiB).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    size_t len = 8;
    long n;
    int i = 1;
    char **env;

    if (argc > 2 && strcmp(argv[1], "-l") == 0) {
        len = (size_t)atol(argv[2]);
        i = 3;
    }
    if (argc < i + 2) {
        fprintf(stderr, "usage: manyenv [-l LEN] N PROG [ARG...]\n");
        return 2;
    }
    n = atol(argv[i]);
    env = calloc((size_t)n + 1, sizeof *env);
    if (!env)
        return 127;
    for (long k = 0; k < n; k++) {
        char *e = malloc(len + 16);
        int off;

        if (!e)
            return 127;
        off = snprintf(e, 16, "V%05ld=", k);
        memset(e + off, 'v', len);
        e[off + (int)len] = '\0';
        env[k] = e;
    }
    env[n] = NULL;
    execve(argv[i + 1], &argv[i + 1], env);
    fprintf(stderr, "manyenv: execve %s: %s\n", argv[i + 1], strerror(errno));
    return 127;
}
