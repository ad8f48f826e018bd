/* sleeper [MS]: sleep MS milliseconds (default 300), exit 0. Built dynamic (sleeper), 32-bit
 * (sleeper32), static (sleeper-static) and with musl (sleeper-musl): the processes that
 * `vgpu-launch status` and the load verifier look at. */
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) { usleep(argc > 1 ? atoi(argv[1]) * 1000 : 300000); return 0; }
