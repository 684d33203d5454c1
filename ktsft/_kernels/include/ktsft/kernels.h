/* Kernel table shared by every ISA build of ktsft.
 *
 * Each ISA translation unit (src/kernels_<isa>.c) is compiled with its own
 * flags, keeps all its functions static and exports one getter that returns
 * its table.  dispatch.c picks a table at import time.  Parameter names carry
 * their shapes: W__ok is a row-major [O, K] matrix.
 */
#ifndef KTSFT_KERNELS_H
#define KTSFT_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define KTSFT_HIDDEN __attribute__((visibility("hidden")))
#else
#define KTSFT_HIDDEN
#endif

typedef uint16_t ktsft_bf16;

/* NN products walk W down its rows, ldw apart.  With a power-of-two ldw
 * those rows alias into few cache sets, so the contraction is cut into
 * chunks of this many rows (even, for bf16 pairs) that stay in L2. */
#define KT_NN_OCHUNK 192
/* bytes of one packed chunk of W (KT_NN_OCHUNK rows), L2-resident */
#define KT_NN_PACK_BYTES (96 * 1024)
/* The AVX512-BF16 NN product streams W without a pack for at most this
 * many tokens (moe_sft.pyx then gives those experts whole-row tasks).
 * Harness on cold weights, 2-core Zen 5: 9-11 tokens 11-20% faster than
 * pack + tiles, 12 even, 16 twice slower. */
#define KT_NN_STREAM_MAX 11
/* The fp32-FMA NN products (fp32, int8, int4 weights, and bf16 below
 * AVX512-BF16) stream W row by row for at most this many tokens, and
 * moe_sft.pyx gives those experts whole-row tasks. */
#define KT_NN_STREAM_FEW 8

/* One GEMM, described: the base products (weights of the layer's kind) and
 * the fp32 LoRA products all go through the two entry points of a table,
 * nt[kind] and nn[kind], the kind fixed when the layer is built.
 *   NT (contraction along the rows of W, as in y = W x):
 *     C[m, n] = sum_k A[row(m), k] W[n, k] + sum_q A2[m, q] W2[n, q]
 *   NN (along the columns of W, as in dx = W^T dy):
 *     C[m, n] (+)= sum_k A[row(m), k] W[k, n] + sum_q A2[m, q] W2[q, n]
 * row(m) = arows[m] when arows is given, else m.  The second term is the
 * fp32 LoRA term (K2 = 0 drops it).  NT overwrites C; NN adds to it when
 * accumulate != 0, and its W and W2 point at the first column of the block.
 * Activations are bf16 for bf16 weights, else fp32.  Quantized weights are
 * dequantized in registers: element (o, i) of W is wscale[o * sld + i /
 * group] * q, wscale pointing at the scales of W's first row (int8: q in
 * [-127, 127], one group per row; int4: two per byte, element 2i in the
 * low nibble, stored as q + 8, ldw and offsets counting elements, even). */
typedef struct ktsft_gemm {
    int64_t M, N, K;
    const void *A;
    int64_t lda;
    const int32_t *arows;
    const void *W;
    int64_t ldw;
    int64_t K2;
    const float *A2;
    int64_t lda2;
    const float *W2;
    int64_t ldw2;
    float *C;
    int64_t ldc;
    int accumulate;
    const float *wscale;
    int64_t group, sld;
} ktsft_gemm;
typedef void (*ktsft_gemm_fn)(const ktsft_gemm *g);

/* the weight kinds, the index of nt[] and nn[] */
enum { KTSFT_W_F32 = 0, KTSFT_W_BF16 = 1, KTSFT_W_Q8 = 2, KTSFT_W_Q4 = 3, KTSFT_W_KINDS = 4 };

/* Sum of outer products, one owner per output, pairs in order:
 *   C[a, b] (+)= sum_p coef[p] * U[urow(p), a] * V[vrow(p), b]   (coef NULL = 1)
 * accumulate != 0 adds the finished sum to C (gradient accumulation). */
typedef void (*ktsft_outer_f32_fn)(
    int64_t P, int64_t NA, int64_t NB,
    const float *U__pa, int64_t ldu, const int32_t *urows, const float *coef__p,
    const float *V__pb, int64_t ldv, const int32_t *vrows,
    float *C__ab, int64_t ldc, int accumulate);

/* h = silu(g) * u; h_bf16 (optional) gets h rounded to nearest even. */
typedef void (*ktsft_swiglu_forward_fn)(
    int64_t n, const float *g__i, const float *u__i, float *h__i, ktsft_bf16 *h_bf16__i);
