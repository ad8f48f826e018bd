/*
 * showsig [LABEL]: print "LABEL ign=<SigIgn> blk=<SigBlk> cwd=<cwd> umask=<octal>" (LABEL
 * defaults to "cmd"); unless LABEL is "child", then start itself as "showsig child" (fork and
 * execve) and wait for it, so that what a child of CMD inherits is shown too. Exit 0.
 */
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    const char *label = argc > 1 ? argv[1] : "cmd";
    char line[512], ign[64] = "?", blk[64] = "?", cwd[4096];
    FILE *f = fopen("/proc/self/status", "r");
    mode_t m = umask(0);

    umask(m);
    while (f && fgets(line, sizeof line, f)) {
        if (!strncmp(line, "SigIgn:", 7))
            sscanf(line + 7, "%63s", ign);
        if (!strncmp(line, "SigBlk:", 7))
            sscanf(line + 7, "%63s", blk);
    }
    if (!getcwd(cwd, sizeof cwd))
        strcpy(cwd, "?");
    printf("%s ign=%s blk=%s cwd=%s umask=%03o\n", label, ign, blk, cwd, (unsigned)m);
    fflush(stdout);
    if (strcmp(label, "child") != 0) {
        pid_t pid = fork();
        if (pid == 0) {
            char *args[] = {argv[0], "child", NULL};
            execv("/proc/self/exe", args);
            _exit(127);
        }
        waitpid(pid, NULL, 0);
    }
    return 0;
}
