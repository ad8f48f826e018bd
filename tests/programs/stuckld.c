/*
 * stuckld: a dynamic loader that never loads anything, for programs that are still starting
 * when vgpu-launch ends. Link a program with -Wl,--dynamic-linker=/path/to/stuckld: the kernel
 * starts stuckld in it, which maps no library and waits (polling its parent every
 * millisecond) until its parent has changed twice: CMD exited (it is then vgpu-launch's), and
 * vgpu-launch exited. Then it exits 0.
 *
 * Built with -nostdlib -static-pie -fPIE: as an interpreter it cannot rely on libc's start-up
 * code (a static-pie libc relocates itself with AT_PHDR, which names the program, not it).
 */
#include <sys/syscall.h>

static long sys(long n, long a, long b)
{
    long ret;
#if defined(__x86_64__)
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b) : "rcx", "r11", "memory");
#elif defined(__aarch64__)
    register long x8 __asm__("x8") = n, x0 __asm__("x0") = a, x1 __asm__("x1") = b;
    __asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1) : "memory");
    ret = x0;
#else
#error "x86_64 or aarch64"
#endif
    return ret;
}

static void nap(void)
{
    long ts[2] = {0, 1000000};
    sys(SYS_nanosleep, (long)ts, 0);
}

__attribute__((force_align_arg_pointer)) void _start(void)
{
    long first = sys(SYS_getppid, 0, 0), p;
    while ((p = sys(SYS_getppid, 0, 0)) == first)
        nap();
    while (sys(SYS_getppid, 0, 0) == p)
        nap();
    sys(SYS_exit_group, 0, 0);
    for (;;)
        ;
}
