/*
 * rtool: process shapes for the robustness tests (tests/robustness).
 *
 *   rtool reap [-s STATUSFILE] CMD [ARG...]
 *       Become a child subreaper, run CMD, reap every process that ends up as our child until
 *       none is left. Prints "reap status=RAW" (CMD's raw wait status) on stdout, or writes RAW
 *       to STATUSFILE. Used around vgpu-launch (so nothing is left to a PID 1 that does not
 *       reap) and as CMD (so CMD exits only once its whole tree is gone).
 *   rtool event MODE PIDFILE FIFO [PROG [ARG...]]
 *       Write our pid to PIDFILE, wait for one byte on FIFO, then stop at a ptrace event:
 *       fork / vfork (child runs PROG), clone (a thread), exec (exec PROG), stop (SIGSTOP).
 *   rtool spawn-storm WORKERS COUNT PROG [ARG...]
 *       WORKERS threads each start COUNT children of PROG with an empty environment,
 *       alternately with posix_spawn (CLONE_VM|CLONE_VFORK) and fork+execve; exit 0 only if
 *       every child exited 0. Prints "spawned=N failed=F".
 *   rtool thread-churn TOTAL CONCURRENT FORKERS
 *       Create TOTAL short-lived threads, at most CONCURRENT at a time, while FORKERS threads
 *       keep forking children that start threads and exit_group() at once (their threads die
 *       at their first stops). Prints "threads=N forks=F".
 *   rtool exec-churn K PROG [ARG...]
 *       While two threads keep creating and ending threads, exec ourselves with K-1 (from a
 *       non-leader thread when K is even), with an environment lacking LD_PRELOAD; at K=0 exec
 *       PROG with an empty environment.
 *   rtool rlimit-exec STACK_BYTES PROG [ARG...]
 *       Set RLIMIT_STACK and exec PROG with an empty environment.
 *   rtool execenv PROG ENVFILE OUTFILE [ENVFILE OUTFILE...]
 *       For each pair: run "PROG --env0" with exactly the environment in ENVFILE (entries as
 *       4-byte little-endian length + bytes), its stdout to OUTFILE. Exit 1 if one failed.
 *   rtool heartbeat FILE PROG SECONDS
 *       For at most SECONDS: append "beat N" to FILE every 20 ms from a second thread, and every
 *       5th beat run "PROG --check" and append "child rc=R". SIGTERM: exit 0.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "testprog.h"

extern char **environ;

static void die(const char *what)
{
    fprintf(stderr, "rtool: %s: %s\n", what, strerror(errno));
    exit(100);
}

/* ---- reap ---------------------------------------------------------------------------------- */

