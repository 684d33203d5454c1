/* Portable path: plain C at the compiler's baseline flags (any x86-64,
 * aarch64, ...).  The same register blocking as the SIMD builds, one lane wide. */
#include "ktsft/kernels.h"
#include "common.inc"

typedef float VF;
#define VLEN 1
#define V_ZERO() 0.0f
#define V_SET1(x) (x)
#define V_MUL(a, b) ((a) * (b))
#define V_ADD(a, b) ((a) + (b))
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

#define KT_LOAD_F32(p) (*(p))
#define KT_LOAD_BF16(p) kt_bf16_to_f32(*(p))
#define KT_LOADN_BF16(p, n) ((n) > 0 ? kt_bf16_to_f32(*(p)) : 0.0f)
#define KT_LOAD_I8(p) ((float)*(p))
#define KT_LOADN_I8(p, n) ((n) > 0 ? (float)*(p) : 0.0f)
#define KT_LOAD_I4(row, k) kt_i4_at(row, k)
#define KT_LOADN_I4(row, k, n) ((n) > 0 ? kt_i4_at(row, k) : 0.0f)
#define OUT_RT 8
#include "instances.inc"

KT_BF16_ENTRIES(gemm_nt_bf16, gemm_nn_bf16)

const ktsft_kernels *ktsft_kernels_scalar(void)
{
    KT_TABLE("scalar", NULL, NULL);
    return &table;
}
