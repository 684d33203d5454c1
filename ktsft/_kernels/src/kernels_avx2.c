/* AVX2 + FMA path (Haswell / Zen 1 and later).  Compiled with -mavx2 -mfma. */
#include <immintrin.h>
#include "ktsft/kernels.h"
#include "common.inc"

typedef __m256 VF;
#define VLEN 8
#define V_ZERO() _mm256_setzero_ps()
#define V_SET1(x) _mm256_set1_ps(x)
#define V_MUL(a, b) _mm256_mul_ps(a, b)
#define V_ADD(a, b) _mm256_add_ps(a, b)
#define V_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define V_LOADN(p, n) kt_loadn8(p, n)
#define V_STOREN(p, v, n) kt_storen8(p, v, n)
#define V_REDUCE(v) kt_hsum8(v)
#define NT_MR 3
#define NT_NR 3
#define NN_MR 6
#define NN_NV 2

/* lanes [0, n) set; n <= 0 gives an empty mask, which touches no memory */
static inline __m256i kt_mask8(int64_t n)
{
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    int32_t c = n > 8 ? 8 : (int32_t)n;
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), iota);
}

/* Whole vectors take plain loads and stores: AMD's Zen 1-3 microcode the
 * masked ones (vmaskmovps, a store about every 12 cycles), and the few-token
 * NN kernels load and store a vector of C per 4 weight vectors.  The values
 * moved are the same, so the bits are. */
static inline __m256 kt_loadn8(const float *p, int64_t n)
{
    return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, kt_mask8(n));
}

static inline void kt_storen8(float *p, __m256 v, int64_t n)
{
    if (n >= 8)
        _mm256_storeu_ps(p, v);
    else
        _mm256_maskstore_ps(p, kt_mask8(n), v);
}

static inline float kt_hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 kt_load_bf16x8(const ktsft_bf16 *p)
{
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

static inline __m256 kt_loadn_bf16x8(const ktsft_bf16 *p, int64_t n)
{
    ktsft_bf16 tmp[8] = {0};
    for (int64_t i = 0; i < n && i < 8; ++i) tmp[i] = p[i];
    return kt_load_bf16x8(tmp);
}

static inline __m256 kt_load_i8x8(const int8_t *p)
{
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

static inline __m256 kt_loadn_i8x8(const int8_t *p, int64_t n)
{
    int8_t tmp[16] = {0};
    for (int64_t i = 0; i < n && i < 8; ++i) tmp[i] = p[i];
    return kt_load_i8x8(tmp);
}

/* int4: two per byte, element 2i in the low nibble, stored as q + 8 */
static inline __m256 kt_load_i4x8(const uint8_t *p)
{
    int32_t w;
    memcpy(&w, p, 4);
    const __m128i b = _mm_cvtsi32_si128(w);
    const __m128i m = _mm_set1_epi8(0x0f);
    const __m128i v = _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(v), _mm256_set1_epi32(8)));
}

static inline __m256 kt_loadn_i4x8(const uint8_t *p, int64_t n)
{
    uint8_t tmp[8] = {0};
    for (int64_t i = 0; i < (n + 1) / 2 && i < 4; ++i) tmp[i] = p[i];
    return _mm256_and_ps(kt_load_i4x8(tmp), _mm256_castsi256_ps(kt_mask8(n)));
}

#define KT_LOAD_F32(p) _mm256_loadu_ps(p)
#define KT_LOAD_BF16(p) kt_load_bf16x8(p)
#define KT_LOADN_BF16(p, n) kt_loadn_bf16x8(p, n)
#define KT_LOAD_I8(p) kt_load_i8x8(p)
#define KT_LOADN_I8(p, n) kt_loadn_i8x8(p, n)
#define KT_LOAD_I4(row, k) kt_load_i4x8((row) + ((k) >> 1))
#define KT_LOADN_I4(row, k, n) kt_loadn_i4x8((row) + ((k) >> 1), n)
#define OUT_RT 12
#include "instances.inc"

KT_BF16_ENTRIES(gemm_nt_bf16, gemm_nn_bf16)

const ktsft_kernels *ktsft_kernels_avx2(void)
{
    KT_TABLE("avx2", NULL, NULL);
    return &table;
}
