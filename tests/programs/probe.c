/*
 * probe: the leaf program of every test shape.
 *
 * Process shape: a single process that starts no children.  It prints one line to stdout,
 *
 *   probe pid=N LD_PRELOAD=<value or (unset)> VGPU_TEST_DEVICES=<value or (unset)> marker=<0|1>
 *
 * where marker=1 means that a file named libmarker.so is mapped into this process (read from
 * /proc/self/maps, which is the only reliable answer: /proc/PID/environ does not show variables put
 * in at exec time).  With the argument --env it then prints every environment entry, one a line.
 *
 * Built as probe (dynamic), probe-static, probe32 (-m32) and probe-musl (musl-gcc).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "testprog.h"

extern char **environ;

static const char *show(const char *name)
{
    const char *v = getenv(name);
    return v ? v : "(unset)";
}

int main(int argc, char **argv)
{
    printf("probe pid=%ld LD_PRELOAD=%s VGPU_TEST_DEVICES=%s marker=%d\n", (long)getpid(),
           show("LD_PRELOAD"), show("VGPU_TEST_DEVICES"), library_mapped("libmarker.so"));
    if (argc > 1 && strcmp(argv[1], "--env") == 0) {
        for (char **e = environ; *e; e++)
            printf("%s\n", *e);
    }
    return fflush(stdout) == 0 ? 0 : 1;
}
