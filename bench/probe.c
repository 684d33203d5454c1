/* Memory probe of the AVX512-BF16 products (bench/probe.py builds and runs it).
 *
 * It includes the kernel sources themselves (bf16_dp.inc and friends) and
 * calls them the way moe_sft.pyx does for the gate projection of a
 * Qwen3-30B-A3B layer: E experts of W [I, H] bf16, M tokens each, one task
 * per (expert, block of rows or columns), OpenMP dynamic schedule.  What it
 * varies is where W comes from:
 *   distinct = 0: every expert its own weights (1.2 GB for E = 128: DRAM);
 *   distinct = d: the experts share d weight matrices (3 MB each: caches).
 * The same arithmetic on cached and on DRAM-resident weights separates the
 * kernels' own speed from the cost of streaming W.  It also times every
 * token block of the tiled NT kernel (KT_PROBE_TILE_*), and measures what
 * the core can read: plain loads 1 or R rows at a time, and prefetches only.
 *
 * usage: probe MODE E M DISTINCT THREADS [ARG]
 *   MODE nt | nn    ARG: rows (nt) or columns (nn) per task, default 64 / 256
 *   MODE read       ARG: rows read side by side (1 = front to back)
 *   MODE prefetch   ARG: 0..3 = prefetcht0, t1, t2, nta, every line once
 * One JSON object on stdout. */
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <x86intrin.h>

#define KT_PROBE_SLOTS 8
static uint64_t probe_ticks[256][KT_PROBE_SLOTS], probe_count[256][KT_PROBE_SLOTS];
#define KT_PROBE_TILE_BEGIN() const uint64_t probe_t0 = __rdtsc()
#define KT_PROBE_TILE_END(mb)                                                             \
    do {                                                                                  \
        const int probe_s = (mb) < KT_PROBE_SLOTS - 1 ? (int)(mb) : KT_PROBE_SLOTS - 1;   \
        probe_ticks[omp_get_thread_num()][probe_s] += __rdtsc() - probe_t0;               \
        probe_count[omp_get_thread_num()][probe_s] += 1;                                  \
    } while (0)

