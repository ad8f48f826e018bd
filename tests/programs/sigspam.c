/*
 * sigspam: queued real-time signals arriving while the process keeps spawning children.
 *
 *   sigspam N -- PROG [ARG...]
 *
 * Process shape: the main thread fork()s and execve()s PROG (empty environment) in a loop and waits
 * for each child, while a second thread sigqueue()s N signals SIGRTMIN+1 to the process, each
 * carrying its sequence number, 8 at a time with 1 ms gaps so that they spread over many spawns
 * (retrying on EAGAIN, which is back-pressure, not loss).  The second
 * thread blocks the signal, so every one is delivered to the main thread in the middle of its
 * fork/exec/wait work.  When all were sent, the loop keeps going until all arrived or 20 s passed.
 *
 * Prints one line to stdout at the end:
 *
 *   sigspam received=R expected=N duplicates=D spawns=S
 *
 * and exits 0 only when R == N and D == 0 (no signal lost, none delivered twice).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t received;
static volatile sig_atomic_t duplicates;
static volatile sig_atomic_t sending_done;
static unsigned char *seen;
static long expected;
static char **prog_argv;

static void on_signal(int sig, siginfo_t *si, void *ctx)
{
    long v = (long)si->si_value.sival_int;

    (void)sig;
    (void)ctx;
    if (si->si_code != SI_QUEUE || v < 0 || v >= expected)
        return;
    if (seen[v])
        duplicates++;
    else
        received++;
    seen[v] = 1;
}

static void *sender(void *arg)
{
    sigset_t set;
    pid_t self = getpid();

    (void)arg;
    sigemptyset(&set);
    sigaddset(&set, SIGRTMIN + 1);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    for (long i = 0; i < expected; i++) {
        union sigval v = {.sival_int = (int)i};
        struct timespec pause = {0, 200000};

        while (sigqueue(self, SIGRTMIN + 1, v) < 0) {
            if (errno != EAGAIN) {
                perror("sigspam: sigqueue");
                exit(3);
            }
            nanosleep(&pause, NULL);
        }
        if (i % 8 == 7) {
            struct timespec gap = {0, 1000000};
            nanosleep(&gap, NULL);
        }
    }
    sending_done = 1;
    return NULL;
}

static void spawn_one(void)
{
    static char *empty_env[] = {NULL};
    pid_t pid = fork();
    int st;

    if (pid < 0) {
        if (errno == EAGAIN || errno == EINTR)
            return;
        perror("sigspam: fork");
        exit(3);
    }
    if (pid == 0) {
        execve(prog_argv[0], prog_argv, empty_env);
        _exit(127);
    }
    while (waitpid(pid, &st, 0) < 0) {
        if (errno != EINTR) {
            perror("sigspam: waitpid");
            exit(3);
        }
    }
}

int main(int argc, char **argv)
{
    struct sigaction sa;
    pthread_t t;
    time_t deadline = 0;
    long spawns = 0;

    if (argc < 4 || strcmp(argv[2], "--") != 0) {
        fprintf(stderr, "usage: sigspam N -- PROG [ARG...]\n");
        return 2;
    }
    expected = atol(argv[1]);
    prog_argv = &argv[3];
    seen = calloc((size_t)expected + 1, 1);
    if (!seen)
        return 3;

    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_signal;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGRTMIN + 1, &sa, NULL);

    if (pthread_create(&t, NULL, sender, NULL) != 0) {
        perror("sigspam: pthread_create");
        return 3;
    }
    for (;;) {
        spawn_one();
        spawns++;
        if (sending_done) {
            if (received + duplicates >= expected)
                break;
            if (!deadline)
                deadline = time(NULL) + 20;
            else if (time(NULL) > deadline)
                break;
        }
    }
    pthread_join(t, NULL);
    printf("sigspam received=%ld expected=%ld duplicates=%ld spawns=%ld\n", (long)received,
           expected, (long)duplicates, spawns);
    fflush(stdout);
    return received == expected && duplicates == 0 ? 0 : 1;
}
