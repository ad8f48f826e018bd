/*
 * rel_worker: a process to release and debug (tests/release).
 *
 *   rel_worker HEARTBEAT NTHREADS
 *       Prints "worker pid=N" and runs NTHREADS threads that sleep 10 ms at a time in
 *       rel_worker_thread_loop(); the main thread writes a counter to HEARTBEAT every 20 ms
 *       from rel_worker_main_loop(), so a test can see that it keeps running.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void nap(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

__attribute__((noinline)) static void *rel_worker_thread_loop(void *arg)
{
    for (;;)
        nap(10);
    return arg;
}

__attribute__((noinline)) static void rel_worker_main_loop(const char *heartbeat)
{
    int fd = open(heartbeat, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        perror(heartbeat);
        exit(2);
    }
    for (long beat = 1;; beat++) {
        char line[32];
        int n = snprintf(line, sizeof line, "%ld\n", beat);
        if (pwrite(fd, line, n, 0) != n)
            exit(3);
        nap(20);
    }
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: rel_worker HEARTBEAT NTHREADS\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int i = 0; i < atoi(argv[2]); i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, rel_worker_thread_loop, NULL) != 0)
            return 2;
    }
    printf("worker pid=%d\n", getpid());
    rel_worker_main_loop(argv[1]);
    return 0;
}
