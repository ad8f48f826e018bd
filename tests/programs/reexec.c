/*
 * reexec: one process that executes itself again and again, under the same pid.
 *
 *   reexec N
 *
 * Execs "reexec N-1" (same pid, same program) until N is 0, then exits 0. Each image runs
 * through ld.so and main before the next exec.
 */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 2)
        return 2;
    long n = atol(argv[1]);
    if (n <= 0)
        return 0;
    char next[32];
    snprintf(next, sizeof next, "%ld", n - 1);
    char *args[] = {argv[0], next, NULL};
    execv("/proc/self/exe", args);
    perror("reexec: execv");
    return 100;
}
