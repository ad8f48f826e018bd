/*
 * archinfo: what the C library's headers say about the ABI this program was built for, to
 * check vgpu_launch/arch against.  Prints one line:
 *
 *   word=N elf_machine=N ptrace=N rt_sigqueueinfo=N audit_arch=N
 *
 * Built natively (archinfo) and with -m32, the compat ABI (archinfo32): tests/unit/test_arch.py.
 */
#include <elf.h>
#include <linux/audit.h>
#include <stdio.h>
#include <sys/syscall.h>

#if defined(__x86_64__)
#define ELF_MACHINE EM_X86_64
#define THIS_AUDIT_ARCH AUDIT_ARCH_X86_64
#elif defined(__i386__)
#define ELF_MACHINE EM_386
#define THIS_AUDIT_ARCH AUDIT_ARCH_I386
#elif defined(__aarch64__)
#define ELF_MACHINE EM_AARCH64
#define THIS_AUDIT_ARCH AUDIT_ARCH_AARCH64
#elif defined(__arm__)
#define ELF_MACHINE EM_ARM
#define THIS_AUDIT_ARCH AUDIT_ARCH_ARM
#else
#error "no vgpu-launch support for this machine"
#endif

int main(void)
{
    printf("word=%u elf_machine=%u ptrace=%ld rt_sigqueueinfo=%ld audit_arch=%u\n",
           (unsigned)sizeof(void *), (unsigned)ELF_MACHINE, (long)SYS_ptrace,
           (long)SYS_rt_sigqueueinfo, (unsigned)THIS_AUDIT_ARCH);
    return 0;
}
