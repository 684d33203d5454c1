/* AVX512-BF16 path (Cooper Lake, Sapphire Rapids, Zen 4 and later):
 * vdpbf16ps multiplies bf16 pairs and accumulates in fp32 lanes.
 *
 * Both directions read the one row-major weight copy W[o, k]:
 *  - NT (forward, contraction along k): a weight row and an activation row are
 *    both k-contiguous, so vdpbf16ps consumes them as they lie; 16 fp32
 *    partial sums per output are reduced once at the end.
 *  - NN (backward, contraction along o): vdpbf16ps needs (W[o, n], W[o+1, n])
 *    pairs, so two rows are interleaved in registers (vpermt2w).  The shuffle
 *    is paid once per weight vector and reused by every token of the tile. */
#include <stdlib.h>
#include "ktsft/kernels.h"
#include "common.inc"
#include "avx512_vocab.h"

#define KT_OWN_BF16 /* the vdpbf16ps products below */
#include "instances.inc"

#define DP(acc, a, b) _mm512_dpbf16_ps(acc, (__m512bh)(a), (__m512bh)(b))

/* ---- NT on bf16 pairs ----
 * A tile holds mr tokens x NRC weight rows of accumulators (at most 24).
 * The shape follows the expert's token count (never the thread count):
 * few tokens -> more rows in flight, which is what memory-bound calls need. */
#define BNT_MRMAX 8
#define BNT_NRMAX 8

KT_INLINE void bnt_tile(const int mr, const int NRC, const int64_t K, const ktsft_bf16 *const *a,
                        const ktsft_bf16 *const *w, const int64_t K2, const float *a2,
                        const int64_t lda2, const float *const *w2, float *c,
                        const int64_t ldc, const int nr, const ktsft_bf16 *const *pf)
{
    __m512 acc[BNT_MRMAX][BNT_NRMAX];
#pragma GCC unroll 16
    for (int i = 0; i < mr; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < NRC; ++j) acc[i][j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512i wv[BNT_NRMAX];
        if (pf)
#pragma GCC unroll 8
            for (int j = 0; j < NRC; ++j) _mm_prefetch((const char *)(pf[j] + k), _MM_HINT_T0);
#pragma GCC unroll 8
        for (int j = 0; j < NRC; ++j) wv[j] = _mm512_loadu_si512((const void *)(w[j] + k));
#pragma GCC unroll 16
        for (int i = 0; i < mr; ++i) {
            __m512i av = _mm512_loadu_si512((const void *)(a[i] + k));
#pragma GCC unroll 8
            for (int j = 0; j < NRC; ++j) acc[i][j] = DP(acc[i][j], av, wv[j]);
        }
    }
    if (k < K) {
        const __mmask32 m = kt_mask32(K - k);
        __m512i wv[BNT_NRMAX];
#pragma GCC unroll 8
        for (int j = 0; j < NRC; ++j) wv[j] = _mm512_maskz_loadu_epi16(m, w[j] + k);
#pragma GCC unroll 16
        for (int i = 0; i < mr; ++i) {
            __m512i av = _mm512_maskz_loadu_epi16(m, a[i] + k);
#pragma GCC unroll 8
            for (int j = 0; j < NRC; ++j) acc[i][j] = DP(acc[i][j], av, wv[j]);
        }
    }
    for (int64_t q = 0; q < K2; q += 16) {
        const int64_t rem = K2 - q;
        __m512 wv[BNT_NRMAX];
#pragma GCC unroll 8
        for (int j = 0; j < NRC; ++j) wv[j] = V_LOADN(w2[j] + q, rem);
#pragma GCC unroll 16
        for (int i = 0; i < mr; ++i) {
            __m512 av = V_LOADN(a2 + i * lda2 + q, rem);
#pragma GCC unroll 8
            for (int j = 0; j < NRC; ++j) acc[i][j] = _mm512_fmadd_ps(av, wv[j], acc[i][j]);
        }
    }
#pragma GCC unroll 16
    for (int i = 0; i < mr; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < NRC; ++j)
            if (j < nr) c[i * ldc + j] = _mm512_reduce_add_ps(acc[i][j]);
}

