/*
 * soak: an ollama-like server for the soak test (tests/robustness/test_soak.py).
 *
 *   soak serve REPORT WARMUP_SECONDS SECONDS
 *
 * The server starts runners ("soak runner", itself) continuously from two threads, each with
 * its own environment minus LD_PRELOAD (as ollama does), and ends each of them in one of
 * three ways: counted real-time signals then a "report and exit" signal (the runner answers
 * how many it received), SIGKILL, or SIGTERM. Meanwhile a thread keeps creating and joining
 * short-lived threads and another keeps queueing real-time signals to the server itself; every
 * runner also creates threads continuously. Every signal sent is counted and so is every one
 * handled: nothing may be lost on the way through the tracer.
 *
 * Phases, each ended by a line on stdin so that the test can sample in between:
 *   warm-up (WARMUP_SECONDS of activity), then "quiet 1" is appended to REPORT; a line on stdin;
 *   the run (SECONDS of activity), then "quiet 2" is appended; a line on stdin; then the
 *   totals ("done key=value ...") are appended and the server exits 0 (1 if a count is wrong).
 * During a quiet phase the server has no runner and exactly two threads (main and the signal
 * thread).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "testprog.h"

extern char **environ;

#define SIG_COUNTED (SIGRTMIN + 1)
#define SIG_REPORT (SIGRTMIN + 2)

static atomic_long received;
static atomic_int report_seen;
static int report_fd = -1;

static void on_counted(int sig)
{
    (void)sig;
    atomic_fetch_add(&received, 1);
}

/* The counted handler runs with the report signal blocked too: otherwise the report (a higher
 * number, but unblocked while a counted one is being handled) could overtake counted signals
 * still pending. */
static void handle(int sig, void (*fn)(int))
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = fn;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, SIG_COUNTED);
    sigaddset(&sa.sa_mask, SIG_REPORT);
    sigaction(sig, &sa, NULL);
}

static void block_rt(int how)
{
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIG_COUNTED);
    sigaddset(&s, SIG_REPORT);
    pthread_sigmask(how, &s, NULL);
}

/* The only thread that takes the real-time signals: they are then handled in the order the
 * kernel dequeues them (lower number first), so the report signal comes after every counted
 * one sent before it. */
static void *signal_thread(void *arg)
{
    block_rt(SIG_UNBLOCK);
    for (;;)
        pause();
    return arg;
}

static void *short_thread(void *arg)
{
    return arg;
}

static void *sleepy_thread(void *arg)
{
    sleep_us(300);
    return arg;
}

/* ---- runner -------------------------------------------------------------------------------- */

static void on_report(int sig)
{
    (void)sig;
    long n = atomic_load(&received);
    if (write(3, &n, sizeof n) != sizeof n)
        _exit(3);
    _exit(0);
}

static void *runner_churn(void *arg)
{
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    for (long i = 0;; i++) {
        pthread_t t;
        pthread_create(&t, &attr, i % 3 ? short_thread : sleepy_thread, NULL);
        sleep_us(1000);
    }
    return arg;
}

static int runner(void)
{
    handle(SIG_COUNTED, on_counted);
    handle(SIG_REPORT, on_report);
    block_rt(SIG_BLOCK);
    pthread_t t;
    pthread_create(&t, NULL, signal_thread, NULL);
    pthread_create(&t, NULL, runner_churn, NULL);
    const char *lp = getenv("LD_PRELOAD");
    char ok = lp && *lp && library_mapped("librobustmark") ? 'Y' : 'N';
    if (write(3, &ok, 1) != 1)
        return 3;
    for (;;)
        pause();
}

/* ---- server -------------------------------------------------------------------------------- */

static atomic_int active;
static atomic_long runners, killed, termed, reported, preload_missing, stuck, bad_status;
static atomic_long sent_self, runner_sent, runner_received, threads_made;
static char selfpath[4096];
static char **runner_env;

static int wait_readable(int fd, int ms)
{
    struct pollfd p = {fd, POLLIN, 0};
    int rc;
    while ((rc = poll(&p, 1, ms)) < 0 && errno == EINTR)
        ;
    return rc;
}

