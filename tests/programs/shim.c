/* libshim.so (and libshim32.so): a stand-in for a vGPU shim, for doctor, status and the load
 * verifier. It has a constructor, as real shims do; it does nothing. */
__attribute__((constructor)) static void shim_loaded(void) {}
int vgpu_test_shim_marker(void) { return 1; }
