/* libdep.so: a dependency of libneeds.so, used only to link it; it is not installed, so that
 * ld.so refuses libneeds.so (doctor must report ld.so's own words). */
int dep(void) { return 2; }
