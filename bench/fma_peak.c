/* The CPU's float32 peak: fused multiply-adds on independent registers, one loop per thread.
 *
 * No real kernel can do more float32 arithmetic per second than this, so it is the ceiling
 * against which bench/reaction.py's GFLOP/s are read (docs/BENCHMARKS.md).
 *
 *   gcc -O2 -march=native -pthread bench/fma_peak.c -o /tmp/fma_peak
 *   /tmp/fma_peak 2            # threads (default 1); prints GFLOP/s, by the wall clock and
 *                              # per CPU-second x threads (what a core, had it alone, does)
 *
 * Twelve accumulators hide the FMA latency on current x86 cores; AVX-512 when the compiler
 * targets it, else AVX2.
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#ifdef __AVX512F__
typedef __m512 vec;
#define LANES 16
#define SET(x) _mm512_set1_ps(x)
#define FMA(x, a, b) _mm512_fmadd_ps(x, a, b)
#define ADD(x, y) _mm512_add_ps(x, y)
#define STORE(p, x) _mm512_storeu_ps(p, x)
#else
typedef __m256 vec;
#define LANES 8
#define SET(x) _mm256_set1_ps(x)
#define FMA(x, a, b) _mm256_fmadd_ps(x, a, b)
#define ADD(x, y) _mm256_add_ps(x, y)
#define STORE(p, x) _mm256_storeu_ps(p, x)
#endif

#define ACCUMULATORS 12
#define ITERATIONS 300000000L

static void *fma_loop(void *result) {
    vec a = SET(1.0000001f), b = SET(-1e-7f);
    vec r0 = SET(1), r1 = SET(2), r2 = SET(3), r3 = SET(4), r4 = SET(5), r5 = SET(6);
    vec r6 = SET(7), r7 = SET(8), r8 = SET(9), r9 = SET(10), r10 = SET(11), r11 = SET(12);
    for (long i = 0; i < ITERATIONS; i++) {
        r0 = FMA(r0, a, b); r1 = FMA(r1, a, b); r2 = FMA(r2, a, b); r3 = FMA(r3, a, b);
        r4 = FMA(r4, a, b); r5 = FMA(r5, a, b); r6 = FMA(r6, a, b); r7 = FMA(r7, a, b);
        r8 = FMA(r8, a, b); r9 = FMA(r9, a, b); r10 = FMA(r10, a, b); r11 = FMA(r11, a, b);
    }
    vec sum = ADD(ADD(ADD(r0, r1), ADD(r2, r3)), ADD(ADD(r4, r5), ADD(r6, r7)));
    sum = ADD(sum, ADD(ADD(r8, r9), ADD(r10, r11)));
    float lanes[LANES];
    STORE(lanes, sum);
    *(volatile float *)result = lanes[0];  /* keeps the loop from being optimised away */
    return NULL;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    if (threads < 1 || threads > 256) {
        fprintf(stderr, "usage: %s [threads 1-256]\n", argv[0]);
        return 2;
    }
    pthread_t workers[256];
    float results[256];
    struct timespec start, end, cpu_start, cpu_end;
    clock_gettime(CLOCK_MONOTONIC, &start);
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cpu_start);
    for (int t = 0; t < threads; t++) pthread_create(&workers[t], NULL, fma_loop, &results[t]);
    for (int t = 0; t < threads; t++) pthread_join(workers[t], NULL);
    clock_gettime(CLOCK_MONOTONIC, &end);
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cpu_end);
    double seconds = (end.tv_sec - start.tv_sec) + (end.tv_nsec - start.tv_nsec) * 1e-9;
    double cpu = (cpu_end.tv_sec - cpu_start.tv_sec) + (cpu_end.tv_nsec - cpu_start.tv_nsec) * 1e-9;
    double flops = 2.0 * threads * ITERATIONS * ACCUMULATORS * LANES;
    /* Per CPU-second x threads: the rate had each thread its own core all along (on a shared
     * machine the wall-clock rate also counts the time other processes held the cores). */
    printf("%d thread(s), %d-bit FMA: %.1f GFLOP/s float32, %.1f per CPU-second x threads\n",
           threads, LANES * 32, flops / seconds / 1e9, flops / cpu * threads / 1e9);
    return 0;
}
