/* rel_reap STATUSFILE CMD [ARG...]: a child subreaper around CMD (tests/release): reaps every
 * orphan until none is left, then writes CMD's raw wait status to STATUSFILE. */
#include <errno.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc < 3 || prctl(PR_SET_CHILD_SUBREAPER, 1) != 0)
        return 2;
    pid_t cmd = fork();
    if (cmd == 0) {
        execvp(argv[2], argv + 2);
        _exit(127);
    }
    int first = -1, st;
    for (;;) {
        pid_t p = waitpid(-1, &st, __WALL);
        if (p < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (p == cmd)
            first = st;
    }
    FILE *f = fopen(argv[1], "w");
    if (!f)
        return 2;
    fprintf(f, "%d\n", first);
    return fclose(f) != 0;
}
