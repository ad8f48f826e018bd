/* libtest.so: the preload library of the launcher tests. They check what CMD inherits and how
 * vgpu-launch exits, not the library: loading it is all it does. */
int vgpu_launch_test_lib_loaded = 1;