static int cmd_reap(int argc, char **argv)
{
    const char *statusfile = NULL;
    int i = 0;
    if (argc > 1 && strcmp(argv[0], "-s") == 0) {
        statusfile = argv[1];
        i = 2;
    }
    if (i >= argc)
        return 2;
    if (prctl(PR_SET_CHILD_SUBREAPER, 1) != 0)
        die("PR_SET_CHILD_SUBREAPER");
    pid_t cmd = fork();
    if (cmd < 0)
        die("fork");
    if (cmd == 0) {
        execvp(argv[i], argv + i);
        _exit(127);
    }
    int first = -1;
    for (;;) {
        int st;
        pid_t p = waitpid(-1, &st, __WALL);
        if (p < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (p == cmd)
            first = st;
    }
    if (statusfile) {
        FILE *f = fopen(statusfile, "w");
        if (!f)
            die(statusfile);
        fprintf(f, "%d\n", first);
        fclose(f);
    } else {
        printf("reap status=%d\n", first);
    }
    return 0;
}

/* ---- event --------------------------------------------------------------------------------- */

static void *nothing(void *arg)
{
    return arg;
}

static int cmd_event(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    const char *mode = argv[0];
    FILE *f = fopen(argv[1], "w");
    if (!f)
        die(argv[1]);
    fprintf(f, "%ld\n", (long)getpid());
    fclose(f);
    int fd = open(argv[2], O_RDONLY);
    char c;
    if (fd < 0 || read(fd, &c, 1) != 1)
        die("fifo");
    close(fd);
    char **prog = argv + 3;
    if (strcmp(mode, "fork") == 0 || strcmp(mode, "vfork") == 0) {
        pid_t p = strcmp(mode, "fork") == 0 ? fork() : vfork();
        if (p < 0)
            die("fork");
        if (p == 0) {
            execv(prog[0], prog);
            _exit(127);
        }
        int st;
        waitpid(p, &st, 0);
        return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    }
    if (strcmp(mode, "clone") == 0) {
        pthread_t t;
        if (pthread_create(&t, NULL, nothing, NULL) != 0)
            die("pthread_create");
        pthread_join(t, NULL);
        return 0;
    }
    if (strcmp(mode, "exec") == 0) {
        execv(prog[0], prog);
        die("execv");
    }
    if (strcmp(mode, "stop") == 0) {
        raise(SIGSTOP);
        return 0;
    }
    return 2;
}

/* ---- spawn-storm --------------------------------------------------------------------------- */

static char **storm_argv;
static int storm_count;
static atomic_int storm_spawned, storm_failed;

static void *storm_worker(void *arg)
{
    long id = (long)arg;
    char *empty[] = {NULL};
    for (int i = 0; i < storm_count; i++) {
        pid_t p;
        if ((i + id) % 2 == 0) {
            int rc = posix_spawn(&p, storm_argv[0], NULL, NULL, storm_argv, empty);
            if (rc != 0) {
                atomic_fetch_add(&storm_failed, 1);
                continue;
            }
        } else {
            p = fork();
            if (p < 0) {
                atomic_fetch_add(&storm_failed, 1);
                continue;
            }
            if (p == 0) {
                execve(storm_argv[0], storm_argv, empty);
                _exit(127);
            }
        }
        atomic_fetch_add(&storm_spawned, 1);
        int st;
        while (waitpid(p, &st, 0) < 0 && errno == EINTR)
            ;
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
            atomic_fetch_add(&storm_failed, 1);
    }
    return NULL;
}

static int cmd_spawn_storm(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    int workers = atoi(argv[0]);
    storm_count = atoi(argv[1]);
    storm_argv = argv + 2;
    pthread_t *t = calloc(workers, sizeof *t);
    for (long i = 0; i < workers; i++)
        if (pthread_create(&t[i], NULL, storm_worker, (void *)i) != 0)
            die("pthread_create");
    for (int i = 0; i < workers; i++)
        pthread_join(t[i], NULL);
    printf("spawned=%d failed=%d\n", storm_spawned, storm_failed);
    return storm_failed ? 1 : 0;
}

/* ---- thread-churn -------------------------------------------------------------------------- */

static sem_t churn_slots;
static atomic_int churn_done, churn_forks;

static void *churn_thread(void *arg)
{
    sem_post(&churn_slots);
    return arg;
}

static void *sleeper(void *arg)
{
    sleep_us(50000);
    return arg;
}

static void *forker(void *arg)
{
    while (!atomic_load(&churn_done)) {
        pid_t p = fork();
        if (p == 0) {
            /* Start threads and end the whole process at once: the threads are killed while
             * stopped at (or on their way to) their first ptrace stop. */
            pthread_t t;
            for (int i = 0; i < 4; i++)
                pthread_create(&t, NULL, sleeper, NULL);
            _exit(0);
        }
        if (p > 0) {
            int st;
            waitpid(p, &st, 0);
            atomic_fetch_add(&churn_forks, 1);
        }
    }
    return arg;
}

static int cmd_thread_churn(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    int total = atoi(argv[0]), conc = atoi(argv[1]), forkers = atoi(argv[2]);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    sem_init(&churn_slots, 0, conc);
    pthread_t *f = calloc(forkers > 0 ? forkers : 1, sizeof *f);
    for (int i = 0; i < forkers; i++)
        pthread_create(&f[i], NULL, forker, NULL);
    int created = 0;
    while (created < total) {
        sem_wait(&churn_slots);
        pthread_t t;
        int rc = pthread_create(&t, &attr, churn_thread, NULL);
        if (rc == EAGAIN) {
            sem_post(&churn_slots);
            sleep_us(1000);
            continue;
        }
        if (rc != 0) {
            errno = rc;
            die("pthread_create");
        }
        created++;
    }
    for (int i = 0; i < conc; i++) /* every thread has ended (or is ending) */
        sem_wait(&churn_slots);
    atomic_store(&churn_done, 1);
    for (int i = 0; i < forkers; i++)
        pthread_join(f[i], NULL);
    printf("threads=%d forks=%d\n", created, churn_forks);
    return 0;
}

/* ---- exec-churn ---------------------------------------------------------------------------- */

static char **exec_argv;
static char **exec_envp;
static const char *exec_path;
static atomic_int exec_stop;

static void *short_thread(void *arg)
{
    if ((long)arg & 1)
        sleep_us(100);
    return NULL;
}

static void *thread_maker(void *arg)
{
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    for (long i = 0; !atomic_load(&exec_stop); i++) {
        pthread_t t;
        if (pthread_create(&t, &attr, short_thread, (void *)i) != 0)
            sleep_us(200);
    }
    return arg;
}

static void *execer(void *arg)
{
    execve(exec_path, exec_argv, exec_envp);
    die("execve");
    return arg;
}

static int cmd_exec_churn(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    int k = atoi(argv[0]);
    static char selfpath[4096];
    ssize_t n = readlink("/proc/self/exe", selfpath, sizeof selfpath - 1);
    if (n < 0)
        die("readlink");
    selfpath[n] = 0;
    /* Our environment without LD_PRELOAD, so that every exec needs the preload put back. */
    int envc = 0;
    for (char **e = environ; *e; e++)
        envc++;
    char **env = calloc(envc + 2, sizeof *env);
    int j = 0;
    for (char **e = environ; *e; e++)
        if (strncmp(*e, "LD_PRELOAD=", 11) != 0)
            env[j++] = *e;
    char **nargv = calloc(argc + 4, sizeof *nargv);
    char knext[16];
    if (k > 0) {
        snprintf(knext, sizeof knext, "%d", k - 1);
        nargv[0] = "rtool";
        nargv[1] = "exec-churn";
        nargv[2] = knext;
        for (int i = 1; i < argc; i++)
            nargv[2 + i] = argv[i];
        exec_path = selfpath;
        exec_argv = nargv;
        exec_envp = env;
    } else {
        static char *empty[] = {NULL};
        exec_path = argv[1];
        exec_argv = argv + 1;
        exec_envp = empty;
    }
    pthread_t m1, m2, x;
    pthread_create(&m1, NULL, thread_maker, NULL);
    pthread_create(&m2, NULL, thread_maker, NULL);
    sleep_us(2000 + (getpid() % 5) * 1000);
    if (k % 2 == 0) {
        pthread_create(&x, NULL, execer, NULL);
        pthread_join(x, NULL); /* never returns: the exec ends every thread */
    } else {
        execer(NULL);
    }
    return 100;
}

/* ---- rlimit-exec --------------------------------------------------------------------------- */

static int cmd_rlimit_exec(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    struct rlimit rl = {strtoul(argv[0], NULL, 0), strtoul(argv[0], NULL, 0)};
    if (setrlimit(RLIMIT_STACK, &rl) != 0)
        die("setrlimit");
    char *empty[] = {NULL};
    execve(argv[1], argv + 1, empty);
    die("execve");
    return 100;
}

/* ---- execenv ------------------------------------------------------------------------------- */

static char **read_env(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        die(path);
    size_t cap = 64, n = 0;
    char **env = malloc(cap * sizeof *env);
    uint32_t len;
    while (fread(&len, 4, 1, f) == 1) {
        char *s = malloc(len + 1);
        if (len && fread(s, 1, len, f) != len)
            die("short envfile");
        s[len] = 0;
        if (n + 2 > cap)
            env = realloc(env, (cap *= 2) * sizeof *env);
        env[n++] = s;
    }
    env[n] = NULL;
    fclose(f);
    return env;
}

static int cmd_execenv(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    int bad = 0;
    char *pargv[] = {argv[0], "--env0", NULL};
    for (int i = 1; i + 1 < argc; i += 2) {
        char **env = read_env(argv[i]);
        int out = open(argv[i + 1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (out < 0)
            die(argv[i + 1]);
        pid_t p = fork();
        if (p == 0) {
            dup2(out, 1);
            execve(pargv[0], pargv, env);
            _exit(127);
        }
        close(out);
        int st;
        waitpid(p, &st, 0);
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
            bad = 1;
        for (char **e = env; *e; e++)
            free(*e);
        free(env);
    }
    return bad;
}

/* ---- heartbeat ----------------------------------------------------------------------------- */

static const char *hb_file;
static char *hb_prog;
static double hb_deadline;

static void on_term(int sig)
{
    (void)sig;
    _exit(0);
}

static void *beater(void *arg)
{
    char *pargv[] = {hb_prog, "--check", NULL};
    for (long n = 0; now() < hb_deadline; n++) {
        FILE *f = fopen(hb_file, "a");
        if (f) {
            fprintf(f, "beat %ld\n", n);
            fclose(f);
        }
        if (n % 5 == 0) {
            pid_t p = fork();
            if (p == 0) {
                execv(hb_prog, pargv);
                _exit(127);
            }
            int st = 0;
            waitpid(p, &st, 0);
            f = fopen(hb_file, "a");
            if (f) {
                fprintf(f, "child rc=%d\n", WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
                fclose(f);
            }
        }
        sleep_us(20000);
    }
    return arg;
}

static int cmd_heartbeat(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    hb_file = argv[0];
    hb_prog = argv[1];
    hb_deadline = now() + atof(argv[2]);
    signal(SIGTERM, on_term);
    pthread_t t;
    pthread_create(&t, NULL, beater, NULL);
    pthread_join(t, NULL);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: rtool SUBCOMMAND ...\n");
        return 2;
    }
    const char *sub = argv[1];
    argc -= 2;
    argv += 2;
    if (strcmp(sub, "reap") == 0)
        return cmd_reap(argc, argv);
    if (strcmp(sub, "event") == 0)
        return cmd_event(argc, argv);
    if (strcmp(sub, "spawn-storm") == 0)
        return cmd_spawn_storm(argc, argv);
    if (strcmp(sub, "thread-churn") == 0)
        return cmd_thread_churn(argc, argv);
    if (strcmp(sub, "exec-churn") == 0)
        return cmd_exec_churn(argc, argv);
    if (strcmp(sub, "rlimit-exec") == 0)
        return cmd_rlimit_exec(argc, argv);
    if (strcmp(sub, "execenv") == 0)
        return cmd_execenv(argc, argv);
    if (strcmp(sub, "heartbeat") == 0)
        return cmd_heartbeat(argc, argv);
    fprintf(stderr, "rtool: unknown subcommand %s\n", sub);
    return 2;
}
