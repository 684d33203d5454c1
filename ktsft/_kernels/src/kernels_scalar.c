/* Portable path: plain C at the compiler's baseline flags (any x86-64,
 * aarch64, ...).  The same register blocking as the SIMD builds, one lane wide. */
#include "ktsft/kernels.h"
#include "common.inc"

typedef float VF;
#define VLEN 1
#define V_ZERO() 0.0f
#define V_SET1(x) (x)
#define V_MUL(a, b) ((a) * (b))
#define V_FMA(a, b, c) ((a) * (b) + (c))
#define V_LOADN(p, n) ((n) > 0 ? *(p) : 0.0f)
#define V_STOREN(p, v, n) do { if ((n) > 0) *(p) = (v); } while (0)
#define V_REDUCE(v) (v)
#define NT_MR 4
#define NT_NR 4
#define NN_MR 4
#define NN_NV 4

/* int4: two per byte, element 2i in the low nibble, stored as q + 8 */
static inline float kt_i4_at(const uint8_t *row, int64_t k)
{
    const int v = (row[k >> 1] >> ((k & 1) * 4)) & 0xf;
    return (float)(v - 8);
}

#define T_ELT float
#define T_NAME(x) x##_f32
#define T_LOAD(p) (*(p))
#define T_LOADN(p, n) V_LOADN(p, n)
#define T_TOF32(x) (x)
#include "gemm_fma.inc"

#undef T_ELT
#undef T_NAME
#undef T_LOAD
#undef T_LOADN
#undef T_TOF32
#define T_ELT float
#define T_NAME(x) x##_q8
#define T_LOAD(p) (*(p))
#define T_LOADN(p, n) V_LOADN(p, n)
#define T_TOF32(x) (x)
#define W_ELT int8_t
#define W_LOAD(p) ((float)*(p))
#define W_LOADN(p, n) ((n) > 0 ? (float)*(p) : 0.0f)
#define W_SCALED 1
#include "gemm_fma.inc"
#undef W_ELT
#undef W_LOAD
#undef W_LOADN
#undef W_SCALED

#undef T_ELT
#undef T_NAME
#undef T_LOAD
#undef T_LOADN
#undef T_TOF32
#define T_ELT float
#define T_NAME(x) x##_q4
#define T_LOAD(p) (*(p))
#define T_LOADN(p, n) V_LOADN(p, n)
#define T_TOF32(x) (x)
#define W_ELT uint8_t
#define W_LOAD(p) 0
#define W_LOADN(p, n) 0
#define W_SCALED 1
#define W_AT(p, e) ((p) + ((e) >> 1))
#define W_LOADK(p, k) kt_i4_at(p, k)
#define W_LOADNK(p, k, n) ((n) > 0 ? kt_i4_at(p, k) : 0.0f)
#define W_BYTES(n) ((size_t)((n) + 1) / 2)
#include "gemm_fma.inc"
#undef W_ELT
#undef W_LOAD
#undef W_LOADN
#undef W_SCALED
#undef W_AT
#undef W_LOADK
#undef W_LOADNK
#undef W_BYTES

#define OUT_RT 8
#include "outer_fma.inc"
#undef T_ELT
#undef T_NAME
#undef T_LOAD
#undef T_LOADN
#undef T_TOF32

#define T_ELT ktsft_bf16
#define T_NAME(x) x##_bf16
#define T_LOAD(p) kt_bf16_to_f32(*(p))
#define T_LOADN(p, n) ((n) > 0 ? kt_bf16_to_f32(*(p)) : 0.0f)
#define T_TOF32(x) kt_bf16_to_f32(x)
#include "gemm_fma.inc"

const ktsft_kernels *ktsft_kernels_scalar(void)
{
    static const ktsft_kernels table = {
        "scalar",     gemm_nt_f32,        gemm_nt_bf16,       gemm_nn_f32,   gemm_nn_bf16,
        gemm_nt_q8, gemm_nn_q8, gemm_nt_q4, gemm_nn_q4, kt_outer_f32, kt_swiglu_forward, kt_swiglu_backward, kt_round_bf16, kt_combine,
    };
    return &table;
}
