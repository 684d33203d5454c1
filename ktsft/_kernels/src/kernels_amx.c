/* AMX-BF16 path (Sapphire Rapids and later): the base products run on
 * tile registers (tdpbf16ps: a 16x32 bf16 tile times a 32x16 tile of bf16
 * pairs into a 16x16 fp32 tile); everything else is the AVX512-BF16 build.
 *
 * Both directions read the one row-major weight copy W[o, k], unpacked:
 *  - NT (forward, y = W x): W is the *left* operand, 16 weight rows x 32 k
 *    loaded straight from memory; the tokens' activations are packed as
 *    bf16 pairs, transposed (the right operand).  The tile holds y^T
 *    (weight rows x tokens) and is transposed in registers on the way out.
 *  - NN (backward, dx = W^T dy): the activations are the left operand and
 *    W the right one, which tdpbf16ps wants as (W[o, n], W[o+1, n]) pairs:
 *    a 32-column panel of W is interleaved into an L2-resident buffer,
 *    as the vdpbf16ps kernels do.
 * Accumulation is fp32 in the tiles; the fp32 LoRA terms and the ragged
 * edges are done by AVX-512 in the epilogue.  Shapes too small for tiles
 * go to the vdpbf16ps kernels.
 *
 * KT_AMX_EMULATE builds a C model of the tile unit instead (development
 * on CPUs without AMX: same layouts, same code paths). */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include "ktsft/kernels.h"
#include "common.inc"
#include "avx512_vocab.h"

#define KT_OWN_BF16 /* the bf16 products below and in bf16_dp.inc */
#include "instances.inc"
#include "bf16_dp.inc"

/* ---- the tile unit: 8 tiles, all configured 16 rows x 64 bytes ---- */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((aligned(64))) kt_tilecfg;

static void kt_tilecfg_init(kt_tilecfg *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->palette = 1;
    for (int t = 0; t < 8; ++t) {
        cfg->colsb[t] = 64;
        cfg->rows[t] = 16;
    }
}

#ifndef KT_AMX_EMULATE
/* ldtilecfg through asm with the whole 64-byte struct as its operand: GCC
 * 12's _tile_loadconfig declares a smaller one and may drop the stores
 * that fill the struct. */
static inline void kt_tile_config(const kt_tilecfg *cfg)
{
    __asm__ volatile("ldtilecfg %0" : : "m"(*cfg));
}
#define TLOAD(t, p, stride) _tile_loadd(t, p, stride)
#define TSTORE(t, p, stride) _tile_stored(t, p, stride)
#define TZERO(t) _tile_zero(t)
#define TDP(c, a, b) _tile_dpbf16ps(c, a, b)
#define TRELEASE() _tile_release()
#else
static _Thread_local unsigned char kt_emu[8][16][64];
static inline void kt_tile_config(const kt_tilecfg *cfg) { (void)cfg; }
static inline void kt_emu_load(int t, const void *p, int64_t stride)
{
    for (int r = 0; r < 16; ++r) memcpy(kt_emu[t][r], (const char *)p + r * stride, 64);
}
static inline void kt_emu_store(int t, void *p, int64_t stride)
{
    for (int r = 0; r < 16; ++r) memcpy((char *)p + r * stride, kt_emu[t][r], 64);
}
static inline void kt_emu_dp(int c, int a, int b)
{
    for (int m = 0; m < 16; ++m) {
        float acc[16];
        memcpy(acc, kt_emu[c][m], 64);
        for (int kp = 0; kp < 16; ++kp) {
            ktsft_bf16 av[2], bv[32];
            memcpy(av, kt_emu[a][m] + 4 * kp, 4);
            memcpy(bv, kt_emu[b][kp], 64);
            for (int n = 0; n < 16; ++n) {
                acc[n] += kt_bf16_to_f32(av[0]) * kt_bf16_to_f32(bv[2 * n]);
                acc[n] += kt_bf16_to_f32(av[1]) * kt_bf16_to_f32(bv[2 * n + 1]);
            }
        }
        memcpy(kt_emu[c][m], acc, 64);
    }
}
#define TLOAD(t, p, stride) kt_emu_load(t, p, stride)
#define TSTORE(t, p, stride) kt_emu_store(t, p, stride)
#define TZERO(t) memset(kt_emu[t], 0, sizeof kt_emu[t])
#define TDP(c, a, b) kt_emu_dp(c, a, b)
#define TRELEASE() ((void)0)
#endif