#include "ktsft/kernels.h"
#include "common.inc"
#include "avx512_vocab.h"
#define KT_OWN_BF16
#include "instances.inc"
#include "bf16_dp.inc"

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc < 6) {
        fprintf(stderr, "usage: probe MODE E M DISTINCT THREADS [ARG]\n");
        return 2;
    }
    const char *mode = argv[1];
    const int64_t E = atoll(argv[2]), M = atoll(argv[3]), distinct = atoll(argv[4]);
    const int threads = atoi(argv[5]);
    const int nt = !strcmp(mode, "nt"), nn = !strcmp(mode, "nn");
    const int rd = !strcmp(mode, "read"), pfo = !strcmp(mode, "prefetch");
    if (!(nt || nn || rd || pfo) || E < 1 || M < 1 || threads < 1 || threads > 256) {
        fprintf(stderr, "probe: bad arguments\n");
        return 2;
    }
    const int64_t arg = argc > 6 ? atoll(argv[6]) : (nn ? 256 : (nt ? 64 : (rd ? 1 : 0)));
    const int64_t H = 2048, I = 768, r = 16, P = E * M, wel = I * H;
    const int64_t nw = distinct ? (distinct < E ? distinct : E) : E;

    ktsft_bf16 *W = aligned_alloc(64, (size_t)(wel * nw) * 2);
    ktsft_bf16 *X = aligned_alloc(64, (size_t)(P * H) * 2);
    ktsft_bf16 *D = aligned_alloc(64, (size_t)(P * I) * 2);
    float *C = aligned_alloc(64, (size_t)(P * H) * 4);
    float *A2 = calloc((size_t)(P * r), 4), *W2 = calloc((size_t)((H + I) * r), 4);
    int32_t *rows = malloc((size_t)P * 4);
    if (!W || !X || !D || !C || !A2 || !W2 || !rows) {
        fprintf(stderr, "probe: out of memory\n");
        return 1;
    }
    /* small bf16 values (no overflow), every page touched before timing */
    for (int64_t i = 0; i < wel * nw; ++i) W[i] = (ktsft_bf16)(0x3c00 + i % 7);
    for (int64_t i = 0; i < P * H; ++i) X[i] = (ktsft_bf16)(0x3c00 + i % 5);
    for (int64_t i = 0; i < P * I; ++i) D[i] = (ktsft_bf16)(0x3c00 + i % 3);
    memset(C, 0, (size_t)(P * H) * 4);
    for (int64_t i = 0; i < P; ++i) rows[i] = (int32_t)((i * 7919) % P); /* scattered tokens */

    /* tasks as moe_sft.pyx makes them; read/prefetch walk the same blocks */
    const int64_t dim = nn ? H : I, blk = nn ? arg : (nt ? arg : 64);
    const int64_t nb = (dim + blk - 1) / blk, ntasks = E * nb;
    double best = 1e30;
    float sink = 0.0f;
    for (int rep = 0; rep < 5; ++rep) {
        memset(probe_ticks, 0, sizeof probe_ticks);
        memset(probe_count, 0, sizeof probe_count);
        const double t0 = now();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) reduction(+ : sink)
        for (int64_t q = 0; q < ntasks; ++q) {
            const int64_t e = q / nb, lo = (q % nb) * blk, hi = lo + blk < dim ? lo + blk : dim;
            const ktsft_bf16 *We = W + (e % nw) * wel;
            if (nt) {
                gemm_nt_bf16_dp(M, hi - lo, H, X, H, rows + e * M, We + lo * H, H, r,
                                A2 + e * M * r, r, W2 + lo * r, r, C + e * M * I + lo, I);
            } else if (nn) {
                gemm_nn_bf16_dp(M, hi - lo, I, D + e * M * I, I, NULL, We + lo, H, r,
                                A2 + e * M * r, r, W2 + lo, H, C + e * M * H + lo, H, 0);
            } else if (rd) { /* arg rows side by side, 64 bytes of each per step */
                __m512 acc = _mm512_setzero_ps();
                for (int64_t n = lo; n < hi; n += arg)
                    for (int64_t k = 0; k < H; k += 32)
                        for (int64_t j = 0; j < arg && n + j < hi; ++j)
                            acc = _mm512_add_ps(acc, _mm512_castsi512_ps(
                                                         _mm512_load_si512(We + (n + j) * H + k)));
                sink += _mm512_reduce_add_ps(acc);
            } else {
                const char *p = (const char *)(We + lo * H);
                const int64_t bytes = (hi - lo) * H * 2;
                for (int64_t i = 0; i < bytes; i += 64) {
                    switch (arg) {
                    case 0: _mm_prefetch(p + i, _MM_HINT_T0); break;
                    case 1: _mm_prefetch(p + i, _MM_HINT_T1); break;
                    case 2: _mm_prefetch(p + i, _MM_HINT_T2); break;
                    default: _mm_prefetch(p + i, _MM_HINT_NTA); break;
                    }
                }
            }
        }
        const double t = now() - t0;
        if (t < best) best = t;
    }
    /* weight bytes the call touched (prefetch: bytes it asked for) */
    const double wbytes = (double)E * wel * 2;
    const double flops = (nt || nn) ? 2.0 * P * I * H : 0.0;
    printf("{\"mode\": \"%s\", \"E\": %lld, \"M\": %lld, \"distinct\": %lld, \"threads\": %d, "
           "\"arg\": %lld, \"ms\": %.4f, \"gflops\": %.2f, \"weight_gbs\": %.2f, \"tile_ticks\": [",
           mode, (long long)E, (long long)M, (long long)distinct, threads, (long long)arg,
           best * 1e3, flops / best / 1e9, wbytes / best / 1e9);
    for (int s = 0; s < KT_PROBE_SLOTS; ++s) {
        uint64_t tk = 0, cnt = 0;
        for (int th = 0; th < 256; ++th) tk += probe_ticks[th][s], cnt += probe_count[th][s];
        printf("%s%.1f", s ? ", " : "", cnt ? (double)tk / cnt : 0.0);
    }
    printf("], \"sink\": %g}\n", (double)(sink != 0.0f));
    free(W), free(X), free(D), free(C), free(A2), free(W2), free(rows);
    return 0;
}
