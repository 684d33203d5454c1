/* AVX-512 path (F, BW, VL, DQ: Skylake-SP / Zen 4 and later); bf16 weights
 * are widened to fp32 in registers.  Compiled with -mavx512f -mavx512bw ... */
#include "ktsft/kernels.h"
#include "common.inc"
#include "avx512_vocab.h"

#define T_ELT float
#define T_NAME(x) x##_f32
#define T_LOAD(p) _mm512_loadu_ps(p)
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
#define T_LOAD(p) _mm512_loadu_ps(p)
#define T_LOADN(p, n) V_LOADN(p, n)
#define T_TOF32(x) (x)
#define W_ELT int8_t
#define W_LOAD(p) KT_LOAD_I8X16(p)
#define W_LOADN(p, n) KT_LOADN_I8X16(p, n)
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
#define T_LOAD(p) _mm512_loadu_ps(p)
#define T_LOADN(p, n) V_LOADN(p, n)
#define T_TOF32(x) (x)
#define W_ELT uint8_t
#define W_LOAD(p) 0
#define W_LOADN(p, n) 0
#define W_SCALED 1
#define W_AT(p, e) ((p) + ((e) >> 1))
#define W_LOADK(p, k) kt_load_i4x16(W_AT(p, k))
#define W_LOADNK(p, k, n) kt_loadn_i4x16(W_AT(p, k), n)
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

#define OUT_RT 16
#include "outer_fma.inc"
#undef T_ELT
#undef T_NAME
#undef T_LOAD
#undef T_LOADN
#undef T_TOF32

#define T_ELT ktsft_bf16
#define T_NAME(x) x##_bf16
#define T_LOAD(p) KT_LOAD_BF16X16(p)
#define T_LOADN(p, n) KT_LOADN_BF16X16(p, n)
#define T_TOF32(x) kt_bf16_to_f32(x)
#include "gemm_fma.inc"

const ktsft_kernels *ktsft_kernels_avx512(void)
{
    static const ktsft_kernels table = {
        "avx512",     gemm_nt_f32,        gemm_nt_bf16,       gemm_nn_f32,   gemm_nn_bf16,
        gemm_nt_q8, gemm_nn_q8, gemm_nt_q4, gemm_nn_q4, kt_outer_f32, kt_swiglu_forward, kt_swiglu_backward, kt_round_bf16, kt_combine,
    };
    return &table;
}
