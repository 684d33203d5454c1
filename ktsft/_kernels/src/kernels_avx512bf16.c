/* AVX512-BF16 path (Cooper Lake, Sapphire Rapids, Zen 4 and later):
 * vdpbf16ps multiplies bf16 pairs and accumulates in fp32 lanes. */
#include <stdlib.h>
#include "ktsft/kernels.h"
#include "common.inc"
#include "avx512_vocab.h"

#define KT_OWN_BF16 /* the vdpbf16ps products of bf16_dp.inc */
#include "instances.inc"
#include "bf16_dp.inc"

KT_BF16_ENTRIES(gemm_nt_bf16_dp, gemm_nn_bf16_dp)

const ktsft_kernels *ktsft_kernels_avx512bf16(void)
{
    KT_TABLE("avx512bf16", NULL, NULL);
    return &table;
}
