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
        gemm_nt_q8, gemm_nn_q8, kt_outer_f32, kt_swiglu_forward, kt_swiglu_backward, kt_round_bf16, kt_combine,
    };
    return &table;
}
