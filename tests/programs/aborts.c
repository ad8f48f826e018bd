/* libaborts.so: a preload library whose constructor crashes (doctor must report SIGABRT). */
#include <stdlib.h>
__attribute__((constructor)) static void boom(void) { abort(); }
