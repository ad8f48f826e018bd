/* Thread churn: N threads created and joined, BATCH at a time. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#define BATCH 4

static void *work(void *arg) { return arg; }

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 10000;
    pthread_t threads[BATCH];
    for (long done = 0; done < n; done += BATCH) {
        int batch = n - done < BATCH ? (int)(n - done) : BATCH;
        for (int i = 0; i < batch; i++) {
            if (pthread_create(&threads[i], NULL, work, NULL) != 0) {
                perror("pthread_create");
                return 2;
            }
        }
        for (int i = 0; i < batch; i++)
            pthread_join(threads[i], NULL);
    }
    return 0;
}
