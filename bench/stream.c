/* The CPU's memory bandwidth: a STREAM-like triad a[i] = b[i] + s * c[i], one slice per thread.
 *
 * The roofline's second ceiling (bench/roofline.py): how many bytes per second a kernel that
 * streams through float32 arrays can move. Bytes are counted as STREAM does: 12 per element
 * (read b, read c, write a), not the 4th word the cache's write-allocate reads of a; so this
 * is the rate a layer reading x bytes and writing y bytes can reach, counted as x + y.
 *
 *   gcc -O3 -march=native -pthread bench/stream.c -o /tmp/stream
 *   /tmp/stream 2 512          # threads (default 1), MiB per array (default 512); prints GB/s
 *
 * Each thread first-touches its own slice (its pages land on its node), then the triad runs
 * REPEATS times over all slices, threads meeting at a barrier between passes; the best pass
 * counts. Three arrays of 512 MiB are far beyond any cache here: that is DRAM. A few MiB per
 * array stays in the last-level cache: that is what a layer whose input and output fit there
 * gets (the torch backend keeps each activation of a sub-batch under 32 MiB).
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define REPEATS 20

static float *a, *b, *c;
static long length;
static int threads;
static pthread_barrier_t barrier;
static double best = 1e30;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *worker(void *arg) {
    long id = (long)arg;
    long begin = length * id / threads, end = length * (id + 1) / threads;
    for (long i = begin; i < end; i++) {
        a[i] = 0.0f;
        b[i] = 1.0f;
        c[i] = 2.0f;
    }
    const float s = 3.0f;
    for (int r = 0; r < REPEATS; r++) {
        pthread_barrier_wait(&barrier);
        double start = now();
        for (long i = begin; i < end; i++) a[i] = b[i] + s * c[i];
        pthread_barrier_wait(&barrier);
        double seconds = now() - start;
        if (id == 0 && seconds < best) best = seconds;
    }
    return NULL;
}

int main(int argc, char **argv) {
    threads = argc > 1 ? atoi(argv[1]) : 1;
    long mib = argc > 2 ? atol(argv[2]) : 512;
    if (threads < 1 || threads > 256 || mib < 1) {
        fprintf(stderr, "usage: %s [threads 1-256] [MiB per array]\n", argv[0]);
        return 2;
    }
    length = mib * 1024 * 1024 / (long)sizeof(float);
    a = aligned_alloc(64, length * sizeof(float));
    b = aligned_alloc(64, length * sizeof(float));
    c = aligned_alloc(64, length * sizeof(float));
    if (!a || !b || !c) {
        fprintf(stderr, "cannot allocate 3 x %ld MiB\n", mib);
        return 1;
    }
    pthread_t workers[256];
    pthread_barrier_init(&barrier, NULL, threads);
    for (long t = 0; t < threads; t++) pthread_create(&workers[t], NULL, worker, (void *)t);
    for (int t = 0; t < threads; t++) pthread_join(workers[t], NULL);
    double checksum = 0;
    for (long i = 0; i < length; i += 4096) checksum += a[i];  /* a = 7 everywhere */
    if (checksum != 7.0 * ((length + 4095) / 4096)) {
        fprintf(stderr, "triad result wrong\n");
        return 1;
    }
    printf("%d thread(s), triad 3 x %ld MiB: %.1f GB/s\n", threads, mib,
           3.0 * length * sizeof(float) / best / 1e9);
    return 0;
}