/* fewer tokens than this: the vdpbf16ps kernels (streaming, no packing) */
#define KT_AMX_MIN_M 8
/* more tokens than this are done in slices of it, which bounds the per-thread
 * scratch (the packed tokens: MBLOCK x K bf16) whatever the routing skew */
#define KT_AMX_MBLOCK 512

/* Software prefetch distances, tuned on a 16-core Sapphire Rapids slice:
 * NT: k blocks (64 bytes of each of the tile's 16 weight rows) ahead;
 * NN pack: weight rows ahead. */
#define KT_AMX_NT_PF 4
#define KT_AMX_NN_PF 16

/* Per-thread scratch for the packs, kept between calls: glibc serves blocks
 * of a megabyte by mmap, so a fresh one per call would be page-faulted in
 * (and zeroed by the kernel) every time.  Grows only, bounded by the token
 * slices (KT_AMX_MBLOCK): a few MB per thread.  Every block is also on one
 * list, so kt_release_scratch (called when the last AMX layer is freed, so
 * no AMX call runs) frees them all; the epoch tells each thread that its
 * pointer is gone. */
typedef struct kt_blk {
    struct kt_blk *prev, *next;
    size_t bytes;
} kt_blk;
#define KT_BLK_HEAD 64 /* the header keeps the scratch 64-byte aligned */
static kt_blk kt_blocks = {&kt_blocks, &kt_blocks, 0};
static pthread_mutex_t kt_blocks_mu = PTHREAD_MUTEX_INITIALIZER;
static unsigned kt_scr_epoch;
static _Thread_local kt_blk *kt_scr_blk;
static _Thread_local unsigned kt_scr_my_epoch;

static char *kt_scratch(size_t bytes)
{
    const unsigned ep = __atomic_load_n(&kt_scr_epoch, __ATOMIC_ACQUIRE);
    if (kt_scr_my_epoch != ep) { /* released meanwhile */
        kt_scr_blk = NULL;
        kt_scr_my_epoch = ep;
    }
    if (!kt_scr_blk || bytes > kt_scr_blk->bytes) {
        kt_blk *nb = aligned_alloc(64, KT_BLK_HEAD + ((bytes + 63) & ~(size_t)63));
        pthread_mutex_lock(&kt_blocks_mu);
        if (kt_scr_blk) {
            kt_scr_blk->prev->next = kt_scr_blk->next;
            kt_scr_blk->next->prev = kt_scr_blk->prev;
            free(kt_scr_blk);
        }
        if (nb) {
            nb->bytes = bytes;
            nb->prev = &kt_blocks;
            nb->next = kt_blocks.next;
            kt_blocks.next->prev = nb;
            kt_blocks.next = nb;
        }
        pthread_mutex_unlock(&kt_blocks_mu);
        kt_scr_blk = nb;
    }
    return kt_scr_blk ? (char *)kt_scr_blk + KT_BLK_HEAD : NULL;
}

static void kt_release_scratch(void)
{
    pthread_mutex_lock(&kt_blocks_mu);
    for (kt_blk *b = kt_blocks.next; b != &kt_blocks;) {
        kt_blk *next = b->next;
        free(b);
        b = next;
    }
    kt_blocks.next = kt_blocks.prev = &kt_blocks;
    __atomic_add_fetch(&kt_scr_epoch, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&kt_blocks_mu);
}

static size_t kt_scratch_bytes(void)
{
    size_t n = 0;
    pthread_mutex_lock(&kt_blocks_mu);
    for (kt_blk *b = kt_blocks.next; b != &kt_blocks; b = b->next)
        n += b->bytes;
    pthread_mutex_unlock(&kt_blocks_mu);
    return n;
}

