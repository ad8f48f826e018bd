/* Signal heavy: THREADS threads sigqueue() N real-time signals in all to their own process, which
 * handles every one. Fails if a signal is lost or delivered twice. */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define THREADS 4

static atomic_long received;
static long per_thread;

static void on_signal(int sig, siginfo_t *info, void *ctx) {
    (void)sig; (void)info; (void)ctx;
    atomic_fetch_add_explicit(&received, 1, memory_order_relaxed);
}

static void *sender(void *arg) {
    pid_t self = getpid();
    union sigval value = {.sival_ptr = arg};
    for (long i = 0; i < per_thread; i++) {
        while (sigqueue(self, SIGRTMIN, value) != 0) {
            if (errno != EAGAIN) {
                perror("sigqueue");
                exit(2);
            }
            sched_yield(); /* the queue is full: let the handlers catch up */
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 20000;
    per_thread = n / THREADS;
    n = per_thread * THREADS;
    struct sigaction sa = {.sa_sigaction = on_signal, .sa_flags = SA_SIGINFO | SA_RESTART};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGRTMIN, &sa, NULL);
    pthread_t threads[THREADS];
    for (int i = 0; i < THREADS; i++)
        pthread_create(&threads[i], NULL, sender, NULL);
    for (int i = 0; i < THREADS; i++)
        pthread_join(threads[i], NULL);
    time_t deadline = time(NULL) + 10;
    while (atomic_load(&received) < n && time(NULL) < deadline)
        sched_yield();
    long got = atomic_load(&received);
    printf("sent=%ld received=%ld\n", n, got);
    return got == n ? 0 : 3;
}
