/* The preload library of the benchmark: it does nothing when loaded (no constructor, no
 * interposed functions). Its one exported symbol lets a program check that it was loaded. */
int vgpu_bench_noop_preload = 1;