/* r[i] <- column i of the 16x16 matrix whose rows are r[0..15] */
static inline void kt_tr16x16(__m512 r[16])
{
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    }
    /* r[4b + j] holds, per 128-bit lane L, rows 4b..4b+3 of column 4L + j */
    for (int b = 0; b < 2; ++b)
        for (int j = 0; j < 4; ++j) {
            t[8 * b + j] = _mm512_shuffle_f32x4(r[8 * b + j], r[8 * b + 4 + j], 0x88);
            t[8 * b + 4 + j] = _mm512_shuffle_f32x4(r[8 * b + j], r[8 * b + 4 + j], 0xdd);
        }
    for (int j = 0; j < 8; ++j) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
    }
}

/* ------------------------------------------------------------------------
 * NT: C[m, n] = sum_k A[row(m), k] W[n, k] + sum_q A2[m, q] W2[n, q]
 * ---------------------------------------------------------------------- */

/* Tokens as the right operand: tile (mt, kb) holds, row kp, the bf16 pair
 * k = 32 kb + 2 kp, +1 of tokens 16 mt .. 16 mt + 15 (zero past M and K). */
static void amx_pack_tokens(int64_t M, int64_t K, int64_t mtiles, int64_t nkb,
                            const ktsft_bf16 *A__mk, int64_t lda, const int32_t *arows,
                            uint32_t *xt)
{
    for (int64_t mt = 0; mt < mtiles; ++mt)
        for (int64_t kb = 0; kb < nkb; ++kb) {
            const __mmask32 mk = kt_mask32(K - 32 * kb);
            __m512 r[16];
            for (int i = 0; i < 16; ++i) {
                const int64_t m = 16 * mt + i;
                if (m < M) {
                    const ktsft_bf16 *row = A__mk + (arows ? (int64_t)arows[m] : m) * lda;
                    r[i] = _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(mk, row + 32 * kb));
                } else {
                    r[i] = _mm512_setzero_ps();
                }
            }
            kt_tr16x16(r);
            uint32_t *dst = xt + (mt * nkb + kb) * 256;
            for (int i = 0; i < 16; ++i) _mm512_store_ps((float *)(dst + 16 * i), r[i]);
        }
}

/* One 16-row block of W for the last k block when K % 32 != 0: zero padded,
 * so that no load reads past a row (or past the array) */
static void amx_pad_rows(int64_t nrows, const ktsft_bf16 *W__nk, int64_t ldw, int64_t k0,
                         int64_t K, ktsft_bf16 *pad)
{
    const __mmask32 mk = kt_mask32(K - k0);
    for (int i = 0; i < 16; ++i)
        _mm512_store_si512((void *)(pad + 32 * i),
                           i < nrows ? _mm512_maskz_loadu_epi16(mk, W__nk + i * ldw + k0)
                                     : _mm512_setzero_si512());
}

/* rows[i][0..16) += sum_q a2[i][q] w2[q][0..16) for i < mr: the fp32 LoRA
 * term of one 16x16 output tile.  Sixteen rows of w2 stay in registers per
 * pass, so each output row costs one broadcast-FMA per q. */
static inline void amx_lora_tile(float *rows, int64_t mr, const float *a2, int64_t lda2,
                                 int64_t K2, const float *w2, int64_t ldw2, int64_t nc)
{
    for (int64_t q0 = 0; q0 < K2; q0 += 16) {
        const int64_t nq = K2 - q0 < 16 ? K2 - q0 : 16;
        __m512 wv[16];
        for (int q = 0; q < 16; ++q)
            wv[q] = q < nq ? V_LOADN(w2 + (q0 + q) * ldw2, nc) : _mm512_setzero_ps();
        for (int64_t i = 0; i < mr; ++i) {
            const float *a = a2 + i * lda2 + q0;
            __m512 v = _mm512_load_ps(rows + 16 * i);
            if (nq == 16) {
#pragma GCC unroll 16
                for (int q = 0; q < 16; ++q) v = _mm512_fmadd_ps(_mm512_set1_ps(a[q]), wv[q], v);
            } else {
                for (int q = 0; q < nq; ++q) v = _mm512_fmadd_ps(_mm512_set1_ps(a[q]), wv[q], v);
            }
            _mm512_store_ps(rows + 16 * i, v);
        }
    }
}

