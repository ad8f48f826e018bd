/* The program that spawn runs: exits 0 if the benchmark's preload library is loaded in it, 1 if not. */
#include <dlfcn.h>

int main(void) { return dlsym(RTLD_DEFAULT, "vgpu_bench_noop_preload") ? 0 : 1; }
