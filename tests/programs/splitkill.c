/*
 * splitkill: a kill of a process group the way the kernel carries it out, one member after the
 * other, with the sender kept on the CPU between two members: what a sender that is preempted
 * or interrupted in the middle of kill(-PGID) looks like to the receivers.
 *
 *   splitkill SIG SPIN_US PID...
 *
 * Sends SIG to each PID in the order given (the kernel walks a group newest member first, so
 * CMD before vgpu-launch), spinning SPIN_US microseconds between two, and exits 0.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/types.h>

#include "testprog.h"

int main(int argc, char **argv)
{
    int sig;
    double spin;

    if (argc < 4) {
        fprintf(stderr, "usage: splitkill SIG SPIN_US PID...\n");
        return 2;
    }
    sig = atoi(argv[1]);
    spin = atof(argv[2]) / 1e6;
    for (int i = 3; i < argc; i++) {
        if (i > 3)
            for (double until = now() + spin; now() < until;)
                ;
        if (kill((pid_t)atoi(argv[i]), sig) != 0) {
            perror("kill");
            return 1;
        }
    }
    return 0;
}
