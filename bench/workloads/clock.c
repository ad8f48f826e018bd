/* First thing in main(): print CLOCK_MONOTONIC and CLOCK_REALTIME, "monotonic=S.N realtime=S.N".
 * The harness reads the monotonic clock just before it starts the command: the difference is
 * the time from the command's start to this program's first instruction (after ld.so). */
#include <stdio.h>
#include <time.h>

int main(void) {
    struct timespec mono, real;
    clock_gettime(CLOCK_MONOTONIC, &mono);
    clock_gettime(CLOCK_REALTIME, &real);
    printf("monotonic=%lld.%09ld realtime=%lld.%09ld\n", (long long)mono.tv_sec, mono.tv_nsec,
           (long long)real.tv_sec, real.tv_nsec);
    return 0;
}