/* Tile (rows n0.., tokens m0..) of C^T in tmp[16][16] -> C with the LoRA term
 * (tmp is overwritten).  w2t[q][16]: the tile's LoRA-B rows, transposed. */
static void amx_nt_epilogue(float *tmp, int64_t m0, int64_t M, int64_t nr,
                            int64_t K2, const float *A2__mq, int64_t lda2, const float *w2t,
                            float *C__mn, int64_t ldc)
{
    __m512 r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(tmp + 16 * i);
    kt_tr16x16(r);
    for (int i = 0; i < 16; ++i) _mm512_store_ps(tmp + 16 * i, r[i]);
    const int64_t mr = M - m0 < 16 ? M - m0 : 16;
    if (K2) amx_lora_tile(tmp, mr, A2__mq + m0 * lda2, lda2, K2, w2t, 16, 16);
    for (int64_t i = 0; i < mr; ++i) V_STOREN(C__mn + (m0 + i) * ldc, _mm512_load_ps(tmp + 16 * i), nr);
}

static void amx_w2_transpose(int64_t nr, int64_t K2, const float *W2__nq, int64_t ldw2, float *w2t)
{
    for (int64_t q = 0; q < K2; ++q)
        for (int j = 0; j < 16; ++j) w2t[16 * q + j] = j < nr ? W2__nq[j * ldw2 + q] : 0.0f;
}

/* The tokens' pack is taken KT_AMX_NT_KPACK bytes at a time (a chunk of k
 * blocks), so that the chunk stays in L2 while every weight row pair of the
 * call reads it: a whole pack (M x K bf16, 3.5 MiB for 256 tokens of
 * DeepSeek-V3's H = 7168) was read from L3 once per 32 weight rows.  The
 * fp32 sums of a tile are carried between chunks in a buffer (exact: the
 * tile's accumulation order is the same k blocks in the same order). */
#define KT_AMX_NT_KPACK (1024 * 1024)

