/*
 * seccomp_ptrace ACTION PROG [ARG...]: run PROG under a seccomp filter that answers every
 * ptrace call with ACTION, and lets every other system call through:
 *   kill   SECCOMP_RET_KILL_PROCESS (SIGSYS), systemd's action for a SystemCallFilter= that
 *          leaves ptrace out;
 *   eperm  SECCOMP_RET_ERRNO with EPERM (a container runtime's profile).
 */
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__)
#define THIS_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define THIS_ARCH AUDIT_ARCH_AARCH64
#else
#error "add this machine's AUDIT_ARCH_*"
#endif

int main(int argc, char **argv)
{
    unsigned int action;

    if (argc < 3) {
        fprintf(stderr, "usage: seccomp_ptrace kill|eperm PROG [ARG...]\n");
        return 2;
    }
    if (!strcmp(argv[1], "kill"))
        action = SECCOMP_RET_KILL_PROCESS;
    else if (!strcmp(argv[1], "eperm"))
        action = SECCOMP_RET_ERRNO | EPERM;
    else
        return 2;
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, THIS_ARCH, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_ptrace, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, action),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {sizeof filter / sizeof filter[0], filter};

    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
        prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0) {
        perror("seccomp_ptrace: installing the filter");
        return 3;
    }
    execvp(argv[2], argv + 2);
    perror(argv[2]);
    return 127;
}