/* Given dh_unweighted (= W_d^T dO + s A_d^T B_d^T dO) and the routing weight w:
 * returns <dh_unweighted, h>, writes dG over g, dU over u and h over dh. */
typedef float (*ktsft_swiglu_backward_fn)(
    int64_t n, float w, float *g_to_dg__i, float *u_to_du__i, float *dh_to_h__i);

/* out[i] = round_bf16(x[i]) */
typedef void (*ktsft_round_bf16_fn)(int64_t n, const float *x__i, ktsft_bf16 *out__i);

/* out[h] = sum_j w[j] * Y[pos[j], h] (w NULL = 1), slots in order. */
typedef void (*ktsft_combine_fn)(
    int64_t k, int64_t n, const float *Y__pn, const int32_t *pos__j, const float *w__j,
    float *out__n);

/* LoRA dropout, regenerated instead of stored.  Element j of row (proj, tj)
 * is kept when kt_dropout_hash(seed, proj, tj, j) >= threshold
 * (threshold = floor(p * 2^32)); ktsft/reference.py has the same hash in
 * numpy.  Writes (accumulate = 0) or adds (accumulate != 0)
 *   out[i] = keep(i0 + i) ? x[i] * inv_keep : 0,   i in [0, n). */
typedef void (*ktsft_dropout_f32_fn)(
    int64_t n, uint64_t seed, int32_t proj, int64_t tj, int64_t i0, uint32_t threshold,
    float inv_keep, const float *x__i, float *out__i, int accumulate);

/* One AdamW step (torch.optim.AdamW's math: decoupled weight decay, bias
 * correction), element by element over n fp32 values; each array read once
 * and written once.  vmax__i: the AMSGrad running maximum, or NULL. */
typedef struct ktsft_adamw_hp {
    float decay;        /* 1 - lr * weight_decay, applied to the parameter first */
    float lerp_weight;  /* 1 - beta1: exp_avg.lerp_(grad, 1 - beta1) */
    float beta2;
    float one_minus_beta2;
    float neg_step_size; /* -lr / (1 - beta1^step) */
    float inv_bc2_sqrt; /* 1 / sqrt(1 - beta2^step) */
    float eps;
    int maximize;
} ktsft_adamw_hp;
typedef void (*ktsft_adamw_f32_fn)(
    int64_t n, float *p__i, const float *g__i, float *m__i, float *v__i, float *vmax__i,
    const ktsft_adamw_hp *hp);

typedef struct ktsft_kernels {
    const char *name;
    ktsft_gemm_fn nt[KTSFT_W_KINDS];
    ktsft_gemm_fn nn[KTSFT_W_KINDS];
    ktsft_outer_f32_fn outer_f32;
    ktsft_swiglu_forward_fn swiglu_forward;
    ktsft_swiglu_backward_fn swiglu_backward;
    ktsft_round_bf16_fn round_bf16;
    ktsft_combine_fn combine;
    ktsft_dropout_f32_fn dropout_f32;
    ktsft_adamw_f32_fn adamw_f32;
    /* frees every thread's kept scratch (NULL: the build keeps none); only
     * while no call of this build runs (the last layer using it is gone) */
    void (*release_scratch)(void);
    /* bytes of kept scratch over all threads (NULL: none kept) */
    size_t (*scratch_bytes)(void);
} ktsft_kernels;

KTSFT_HIDDEN const ktsft_kernels *ktsft_kernels_scalar(void);
#if defined(KTSFT_X86_KERNELS)
KTSFT_HIDDEN const ktsft_kernels *ktsft_kernels_avx2(void);
KTSFT_HIDDEN const ktsft_kernels *ktsft_kernels_avx512(void);
KTSFT_HIDDEN const ktsft_kernels *ktsft_kernels_avx512bf16(void);
#endif
#if defined(KTSFT_AMX_KERNELS)
KTSFT_HIDDEN const ktsft_kernels *ktsft_kernels_amx(void);
#endif

/* Table for an ISA name ("scalar", "avx2", "avx512", "avx512bf16", "amx"),
 * or NULL when that build is absent.  It does not check the CPU: see
 * cpu_features.h. */
const ktsft_kernels *ktsft_kernels_by_name(const char *name);
/* 0: no AMX build; 1: AMX tiles; 2: the C model of the tiles (development) */
int ktsft_amx_build(void);

#ifdef __cplusplus
}
#endif
#endif