static void gemm_nt_bf16_amx(int64_t M, int64_t N, int64_t K, const ktsft_bf16 *A__mk,
                             int64_t lda, const int32_t *arows, const ktsft_bf16 *W__nk,
                             int64_t ldw, int64_t K2, const float *A2__mq, int64_t lda2,
                             const float *W2__nq, int64_t ldw2, float *C__mn, int64_t ldc)
{
    if (M > KT_AMX_MBLOCK) { /* token slices: each output row still has one owner */
        for (int64_t m0 = 0; m0 < M; m0 += KT_AMX_MBLOCK) {
            const int64_t mb = M - m0 < KT_AMX_MBLOCK ? M - m0 : KT_AMX_MBLOCK;
            gemm_nt_bf16_amx(mb, N, K, arows ? A__mk : A__mk + m0 * lda, lda,
                             arows ? arows + m0 : NULL, W__nk, ldw, K2,
                             K2 ? A2__mq + m0 * lda2 : A2__mq, lda2, W2__nq, ldw2,
                             C__mn + m0 * ldc, ldc);
        }
        return;
    }
    const int64_t N16 = N & ~(int64_t)15;
    if (M < KT_AMX_MIN_M || N16 == 0 || K == 0) {
        gemm_nt_bf16_dp(M, N, K, A__mk, lda, arows, W__nk, ldw, K2, A2__mq, lda2, W2__nq, ldw2,
                        C__mn, ldc);
        return;
    }
    const int64_t nkb = (K + 31) / 32, kfull = K / 32;
    const int64_t mtiles = ((M + 15) / 16 + 1) & ~(int64_t)1; /* even: tokens go in pairs */
    /* k blocks per chunk of the pack (1 KiB per token tile and k block) */
    int64_t ckb = KT_AMX_NT_KPACK / (mtiles * 1024);
    ckb = ckb < 1 ? 1 : ckb > nkb ? nkb : ckb;
    const int64_t nchunks = (nkb + ckb - 1) / ckb;
    const int64_t ntiles = (N16 + 15) / 16;
    const size_t xt_bytes = (size_t)mtiles * ckb * 1024;
    const size_t cs_bytes = nchunks > 1 ? (size_t)ntiles * mtiles * 1024 : 0;
    const size_t w2_bytes = (size_t)(K2 > 0 ? K2 : 1) * 2 * 16 * sizeof(float);
    char *mem = kt_scratch(xt_bytes + cs_bytes + w2_bytes + 2 * 1024 + 4 * 1024);
    if (!mem) { /* out of memory for the packs: the in-place kernels */
        gemm_nt_bf16_dp(M, N, K, A__mk, lda, arows, W__nk, ldw, K2, A2__mq, lda2, W2__nq, ldw2,
                        C__mn, ldc);
        return;
    }
    uint32_t *xt = (uint32_t *)mem;
    float *cs = (float *)(mem + xt_bytes); /* [ntiles][mtiles][16][16]: C^T tiles */
    float *w2t = (float *)(mem + xt_bytes + cs_bytes);                  /* [2][K2][16] */
    ktsft_bf16 *pad = (ktsft_bf16 *)(mem + xt_bytes + cs_bytes + w2_bytes); /* [2][16][32] */
    float *tmp = (float *)(mem + xt_bytes + cs_bytes + w2_bytes + 2048); /* [4][16][16] */

    kt_tilecfg cfg;
    kt_tilecfg_init(&cfg);
    kt_tile_config(&cfg);
    const int64_t sw = ldw * (int64_t)sizeof(ktsft_bf16);
    for (int64_t ch = 0; ch < nchunks; ++ch) {
        const int64_t kb0 = ch * ckb, kb1 = kb0 + ckb < nkb ? kb0 + ckb : nkb;
        const int first = ch == 0, last = ch == nchunks - 1;
        /* the chunk's tokens: k from 32 kb0, zero past K */
        amx_pack_tokens(M, K - 32 * kb0, mtiles, kb1 - kb0, A__mk + 32 * kb0, lda, arows, xt);
        /* tiles: 0..3 C^T (n tile i, token tile j at 2i + j), 4..5 W, 6..7 tokens */
        for (int64_t n0 = 0; n0 < N16; n0 += 32) {
            const int two = n0 + 32 <= N16; /* a second 16-row tile */
            const ktsft_bf16 *w0 = W__nk + n0 * ldw, *w1 = w0 + 16 * ldw;
            if (kb1 > kfull) {
                amx_pad_rows(16, w0, ldw, 32 * kfull, K, pad);
                if (two) amx_pad_rows(16, w1, ldw, 32 * kfull, K, pad + 512);
            }
            if (last && K2) {
                amx_w2_transpose(16, K2, W2__nq + n0 * ldw2, ldw2, w2t);
                if (two) amx_w2_transpose(16, K2, W2__nq + (n0 + 16) * ldw2, ldw2, w2t + 16 * K2);
            }
            float *cs0 = cs + (n0 / 16) * mtiles * 256, *cs1 = cs0 + mtiles * 256;
            for (int64_t mt = 0; mt < mtiles; mt += 2) {
                const uint32_t *x0 = xt + mt * (kb1 - kb0) * 256, *x1 = x0 + (kb1 - kb0) * 256;
                if (first) {
                    TZERO(0);
                    TZERO(1);
                    if (two) {
                        TZERO(2);
                        TZERO(3);
                    }
                } else {
                    TLOAD(0, cs0 + mt * 256, 64);
                    TLOAD(1, cs0 + mt * 256 + 256, 64);
                    if (two) {
                        TLOAD(2, cs1 + mt * 256, 64);
                        TLOAD(3, cs1 + mt * 256 + 256, 64);
                    }
                }
                /* the first token pair brings the weight rows in; later ones hit L2 */
                const int64_t pfd = mt == 0 ? KT_AMX_NT_PF : 0;
                for (int64_t kb = kb0; kb < kb1; ++kb) {
                    const int tail = kb == kfull;
                    if (pfd && kb + pfd < kfull)
                        for (int i = 0; i < 16; ++i) {
                            _mm_prefetch((const char *)(w0 + i * ldw + 32 * (kb + pfd)), _MM_HINT_T0);
                            if (two) _mm_prefetch((const char *)(w1 + i * ldw + 32 * (kb + pfd)), _MM_HINT_T0);
                        }
                    TLOAD(6, x0 + (kb - kb0) * 256, 64);
                    TLOAD(7, x1 + (kb - kb0) * 256, 64);
                    if (tail) TLOAD(4, pad, 64);
                    else TLOAD(4, w0 + 32 * kb, sw);
                    TDP(0, 4, 6);
                    TDP(1, 4, 7);
                    if (two) {
                        if (tail) TLOAD(5, pad + 512, 64);
                        else TLOAD(5, w1 + 32 * kb, sw);
                        TDP(2, 5, 6);
                        TDP(3, 5, 7);
                    }
                }
                if (!last) {
                    TSTORE(0, cs0 + mt * 256, 64);
                    TSTORE(1, cs0 + mt * 256 + 256, 64);
                    if (two) {
                        TSTORE(2, cs1 + mt * 256, 64);
                        TSTORE(3, cs1 + mt * 256 + 256, 64);
                    }
                    continue;
                }
                TSTORE(0, tmp, 64);
                TSTORE(1, tmp + 256, 64);
                if (two) {
                    TSTORE(2, tmp + 512, 64);
                    TSTORE(3, tmp + 768, 64);
                }
                for (int i = 0; i < (two ? 2 : 1); ++i)
                    for (int j = 0; j < 2; ++j) {
                        const int64_t m0 = 16 * (mt + j);
                        if (m0 >= M) continue;
                        amx_nt_epilogue(tmp + 256 * (2 * i + j), m0, M, 16, K2, A2__mq, lda2,
                                        w2t + 16 * K2 * i, C__mn + n0 + 16 * i, ldc);
                    }
            }
        }
    }
    TRELEASE();
    if (N16 < N) /* the last N % 16 rows */
        gemm_nt_bf16_dp(M, N - N16, K, A__mk, lda, arows, W__nk + N16 * ldw, ldw, K2, A2__mq,
                        lda2, K2 ? W2__nq + N16 * ldw2 : NULL, ldw2, C__mn + N16, ldc);
}

