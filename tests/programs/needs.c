/* libneeds.so: a preload library that needs libdep.so, which is missing where it is built. */
int dep(void);
int shim(void) { return dep(); }
