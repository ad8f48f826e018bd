/* rel_leak: built with -fsanitize=address (LeakSanitizer). "rel_leak leak" leaks one block
 * and LeakSanitizer reports it at exit (status 1); "rel_leak" frees it (status 0). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void *volatile kept;

int main(int argc, char **argv)
{
    char *p = malloc(4242);
    strcpy(p, "leaked");
    if (argc > 1 && strcmp(argv[1], "leak") == 0)
        p = NULL;
    free(p);
    kept = NULL;
    puts("rel_leak done");
    return 0;
}