KT_INLINE void bnt_shape(const int MRC, const int NRC, int64_t M, int64_t N, int64_t K,
                         const ktsft_bf16 *A__mk, int64_t lda, const int32_t *arows,
                         const ktsft_bf16 *W__nk, int64_t ldw, int64_t K2, const float *A2__mq,
                         int64_t lda2, const float *W2__nq, int64_t ldw2, float *C__mn,
                         int64_t ldc)
{
    for (int64_t n0 = 0; n0 < N; n0 += NRC) {
        const int nr = (int)(N - n0 < NRC ? N - n0 : NRC);
        const ktsft_bf16 *w[BNT_NRMAX];
        const float *w2[BNT_NRMAX];
        for (int j = 0; j < NRC; ++j) {
            const int64_t row = n0 + (j < nr ? j : 0);
            w[j] = W__nk + row * ldw;
            w2[j] = K2 ? W2__nq + row * ldw2 : NULL;
        }
        /* weight rows are pages apart and each starts the hardware prefetcher
         * cold: the first token block fetches the next row block ahead */
        const ktsft_bf16 *pf[BNT_NRMAX];
        for (int j = 0; j < NRC; ++j) pf[j] = w[j] + (n0 + NRC + j < N ? NRC : 0) * ldw;
        for (int64_t m0 = 0; m0 < M; m0 += MRC) {
            const int mr = (int)(M - m0 < MRC ? M - m0 : MRC);
            const ktsft_bf16 *const *pfm = m0 == 0 ? pf : NULL;
            const ktsft_bf16 *a[BNT_MRMAX];
            for (int i = 0; i < mr; ++i)
                a[i] = A__mk + (arows ? (int64_t)arows[m0 + i] : m0 + i) * lda;
            const float *a2 = K2 ? A2__mq + m0 * lda2 : NULL;
            float *c = C__mn + m0 * ldc + n0;
            switch (mr) {
#define KT_BNT_CASE(R) \
    case R: if (R <= MRC) bnt_tile(R, NRC, K, a, w, K2, a2, lda2, w2, c, ldc, nr, pfm); break;
            KT_BNT_CASE(1) KT_BNT_CASE(2) KT_BNT_CASE(3) KT_BNT_CASE(4)
            KT_BNT_CASE(5) KT_BNT_CASE(6) KT_BNT_CASE(7) KT_BNT_CASE(8)
#undef KT_BNT_CASE
            default: break;
            }
        }
    }
}

static void gemm_nt_bf16_dp(int64_t M, int64_t N, int64_t K, const ktsft_bf16 *A__mk,
                            int64_t lda, const int32_t *arows, const ktsft_bf16 *W__nk,
                            int64_t ldw, int64_t K2, const float *A2__mq, int64_t lda2,
                            const float *W2__nq, int64_t ldw2, float *C__mn, int64_t ldc)
{
#define KT_BNT(MR_, NR_) \
    bnt_shape(MR_, NR_, M, N, K, A__mk, lda, arows, W__nk, ldw, K2, A2__mq, lda2, W2__nq, ldw2, C__mn, ldc)
    if (M <= 2)
        KT_BNT(2, 8);
    else if (M <= 4)
        KT_BNT(4, 6);
    else if (M <= 6 || M > 8)
        KT_BNT(6, 4);
    else
        KT_BNT(8, 3);
#undef KT_BNT
}

/* ---- NN on bf16 pairs: 32 output columns (two zmm) per tile ---- */
#define BNN_MR 8
#define KT_STREAM_PAIRS 4

static inline uint32_t kt_pair(const ktsft_bf16 *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* (row0[c], row1[c]) pairs for columns 0..15 (lo) and 16..31 (hi) */
static inline void kt_pair_rows(__m512i r0, __m512i r1, __m512i *lo, __m512i *hi)
{
    const __m512i idx_lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10,
                                            41, 9, 40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3,
                                            34, 2, 33, 1, 32, 0);
    const __m512i idx_hi = _mm512_add_epi16(idx_lo, _mm512_set1_epi16(16));
    *lo = _mm512_permutex2var_epi16(r0, idx_lo, r1);
    *hi = _mm512_permutex2var_epi16(r0, idx_hi, r1);
}

