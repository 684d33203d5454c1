/* AVX-512 path (F, BW, VL, DQ: Skylake-SP / Zen 4 and later); bf16 weights
 * are widened to fp32 in registers.  Compiled with -mavx512f -mavx512bw ... */
#include "ktsft/kernels.h"
#include "common.inc"
#include "avx512_vocab.h"

#include "instances.inc"

KT_BF16_ENTRIES(gemm_nt_bf16, gemm_nn_bf16)

const ktsft_kernels *ktsft_kernels_avx512(void)
{
    KT_TABLE("avx512", NULL, NULL);
    return &table;
}