/* ------------------------------------------------------------------------
 * NN: C[m, n] (+)= sum_o A[row(m), o] W[o, n] + sum_q A2[m, q] W2[q, n]
 * ---------------------------------------------------------------------- */

/* NN weights are packed in blocks of up to KT_AMX_NN_COLS columns x
 * KT_AMX_NN_OCHUNK rows (1 MiB, in a 2 MiB L2): each row's columns are read
 * as one contiguous run of up to 4 KiB, so the prefetchers stream them (a
 * 32-column panel alone would take 64 bytes from each 4 KiB-apart row). */
#define KT_AMX_NN_COLS 2048
#define KT_AMX_NN_OCHUNK 256

/* tmp[16][16] (tokens x columns) -> C rows m0.., columns n0.. (nc of them),
 * plus the LoRA term (tmp is overwritten) */
static void amx_nn_epilogue(float *tmp, int64_t m0, int64_t M, int64_t n0, int64_t nc,
                            int64_t O2, const float *A2__mq, int64_t lda2, const float *W2__qn,
                            int64_t ldw2, float *C__mn, int64_t ldc, int accumulate)
{
    const int64_t mr = M - m0 < 16 ? M - m0 : 16;
    if (O2) amx_lora_tile(tmp, mr, A2__mq + m0 * lda2, lda2, O2, W2__qn + n0, ldw2, nc);
    for (int64_t i = 0; i < mr; ++i) {
        float *c = C__mn + (m0 + i) * ldc + n0;
        __m512 v = _mm512_load_ps(tmp + 16 * i);
        if (accumulate) v = _mm512_add_ps(V_LOADN(c, nc), v);
        V_STOREN(c, v, nc);
    }
}