/* One chunk of rows of a 32-column panel, either read in place (two rows
 * interleaved per step) or from a packed buffer that holds the interleaved
 * pairs contiguously: pairs[(o / 2) * 64 + {0..31 lo, 32..63 hi}]. */
KT_INLINE void bnn_tile(const int mr, const int packed, const int64_t O,
                        const ktsft_bf16 *const *a, const ktsft_bf16 *W__on, const int64_t ldw,
                        const ktsft_bf16 *pairs, const int64_t ncols, const int64_t O2,
                        const float *a2, const int64_t lda2, const float *W2__qn,
                        const int64_t ldw2, float *c, const int64_t ldc, const int accumulate)
{
    const __mmask32 mcols = kt_mask32(ncols);
    const int64_t cnt0 = ncols, cnt1 = ncols - 16;
    __m512 acc[BNN_MR][2];
#pragma GCC unroll 16
    for (int i = 0; i < mr; ++i) {
        acc[i][0] = accumulate ? V_LOADN(c + i * ldc, cnt0) : _mm512_setzero_ps();
        acc[i][1] = accumulate ? V_LOADN(c + i * ldc + 16, cnt1) : _mm512_setzero_ps();
    }
    int64_t o = 0;
    for (; o + 2 <= O; o += 2) {
        __m512i lo, hi;
        if (packed) {
            lo = _mm512_load_si512((const void *)(pairs + o * 32));
            hi = _mm512_load_si512((const void *)(pairs + o * 32 + 32));
        } else {
            kt_pair_rows(_mm512_maskz_loadu_epi16(mcols, W__on + o * ldw),
                         _mm512_maskz_loadu_epi16(mcols, W__on + (o + 1) * ldw), &lo, &hi);
        }
#pragma GCC unroll 16
        for (int i = 0; i < mr; ++i) {
            __m512i b = _mm512_set1_epi32((int)kt_pair(a[i] + o));
            acc[i][0] = DP(acc[i][0], lo, b);
            acc[i][1] = DP(acc[i][1], hi, b);
        }
    }
    if (o < O) { /* odd O: the last row pairs with zeros */
        __m512i lo, hi;
        if (packed) {
            lo = _mm512_load_si512((const void *)(pairs + o * 32));
            hi = _mm512_load_si512((const void *)(pairs + o * 32 + 32));
        } else {
            kt_pair_rows(_mm512_maskz_loadu_epi16(mcols, W__on + o * ldw), _mm512_setzero_si512(),
                         &lo, &hi);
        }
#pragma GCC unroll 16
        for (int i = 0; i < mr; ++i) {
            __m512i b = _mm512_set1_epi32((int)(uint32_t)a[i][o]);
            acc[i][0] = DP(acc[i][0], lo, b);
            acc[i][1] = DP(acc[i][1], hi, b);
        }
    }
    for (int64_t q = 0; q < O2; ++q) {
        __m512 w0 = V_LOADN(W2__qn + q * ldw2, cnt0);
        __m512 w1 = V_LOADN(W2__qn + q * ldw2 + 16, cnt1);
#pragma GCC unroll 16
        for (int i = 0; i < mr; ++i) {
            __m512 b = _mm512_set1_ps(a2[i * lda2 + q]);
            acc[i][0] = _mm512_fmadd_ps(b, w0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(b, w1, acc[i][1]);
        }
    }
#pragma GCC unroll 16
    for (int i = 0; i < mr; ++i) {
        V_STOREN(c + i * ldc, acc[i][0], cnt0);
        V_STOREN(c + i * ldc + 16, acc[i][1], cnt1);
    }
}

/* Pack rows [0, O) x columns [0, ncols) of W (ncols <= KT_NN_PACK_COLS)
 * as interleaved pairs, one 32-column panel after the other:
 * panel p at pairs + p * O_even * 32.  Rows are read front to back, so the
 * hardware prefetchers stream them even when ldw is a power of two. */
static void bnn_pack(int64_t O, const ktsft_bf16 *W__on, int64_t ldw, int64_t ncols,
                     ktsft_bf16 *pairs)
{
    const int64_t O_even = (O + 1) & ~(int64_t)1;
    for (int64_t o = 0; o < O; o += 2) {
        for (int64_t c0 = 0; c0 < ncols; c0 += 32) {
            const __mmask32 m = kt_mask32(ncols - c0);
            _mm_prefetch((const char *)(W__on + (o + 8) * ldw + c0), _MM_HINT_T0);
            _mm_prefetch((const char *)(W__on + (o + 9) * ldw + c0), _MM_HINT_T0);
            __m512i r0 = _mm512_maskz_loadu_epi16(m, W__on + o * ldw + c0);
            __m512i r1 = o + 1 < O ? _mm512_maskz_loadu_epi16(m, W__on + (o + 1) * ldw + c0)
                                   : _mm512_setzero_si512();
            __m512i lo, hi;
            kt_pair_rows(r0, r1, &lo, &hi);
            ktsft_bf16 *dst = pairs + (c0 / 32) * O_even * 32 + o * 32;
            _mm512_store_si512((void *)dst, lo);
            _mm512_store_si512((void *)(dst + 32), hi);
        }
    }
}

/* Few tokens (one token block): memory-bound.  W is streamed row by row,
 * front to back over the whole column range, four rows (two bf16 pairs)
 * per step, with the fp32 sums of C kept in L1 between steps.  Per output
 * element the pairs are added in the same order as in bnn_tile. */
static void bnn_stream_chunk(int64_t M, int64_t N, int64_t O, const ktsft_bf16 *const *a,
                       const ktsft_bf16 *W__on, int64_t ldw, int64_t O2, const float *A2__mq,
                       int64_t lda2, const float *W2__qn, int64_t ldw2, float *C__mn, int64_t ldc,
                       int accumulate)
{
    if (!accumulate)
        for (int64_t m = 0; m < M; ++m) memset(C__mn + m * ldc, 0, (size_t)N * sizeof(float));
    /* up to KT_STREAM_PAIRS row pairs per pass over the columns: C is
     * loaded and stored once per pass, so more pairs = less C traffic */
    __m512i b[KT_STREAM_PAIRS][BNN_MR];
    int64_t o = 0;
    while (o + 2 <= O) {
        const int max_np = M <= 2 ? 2 : KT_STREAM_PAIRS; /* one token: C traffic is small */
        int np = (int)((O - o) / 2);
        if (np > max_np) np = max_np;
        for (int g = 0; g < np; ++g)
            for (int64_t m = 0; m < M; ++m) b[g][m] = _mm512_set1_epi32((int)kt_pair(a[m] + o + 2 * g));
        const ktsft_bf16 *w0 = W__on + o * ldw;
        for (int64_t c0 = 0; c0 < N; c0 += 32) {
            const __mmask32 mk = kt_mask32(N - c0);
            const int64_t cnt0 = N - c0, cnt1 = N - c0 - 16;
            __m512i lo[KT_STREAM_PAIRS], hi[KT_STREAM_PAIRS];
            for (int g = 0; g < np; ++g) {
                /* the rows of the next pass, same columns: each row is its own
                 * page, where the hardware prefetcher restarts cold */
                _mm_prefetch((const char *)(w0 + (2 * np + 2 * g) * ldw + c0), _MM_HINT_T0);
                _mm_prefetch((const char *)(w0 + (2 * np + 2 * g + 1) * ldw + c0), _MM_HINT_T0);
                kt_pair_rows(_mm512_maskz_loadu_epi16(mk, w0 + 2 * g * ldw + c0),
                             _mm512_maskz_loadu_epi16(mk, w0 + (2 * g + 1) * ldw + c0), &lo[g], &hi[g]);
            }
            if (cnt0 >= 32) { /* full panel: plain loads and stores */
                for (int64_t m = 0; m < M; ++m) {
                    float *c = C__mn + m * ldc + c0;
                    __m512 cl = _mm512_loadu_ps(c), ch = _mm512_loadu_ps(c + 16);
                    for (int g = 0; g < np; ++g) {
                        cl = DP(cl, lo[g], b[g][m]);
                        ch = DP(ch, hi[g], b[g][m]);
                    }
                    _mm512_storeu_ps(c, cl);
                    _mm512_storeu_ps(c + 16, ch);
                }
            } else {
                for (int64_t m = 0; m < M; ++m) {
                    float *c = C__mn + m * ldc + c0;
                    __m512 cl = V_LOADN(c, cnt0), ch = V_LOADN(c + 16, cnt1);
                    for (int g = 0; g < np; ++g) {
                        cl = DP(cl, lo[g], b[g][m]);
                        ch = DP(ch, hi[g], b[g][m]);
                    }
                    V_STOREN(c, cl, cnt0);
                    V_STOREN(c + 16, ch, cnt1);
                }
            }
        }
        o += 2 * np;
    }
    if (o < O) { /* odd O: the last row pairs with zeros */
        for (int64_t m = 0; m < M; ++m) b[0][m] = _mm512_set1_epi32((int)(uint32_t)a[m][o]);
        for (int64_t c0 = 0; c0 < N; c0 += 32) {
            const __mmask32 mk = kt_mask32(N - c0);
            const int64_t cnt0 = N - c0, cnt1 = N - c0 - 16;
            __m512i lo0, hi0;
            kt_pair_rows(_mm512_maskz_loadu_epi16(mk, W__on + o * ldw + c0), _mm512_setzero_si512(),
                         &lo0, &hi0);
            for (int64_t m = 0; m < M; ++m) {
                float *c = C__mn + m * ldc + c0;
                V_STOREN(c, DP(V_LOADN(c, cnt0), lo0, b[0][m]), cnt0);
                V_STOREN(c + 16, DP(V_LOADN(c + 16, cnt1), hi0, b[0][m]), cnt1);
            }
        }
    }
    for (int64_t q = 0; q < O2; ++q)
        for (int64_t c0 = 0; c0 < N; c0 += 16) {
            const int64_t cnt = N - c0;
            __m512 w = V_LOADN(W2__qn + q * ldw2 + c0, cnt);
            for (int64_t m = 0; m < M; ++m) {
                float *c = C__mn + m * ldc + c0;
                V_STOREN(c, _mm512_fmadd_ps(_mm512_set1_ps(A2__mq[m * lda2 + q]), w, V_LOADN(c, cnt)), cnt);
            }
        }
}

/* C rows of the chunk stay in L1 (about 16 KiB of fp32 sums) */
static void bnn_stream(int64_t M, int64_t N, int64_t O, const ktsft_bf16 *const *a,
                       const ktsft_bf16 *W__on, int64_t ldw, int64_t O2, const float *A2__mq,
                       int64_t lda2, const float *W2__qn, int64_t ldw2, float *C__mn, int64_t ldc,
                       int accumulate)
{
    int64_t span = (4096 / (M > 0 ? M : 1)) & ~(int64_t)31;
    if (span < 32) span = 32;
    for (int64_t n0 = 0; n0 < N; n0 += span)
        bnn_stream_chunk(M, N - n0 < span ? N - n0 : span, O, a, W__on + n0, ldw, O2, A2__mq,
                         lda2, W2__qn ? W2__qn + n0 : NULL, ldw2, C__mn + n0, ldc, accumulate);
}

#define KT_NN_PACK_COLS (KT_NN_PACK_BYTES / (KT_NN_OCHUNK * 2))

static void gemm_nn_bf16_dp(int64_t M, int64_t N, int64_t O, const ktsft_bf16 *A__mo,
                            int64_t lda, const int32_t *arows, const ktsft_bf16 *W__on,
                            int64_t ldw, int64_t O2, const float *A2__mq, int64_t lda2,
                            const float *W2__qn, int64_t ldw2, float *C__mn, int64_t ldc,
                            int accumulate)
{
    /* Chunks of KT_NN_OCHUNK rows x KT_NN_PACK_COLS columns are packed into
     * interleaved pairs (96 KiB, L2-resident), then every token block runs
     * on them.  C carries exact fp32 partial sums between row chunks, so
     * the result equals one unchunked pass. */
    if (M <= BNN_MR) {
        const ktsft_bf16 *a[BNN_MR];
        for (int64_t i = 0; i < M; ++i) a[i] = A__mo + (arows ? (int64_t)arows[i] : i) * lda;
        bnn_stream(M, N, O, a, W__on, ldw, O2, A2__mq, lda2, W2__qn, ldw2, C__mn, ldc, accumulate);
        return;
    }
    ktsft_bf16 *pairs = aligned_alloc(64, (size_t)KT_NN_OCHUNK * KT_NN_PACK_COLS * sizeof(ktsft_bf16));
    for (int64_t nb0 = 0; nb0 < N; nb0 += KT_NN_PACK_COLS) {
        const int64_t ncb = N - nb0 < KT_NN_PACK_COLS ? N - nb0 : KT_NN_PACK_COLS;
        for (int64_t o0 = 0; o0 < O || o0 == 0; o0 += KT_NN_OCHUNK) {
            const int64_t oc = O - o0 < KT_NN_OCHUNK ? O - o0 : KT_NN_OCHUNK;
            const int64_t oc_even = (oc + 1) & ~(int64_t)1;
            const int last = o0 + KT_NN_OCHUNK >= O;
            const int acc = accumulate || o0 > 0;
            const int64_t o2 = last ? O2 : 0;
            if (pairs) bnn_pack(oc, W__on + o0 * ldw + nb0, ldw, ncb, pairs);
            for (int64_t c0 = 0; c0 < ncb; c0 += 32) {
                const int64_t n0 = nb0 + c0;
                const int64_t ncols = ncb - c0 < 32 ? ncb - c0 : 32;
                const ktsft_bf16 *w = W__on + o0 * ldw + n0;
                const ktsft_bf16 *pp = pairs ? pairs + (c0 / 32) * oc_even * 32 : NULL;
                for (int64_t m0 = 0; m0 < M; m0 += BNN_MR) {
                    const int mr = (int)(M - m0 < BNN_MR ? M - m0 : BNN_MR);
                    const ktsft_bf16 *a[BNN_MR];
                    for (int i = 0; i < mr; ++i)
                        a[i] = A__mo + (arows ? (int64_t)arows[m0 + i] : m0 + i) * lda + o0;
                    const float *a2 = o2 ? A2__mq + m0 * lda2 : NULL;
                    const float *w2 = o2 ? W2__qn + n0 : NULL;
                    float *c = C__mn + m0 * ldc + n0;
/* packed is a compile-time constant in each switch: bnn_tile is specialised */
#define KT_BNN_SWITCH(PACKED)                                                                   \
    switch (mr) {                                                                               \
    case 1: bnn_tile(1, PACKED, oc, a, w, ldw, pp, ncols, o2, a2, lda2, w2, ldw2, c, ldc, acc); break; \
    case 2: bnn_tile(2, PACKED, oc, a, w, ldw, pp, ncols, o2, a2, lda2, w2, ldw2, c, ldc, acc); break; \
    case 3: bnn_tile(3, PACKED, oc, a, w, ldw, pp, ncols, o2, a2, lda2, w2, ldw2, c, ldc, acc); break; \
    case 4: bnn_tile(4, PACKED, oc, a, w, ldw, pp, ncols, o2, a2, lda2, w2, ldw2, c, ldc, acc); break; \
    case 5: bnn_tile(5, PACKED, oc, a, w, ldw, pp, ncols, o2, a2, lda2, w2, ldw2, c, ldc, acc); break; \
    case 6: bnn_tile(6, PACKED, oc, a, w, ldw, pp, ncols, o2, a2, lda2, w2, ldw2, c, ldc, acc); break; \
    case 7: bnn_tile(7, PACKED, oc, a, w, ldw, pp, ncols, o2, a2, lda2, w2, ldw2, c, ldc, acc); break; \
    default: bnn_tile(BNN_MR, PACKED, oc, a, w, ldw, pp, ncols, o2, a2, lda2, w2, ldw2, c, ldc, acc); break; \
    }
                    if (pp) {
                        KT_BNN_SWITCH(1)
                    } else { /* out of memory for the pack buffer: read W in place */
                        KT_BNN_SWITCH(0)
                    }
#undef KT_BNN_SWITCH
                }
            }
            if (last) break;
        }
    }
    free(pairs);
}

const ktsft_kernels *ktsft_kernels_avx512bf16(void)
{
    KT_TABLE("avx512bf16", gemm_nt_bf16_dp, gemm_nn_bf16_dp);
    return &table;
}
