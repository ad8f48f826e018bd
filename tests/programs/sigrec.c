/*
 * sigrec: record the signals it takes, in the order it takes them, and print them.
 *
 *   sigrec [-d SIG]... [-t] [-n] [-e SIG] [-T N]
 *
 * Prints "ready pid=P pgid=G sid=S" once its handlers are in place, then one line per signal
 * taken, "sig=N code=C pid=P value=V" (SA_SIGINFO handlers; value is the sigqueue value), and
 * "done n=N" when it ends: at the end of stdin or a line "q" (exit 0), or with -e SIG after
 * taking SIG. -d SIG leaves SIG at its default action (-d 20: Ctrl-Z stops it). -t: SIGTSTP as
 * less(1) does it: record it, then stop with SIGTSTP at its default action; catch it again
 * after SIGCONT. -n: do not read stdin (run until -e SIG, or a signal kills it). -T N: also run
 * N threads with every signal unblocked, so that (as in a Go program) any thread may take a
 * signal sent to the process.
 * Catches 1-31 except KILL, STOP, CHLD, and every real-time signal.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAXREC 8192
static struct { int sig, code, pid; long value; } rec[MAXREC];
static int nrec;  /* slots taken (atomically: any thread may take a signal) */
static volatile int ndone;  /* slots filled */
static volatile sig_atomic_t tstp_pending;
static int less_mode;
static int wake[2];

static void on_signal(int sig, siginfo_t *si, void *uc)
{
    int saved = errno, i = __atomic_fetch_add(&nrec, 1, __ATOMIC_SEQ_CST);
    (void)uc;
    if (i < MAXREC) {
        rec[i].sig = sig;
        rec[i].code = si->si_code;
        rec[i].pid = si->si_pid;
        rec[i].value = (long)si->si_value.sival_ptr;
    }
    __atomic_fetch_add(&ndone, 1, __ATOMIC_SEQ_CST);
    if (sig == SIGTSTP && less_mode)
        tstp_pending = 1;
    (void)!write(wake[1], "x", 1);
    errno = saved;
}

static void *idle_thread(void *arg)
{
    sigset_t none;
    (void)arg;
    sigemptyset(&none);
    pthread_sigmask(SIG_SETMASK, &none, NULL);
    for (;;)
        pause();
    return NULL;
}

static void catch(int sig)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_signal;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigfillset(&sa.sa_mask);
    if (sigaction(sig, &sa, NULL) != 0) {
        perror("sigaction");
        exit(3);
    }
}

int main(int argc, char **argv)
{
    int dflt[65] = {0};
    int use_stdin = 1, exit_on = 0, opt, printed = 0, threads = 0;
    sigset_t all, none;
    char line[256];

    while ((opt = getopt(argc, argv, "d:tne:T:")) != -1) {
        switch (opt) {
        case 'd': dflt[atoi(optarg) & 63] = 1; break;
        case 't': less_mode = 1; break;
        case 'n': use_stdin = 0; break;
        case 'e': exit_on = atoi(optarg); break;
        case 'T': threads = atoi(optarg); break;
        default: return 2;
        }
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (pipe(wake) != 0)
        return 3;
    sigfillset(&all);
    sigemptyset(&none);
    sigprocmask(SIG_BLOCK, &all, NULL);
    for (int s = 1; s < NSIG; s++) {
        if (s == SIGKILL || s == SIGSTOP || s == SIGCHLD || dflt[s & 63])
            continue;
        if (s > 31 && s < SIGRTMIN)
            continue;
        catch(s);
    }
    for (int s = 1; s < 64; s++)
        if (dflt[s])
            sigdelset(&all, s);
    sigprocmask(SIG_SETMASK, &all, NULL);
    for (int t = 0; t < threads; t++) {
        pthread_t th;
        pthread_create(&th, NULL, idle_thread, NULL);
    }
    printf("ready pid=%d pgid=%d sid=%d\n", (int)getpid(), (int)getpgrp(), (int)getsid(0));
    for (;;) {
        struct pollfd pfd[2] = {{wake[0], POLLIN, 0}, {0, POLLIN, 0}};
        int r = ppoll(pfd, use_stdin ? 2 : 1, NULL, &none);
        int stop = 0;
        char drain[64];
        if (r < 0 && errno != EINTR) {
            perror("ppoll");
            return 3;
        }
        if (r > 0 && (pfd[0].revents & POLLIN))
            (void)!read(wake[0], drain, sizeof drain);
        while (printed < __atomic_load_n(&ndone, __ATOMIC_SEQ_CST) && printed < MAXREC) {
            printf("sig=%d code=%d pid=%d value=%ld\n", rec[printed].sig, rec[printed].code,
                   rec[printed].pid, rec[printed].value);
            if (exit_on && rec[printed].sig == exit_on)
                stop = 1;
            printed++;
        }
        if (stop)
            break;
        if (tstp_pending) {
            /* like less: back to the default action, stop, catch again once continued */
            sigset_t tstp;
            tstp_pending = 0;
            signal(SIGTSTP, SIG_DFL);
            sigemptyset(&tstp);
            sigaddset(&tstp, SIGTSTP);
            raise(SIGTSTP);
            sigprocmask(SIG_UNBLOCK, &tstp, NULL);
            sigprocmask(SIG_BLOCK, &tstp, NULL);
            catch(SIGTSTP);
        }
        if (r > 0 && use_stdin && (pfd[1].revents & (POLLIN | POLLHUP))) {
            ssize_t n = read(0, line, sizeof line - 1);
            if (n <= 0 || line[0] == 'q')
                break;
        }
    }
    printf("done n=%d\n", (int)ndone);
    fflush(stdout);
    _exit(0);
}