static void gemm_nn_bf16_amx(int64_t M, int64_t N, int64_t O, const ktsft_bf16 *A__mo,
                             int64_t lda, const int32_t *arows, const ktsft_bf16 *W__on,
                             int64_t ldw, int64_t O2, const float *A2__mq, int64_t lda2,
                             const float *W2__qn, int64_t ldw2, float *C__mn, int64_t ldc,
                             int accumulate)
{
    if (M > KT_AMX_MBLOCK) {
        for (int64_t m0 = 0; m0 < M; m0 += KT_AMX_MBLOCK) {
            const int64_t mb = M - m0 < KT_AMX_MBLOCK ? M - m0 : KT_AMX_MBLOCK;
            gemm_nn_bf16_amx(mb, N, O, arows ? A__mo : A__mo + m0 * lda, lda,
                             arows ? arows + m0 : NULL, W__on, ldw, O2,
                             O2 ? A2__mq + m0 * lda2 : A2__mq, lda2, W2__qn, ldw2,
                             C__mn + m0 * ldc, ldc, accumulate);
        }
        return;
    }
    if (M < KT_AMX_MIN_M || O == 0) {
        gemm_nn_bf16_dp(M, N, O, A__mo, lda, arows, W__on, ldw, O2, A2__mq, lda2, W2__qn, ldw2,
                        C__mn, ldc, accumulate);
        return;
    }
    const int64_t Op = (O + 31) & ~(int64_t)31;
    const int64_t och = Op < KT_AMX_NN_OCHUNK ? Op : KT_AMX_NN_OCHUNK;
    const int64_t mtiles = ((M + 15) / 16 + 1) & ~(int64_t)1;
    /* the activations are read in place when their rows are evenly spaced
     * and every tile lies inside them; otherwise packed with zero padding */
    const int direct = !arows && O % 32 == 0 && M % 32 == 0;
    const size_t ap_bytes = direct ? 0 : (size_t)mtiles * 16 * Op * sizeof(ktsft_bf16);
    const size_t pk_bytes = (size_t)och * KT_AMX_NN_COLS * sizeof(ktsft_bf16);
    /* fp32 sums carried between row chunks (only when there are several) */
    const size_t cs_bytes = Op > och ? (size_t)mtiles * 16 * KT_AMX_NN_COLS * sizeof(float) : 0;
    char *mem = kt_scratch(ap_bytes + pk_bytes + cs_bytes + 4 * 1024);
    if (!mem) {
        gemm_nn_bf16_dp(M, N, O, A__mo, lda, arows, W__on, ldw, O2, A2__mq, lda2, W2__qn, ldw2,
                        C__mn, ldc, accumulate);
        return;
    }
    ktsft_bf16 *ap = (ktsft_bf16 *)mem;
    ktsft_bf16 *pk = (ktsft_bf16 *)(mem + ap_bytes);
    float *cs = (float *)(mem + ap_bytes + pk_bytes);
    float *tmp = (float *)(mem + ap_bytes + pk_bytes + cs_bytes); /* [4][16][16] */
    const ktsft_bf16 *abase = A__mo;
    int64_t sa = lda * (int64_t)sizeof(ktsft_bf16);
    if (!direct) {
        for (int64_t m = 0; m < mtiles * 16; ++m) {
            ktsft_bf16 *dst = ap + m * Op;
            if (m < M) {
                memcpy(dst, A__mo + (arows ? (int64_t)arows[m] : m) * lda, (size_t)O * sizeof(ktsft_bf16));
                memset(dst + O, 0, (size_t)(Op - O) * sizeof(ktsft_bf16));
            } else {
                memset(dst, 0, (size_t)Op * sizeof(ktsft_bf16));
            }
        }
        abase = ap;
        sa = Op * (int64_t)sizeof(ktsft_bf16);
    }
    const int64_t arow16 = 16 * (sa / (int64_t)sizeof(ktsft_bf16)); /* elements per 16 rows */
    const int64_t scs = KT_AMX_NN_COLS * (int64_t)sizeof(float);

    kt_tilecfg cfg;
    kt_tilecfg_init(&cfg);
    kt_tile_config(&cfg);
    /* tiles: 0..3 C (token tile i, column tile j at 2i + j), 4..5 tokens, 6..7 W pairs */
    for (int64_t nb0 = 0; nb0 < N; nb0 += KT_AMX_NN_COLS) {
        const int64_t ncb = N - nb0 < KT_AMX_NN_COLS ? N - nb0 : KT_AMX_NN_COLS;
        for (int64_t o0 = 0; o0 < Op; o0 += och) {
            const int64_t oc = Op - o0 < och ? Op - o0 : och;
            const int first = o0 == 0, last = o0 + oc >= Op;
            /* rows [o0, o0 + oc) as bf16 pairs, zero at and past O */
            bnn_pack(O - o0 < oc ? O - o0 : oc, oc, W__on + o0 * ldw + nb0, ldw, ncb, pk,
                     KT_AMX_NN_PF);
            for (int64_t c0 = 0; c0 < ncb; c0 += 32) {
                const ktsft_bf16 *pp = pk + (c0 / 32) * oc * 32;
                const int64_t ncols = ncb - c0 < 32 ? ncb - c0 : 32;
                for (int64_t mt = 0; mt < mtiles; mt += 2) {
                    const ktsft_bf16 *a0 = abase + mt * arow16 + o0, *a1 = a0 + arow16;
                    float *cst = cs + mt * 16 * KT_AMX_NN_COLS + c0;
                    if (first) {
                        TZERO(0);
                        TZERO(1);
                        TZERO(2);
                        TZERO(3);
                    } else {
                        TLOAD(0, cst, scs);
                        TLOAD(1, cst + 16, scs);
                        TLOAD(2, cst + 16 * KT_AMX_NN_COLS, scs);
                        TLOAD(3, cst + 16 * KT_AMX_NN_COLS + 16, scs);
                    }
                    for (int64_t o = 0; o < oc; o += 32) {
                        TLOAD(4, a0 + o, sa);
                        TLOAD(5, a1 + o, sa);
                        TLOAD(6, pp + o * 32, 128);
                        TLOAD(7, pp + o * 32 + 32, 128);
                        TDP(0, 4, 6);
                        TDP(1, 4, 7);
                        TDP(2, 5, 6);
                        TDP(3, 5, 7);
                    }
                    if (!last) {
                        TSTORE(0, cst, scs);
                        TSTORE(1, cst + 16, scs);
                        TSTORE(2, cst + 16 * KT_AMX_NN_COLS, scs);
                        TSTORE(3, cst + 16 * KT_AMX_NN_COLS + 16, scs);
                        continue;
                    }
                    TSTORE(0, tmp, 64);
                    TSTORE(1, tmp + 256, 64);
                    TSTORE(2, tmp + 512, 64);
                    TSTORE(3, tmp + 768, 64);
                    for (int i = 0; i < 2; ++i)
                        for (int j = 0; j < 2; ++j) {
                            const int64_t m0 = 16 * (mt + i), cj = 16 * j;
                            if (m0 >= M || cj >= ncols) continue;
                            amx_nn_epilogue(tmp + 256 * (2 * i + j), m0, M, nb0 + c0 + cj,
                                            ncols - cj < 16 ? ncols - cj : 16, O2, A2__mq, lda2,
                                            W2__qn, ldw2, C__mn, ldc, accumulate);
                        }
                }
            }
        }
    }
    TRELEASE();
}

KT_BF16_ENTRIES(gemm_nt_bf16_amx, gemm_nn_bf16_amx)

const ktsft_kernels *ktsft_kernels_amx(void)
{
#ifdef KT_AMX_EMULATE
    KT_TABLE("amx-emulated", kt_release_scratch, kt_scratch_bytes);
#else
    KT_TABLE("amx", kt_release_scratch, kt_scratch_bytes);
#endif
    return &table;
}
