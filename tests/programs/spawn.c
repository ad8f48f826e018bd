/*
 * spawn: start PROG in one of several process shapes.
 *
 *   spawn MODE [COUNT] -- PROG [ARG...]
 *
 * Shapes (MODE):
 *   fork-exec              fork(), the child execve()s PROG with an empty environment.
 *   vfork                  vfork(), the child execve()s PROG with an empty environment.
 *   posix-spawn-threads N  N threads (default 8) each posix_spawn() PROG with an empty environment
 *                          at the same moment (released together by a barrier); all are waited for.
 *   nonleader-exec         a second thread execve()s PROG with an empty environment while the main
 *                          thread sleeps; the process (same pid) becomes PROG.
 *   fexecve                open PROG and fexecve() it with an empty environment (same pid).
 *   strip                  execve() PROG with the current environment minus LD_PRELOAD (same pid).
 *   keep                   execvp() PROG with the current environment (same pid).
 *
 * Prints nothing except on error.  The exit status is the child's (with several children: the
 * first non-zero one); a child killed by signal S gives 128+S; a failed exec gives 127.
 * Also built static (spawn-static): a static parent spawning dynamic children.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

static char **prog_argv;
static char *empty_env[] = {NULL};
static pthread_barrier_t barrier;

static void die(const char *what)
{
    fprintf(stderr, "spawn: %s: %s\n", what, strerror(errno));
    exit(127);
}

static int status_of(int st)
{
    if (WIFEXITED(st))
        return WEXITSTATUS(st);
    if (WIFSIGNALED(st))
        return 128 + WTERMSIG(st);
    return 1;
}

static int wait_child(pid_t pid)
{
    int st;

    while (waitpid(pid, &st, 0) < 0) {
        if (errno != EINTR)
            die("waitpid");
    }
    return status_of(st);
}

static int do_fork_exec(int use_vfork)
{
    pid_t pid = use_vfork ? vfork() : fork();

    if (pid < 0)
        die("fork");
    if (pid == 0) {
        execve(prog_argv[0], prog_argv, empty_env);
        if (!use_vfork)
            fprintf(stderr, "spawn: execve %s: %s\n", prog_argv[0], strerror(errno));
        _exit(127);
    }
    return wait_child(pid);
}

static void *spawn_thread(void *arg)
{
    pid_t *pid = arg;
    int rc;

    pthread_barrier_wait(&barrier);
    rc = posix_spawn(pid, prog_argv[0], NULL, NULL, prog_argv, empty_env);
    if (rc != 0) {
        fprintf(stderr, "spawn: posix_spawn %s: %s\n", prog_argv[0], strerror(rc));
        *pid = -1;
    }
    return NULL;
}

static int do_posix_spawn_threads(int n)
{
    pthread_t *threads = calloc((size_t)n, sizeof *threads);
    pid_t *pids = calloc((size_t)n, sizeof *pids);
    int rc = 0;

    if (!threads || !pids)
        die("calloc");
    pthread_barrier_init(&barrier, NULL, (unsigned)n);
    for (int i = 0; i < n; i++) {
        if (pthread_create(&threads[i], NULL, spawn_thread, &pids[i]) != 0)
            die("pthread_create");
    }
    for (int i = 0; i < n; i++)
        pthread_join(threads[i], NULL);
    for (int i = 0; i < n; i++) {
        int r = pids[i] > 0 ? wait_child(pids[i]) : 127;
        if (rc == 0)
            rc = r;
    }
    return rc;
}

static void *exec_thread(void *arg)
{
    (void)arg;
    execve(prog_argv[0], prog_argv, empty_env);
    fprintf(stderr, "spawn: execve %s (from a thread): %s\n", prog_argv[0], strerror(errno));
    exit(127);
}

__attribute__((noreturn)) static void do_nonleader_exec(void)
{
    pthread_t t;

    if (pthread_create(&t, NULL, exec_thread, NULL) != 0)
        die("pthread_create");
    for (;;)
        pause();
}

static int do_fexecve(void)
{
    int fd = open(prog_argv[0], O_RDONLY | O_CLOEXEC);

    if (fd < 0)
        die(prog_argv[0]);
    fexecve(fd, prog_argv, empty_env);
    die("fexecve");
    return 127;
}

static int do_strip(void)
{
    size_t n = 0;
    char **env;

    while (environ[n])
        n++;
    env = calloc(n + 1, sizeof *env);
    if (!env)
        die("calloc");
    n = 0;
    for (char **e = environ; *e; e++) {
        if (strncmp(*e, "LD_PRELOAD=", 11) != 0)
            env[n++] = *e;
    }
    env[n] = NULL;
    execve(prog_argv[0], prog_argv, env);
    die(prog_argv[0]);
    return 127;
}

static void usage(void)
{
    fprintf(stderr, "usage: spawn fork-exec|vfork|posix-spawn-threads [N]|nonleader-exec|"
                    "fexecve|strip|keep -- PROG [ARG...]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *mode;
    int count = 8;
    int i = 2;

    if (argc < 4)
        usage();
    mode = argv[1];
    if (strcmp(argv[i], "--") != 0)
        count = atoi(argv[i++]);
    if (i >= argc || strcmp(argv[i], "--") != 0 || i + 1 >= argc || count < 1)
        usage();
    prog_argv = &argv[i + 1];

    if (strcmp(mode, "fork-exec") == 0)
        return do_fork_exec(0);
    if (strcmp(mode, "vfork") == 0)
        return do_fork_exec(1);
    if (strcmp(mode, "posix-spawn-threads") == 0)
        return do_posix_spawn_threads(count);
    if (strcmp(mode, "nonleader-exec") == 0)
        do_nonleader_exec();
    if (strcmp(mode, "fexecve") == 0)
        return do_fexecve();
    if (strcmp(mode, "strip") == 0)
        return do_strip();
    if (strcmp(mode, "keep") == 0) {
        execvp(prog_argv[0], prog_argv);
        die(prog_argv[0]);
    }
    usage();
    return 2;
}