static void one_runner(unsigned seed)
{
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0)
        return;
    pid_t p = fork();
    if (p == 0) {
        dup2(fds[1], 3);
        char *argv[] = {"soak", "runner", NULL};
        execve(selfpath, argv, runner_env);
        _exit(127);
    }
    close(fds[1]);
    if (p < 0) {
        close(fds[0]);
        return;
    }
    atomic_fetch_add(&runners, 1);
    char ok = 0;
    if (wait_readable(fds[0], 20000) != 1 || read(fds[0], &ok, 1) != 1) {
        atomic_fetch_add(&stuck, 1);
        kill(p, SIGKILL);
        waitpid(p, NULL, 0);
        close(fds[0]);
        return;
    }
    if (ok != 'Y')
        atomic_fetch_add(&preload_missing, 1);
    int st = 0;
    switch (seed % 3) {
    case 0: {
        long sent = 0, got = -1;
        union sigval v = {0};
        for (int i = 0; i < 20; i++)
            if (sigqueue(p, SIG_COUNTED, v) == 0)
                sent++;
        sigqueue(p, SIG_REPORT, v);
        if (wait_readable(fds[0], 20000) == 1 && read(fds[0], &got, sizeof got) == sizeof got) {
            atomic_fetch_add(&runner_sent, sent);
            atomic_fetch_add(&runner_received, got);
            atomic_fetch_add(&reported, 1);
        } else {
            atomic_fetch_add(&stuck, 1);
            kill(p, SIGKILL);
        }
        waitpid(p, &st, 0);
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
            atomic_fetch_add(&bad_status, 1);
        break;
    }
    case 1:
        sleep_us(seed % 3000);
        kill(p, SIGKILL);
        waitpid(p, &st, 0);
        if (!WIFSIGNALED(st) || WTERMSIG(st) != SIGKILL)
            atomic_fetch_add(&bad_status, 1);
        atomic_fetch_add(&killed, 1);
        break;
    default:
        sleep_us(seed % 3000);
        kill(p, SIGTERM);
        waitpid(p, &st, 0);
        if (!WIFSIGNALED(st) || WTERMSIG(st) != SIGTERM)
            atomic_fetch_add(&bad_status, 1);
        atomic_fetch_add(&termed, 1);
        break;
    }
    close(fds[0]);
}

static void *spawner(void *arg)
{
    unsigned seed = (unsigned)(long)arg;
    while (atomic_load(&active)) {
        seed = seed * 1103515245u + 12345u;
        one_runner(seed >> 8);
    }
    return NULL;
}

static void *churner(void *arg)
{
    while (atomic_load(&active)) {
        pthread_t t;
        if (pthread_create(&t, NULL, short_thread, NULL) == 0) {
            pthread_join(t, NULL);
            atomic_fetch_add(&threads_made, 1);
        }
        sleep_us(500);
    }
    return arg;
}

static void *signaller(void *arg)
{
    union sigval v = {0};
    while (atomic_load(&active)) {
        if (sigqueue(getpid(), SIG_COUNTED, v) == 0)
            atomic_fetch_add(&sent_self, 1);
        sleep_us(1000);
    }
    return arg;
}

static void on_self_report(int sig)
{
    (void)sig;
    atomic_store(&report_seen, 1);
}

static void run_phase(double seconds)
{
    pthread_t t[4];
    atomic_store(&active, 1);
    pthread_create(&t[0], NULL, spawner, (void *)1L);
    pthread_create(&t[1], NULL, spawner, (void *)2L);
    pthread_create(&t[2], NULL, churner, NULL);
    pthread_create(&t[3], NULL, signaller, NULL);
    double end = now() + seconds;
    while (now() < end)
        sleep_us(50000);
    atomic_store(&active, 0);
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    /* Every counted signal queued to ourselves is handled before the report signal. */
    atomic_store(&report_seen, 0);
    union sigval v = {0};
    sigqueue(getpid(), SIG_REPORT, v);
    while (!atomic_load(&report_seen))
        sleep_us(1000);
}

static void report(const char *what)
{
    dprintf(report_fd,
            "%s runners=%ld reported=%ld killed=%ld termed=%ld stuck=%ld bad_status=%ld "
            "preload_missing=%ld sent_self=%ld received_self=%ld runner_sent=%ld "
            "runner_received=%ld threads=%ld\n",
            what, runners, reported, killed, termed, stuck, bad_status, preload_missing,
            sent_self, received, runner_sent, runner_received, threads_made);
}

static void wait_line(void)
{
    char buf[64];
    if (!fgets(buf, sizeof buf, stdin))
        exit(4);
}

static int serve(const char *reportpath, double warmup, double seconds)
{
    ssize_t n = readlink("/proc/self/exe", selfpath, sizeof selfpath - 1);
    if (n < 0)
        return 5;
    selfpath[n] = 0;
    report_fd = open(reportpath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (report_fd < 0)
        return 5;
    int envc = 0;
    for (char **e = environ; *e; e++)
        envc++;
    runner_env = calloc(envc + 1, sizeof *runner_env);
    int j = 0;
    for (char **e = environ; *e; e++)
        if (strncmp(*e, "LD_PRELOAD=", 11) != 0)
            runner_env[j++] = *e;
    handle(SIG_COUNTED, on_counted);
    handle(SIG_REPORT, on_self_report);
    block_rt(SIG_BLOCK);
    pthread_t t;
    pthread_create(&t, NULL, signal_thread, NULL);

    run_phase(warmup);
    report("quiet 1");
    wait_line();
    run_phase(seconds);
    report("quiet 2");
    wait_line();
    report("done");
    int ok = stuck == 0 && bad_status == 0 && preload_missing == 0 && sent_self == received &&
             runner_sent == runner_received;
    return ok ? 0 : 1;
}

int main(int argc, char **argv)
{
    if (argc >= 2 && strcmp(argv[1], "runner") == 0)
        return runner();
    if (argc >= 5 && strcmp(argv[1], "serve") == 0)
        return serve(argv[2], atof(argv[3]), atof(argv[4]));
    fprintf(stderr, "usage: soak serve REPORT WARMUP_SECONDS SECONDS | soak runner\n");
    return 2;
}
