/*
 * orphans N: make N orphans that exit at the same moment. N children each start a grandchild
 * and exit at once, so the grandchildren are re-parented to the nearest subreaper; every
 * grandchild blocks reading one pipe, which this process closes once the N children are
 * reaped: the N orphans then exit together. Prints "released N", then waits until no process
 * but itself has its parent (getppid()) as parent, at most 30 s, and prints
 * "left=K zombies=Z" (K such processes, Z of them zombies). Exit 0 if K is 0, else 1.
 */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void count(pid_t parent, int *left, int *zombies)
{
    DIR *d = opendir("/proc");
    struct dirent *e;
    *left = *zombies = 0;
    while (d && (e = readdir(d))) {
        char path[64], buf[1024], *p;
        FILE *f;
        int ppid;
        char state;
        if (e->d_name[0] < '0' || e->d_name[0] > '9' || atoi(e->d_name) == getpid())
            continue;
        snprintf(path, sizeof path, "/proc/%s/stat", e->d_name);
        if (!(f = fopen(path, "r")))
            continue;
        if (!fgets(buf, sizeof buf, f) || !(p = strrchr(buf, ')'))) {
            fclose(f);
            continue;
        }
        fclose(f);
        if (sscanf(p + 2, "%c %d", &state, &ppid) == 2 && ppid == parent) {
            (*left)++;
            if (state == 'Z')
                (*zombies)++;
        }
    }
    if (d)
        closedir(d);
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 100, fds[2], left = 0, zombies = 0;
    pid_t parent = getppid();
    struct timespec t0, t;

    if (pipe(fds))
        return 3;
    for (int i = 0; i < n; i++) {
        pid_t c = fork();
        if (c < 0)
            return 3;
        if (c == 0) {
            if (fork() == 0) {
                char b;
                close(fds[1]);
                (void)!read(fds[0], &b, 1);
                _exit(0);
            }
            _exit(0);
        }
    }
    close(fds[0]);
    for (int i = 0; i < n; i++)
        wait(NULL);
    close(fds[1]);
    printf("released %d\n", n);
    fflush(stdout);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        count(parent, &left, &zombies);
        clock_gettime(CLOCK_MONOTONIC, &t);
        if (left == 0 || t.tv_sec - t0.tv_sec > 30)
            break;
        usleep(10000);
    }
    printf("left=%d zombies=%d\n", left, zombies);
    return left != 0;
}
