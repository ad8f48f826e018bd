/* libquiet.so: a preload library that prints nothing when it loads (libmarker.so writes a line
 * to stderr), for the tests that read the log byte for byte or on a terminal.  Also built as
 * silent/libmarker.so: probe reports marker=1 for it (probe looks for libmarker.so in its maps)
 * while it still prints nothing. */
int vgpu_launch_quiet_lib = 1;
