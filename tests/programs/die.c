/*
 * die exit N | die signal N: exit with status N, or die of signal N at its default action.
 * Core dumps are off in this process (RLIMIT_CORE 0): a core file next to it can only be
 * someone else's.
 */
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    struct rlimit none = {0, 0};
    sigset_t set;
    int n;

    if (argc != 3)
        return 100;
    n = atoi(argv[2]);
    if (!strcmp(argv[1], "exit"))
        return n;
    setrlimit(RLIMIT_CORE, &none);
    signal(n, SIG_DFL);
    sigemptyset(&set);
    sigaddset(&set, n);
    sigprocmask(SIG_UNBLOCK, &set, NULL);
    raise(n);
    return 101;
}
