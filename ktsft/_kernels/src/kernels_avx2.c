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

/* int4 (two per byte, element 2i in the low nibble, stored as q + 8) through
 * a table of its 16 values (q - 8) * s, one rounding as converting q - 8 and
 * multiplying by s would give: the same bits.  Eight lanes hold half the
 * table, so vpermps picks from each half by the low three bits of the nibble
 * and vblendvps between them by its fourth.  The 4 bytes are broadcast and
 * shifted per lane: lane j gets nibble j in its low bits (vpermps ignores
 * the bits above) and nibble j's top bit in its sign bit.  Six instructions
 * per 8 weights, dequantization included, instead of ten. */
typedef struct {
    __m256 lo, hi; /* q = 0..7 and q = 8..15 */
} kt_i4tab;

static inline kt_i4tab kt_i4_table8(float s)
{
    const __m256 sv = _mm256_set1_ps(s);
    kt_i4tab t;
    t.lo = _mm256_mul_ps(_mm256_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1), sv);
    t.hi = _mm256_mul_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), sv);
    return t;
}

static inline __m256 kt_deq_i4x8_word(int32_t w, kt_i4tab t)
{
    const __m256i v = _mm256_set1_epi32(w);
    const __m256i idx = _mm256_srlv_epi32(v, _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
    const __m256i top = _mm256_sllv_epi32(v, _mm256_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.lo, idx),
                            _mm256_permutevar8x32_ps(t.hi, idx), _mm256_castsi256_ps(top));
}

static inline __m256 kt_deq_i4x8(const uint8_t *p, kt_i4tab t)
{
    int32_t w;
    memcpy(&w, p, 4);
    return kt_deq_i4x8_word(w, t);
}

/* lanes [n, 8) are zero, as the converted load's were (q = 0 would be -8 s) */
static inline __m256 kt_deqn_i4x8(const uint8_t *p, int64_t n, kt_i4tab t)
{
    uint8_t tmp[4] = {0};
    for (int64_t i = 0; i < (n + 1) / 2 && i < 4; ++i) tmp[i] = p[i];
    int32_t w;
    memcpy(&w, tmp, 4);
    return _mm256_and_ps(kt_deq_i4x8_word(w, t), _mm256_castsi256_ps(kt_mask8(n)));
}

#define KT_LOAD_F32(p) _mm256_loadu_ps(p)
#define KT_LOAD_BF16(p) kt_load_bf16x8(p)
#define KT_LOADN_BF16(p, n) kt_loadn_bf16x8(p, n)
/* a bf16 in every lane without a trip through a general register: the
 * 16-bit broadcast puts it in both halves of each lane, the shift makes
 * the lane its fp32 value (the same bits as kt_bf16_to_f32) */
#define KT_BCAST_BF16(p) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_set1_epi16((short)*(p)), 16))
#define KT_LOAD_I8(p) kt_load_i8x8(p)
#define KT_LOADN_I8(p, n) kt_loadn_i8x8(p, n)
#define KT_I4_TABLE_T kt_i4tab
#define KT_I4_TABLE(s) kt_i4_table8(s)
#define KT_DEQ_I4(row, k, t) kt_deq_i4x8((row) + ((k) >> 1), t)
#define KT_DEQN_I4(row, k, n, t) kt_deqn_i4x8((row) + ((k) >> 1), n, t)
#define OUT_RT 12
#include "instances.inc"

KT_BF16_ENTRIES(gemm_nt_bf16, gemm_nn_bf16)

const ktsft_kernels *ktsft_kernels_avx2(void)
{
    KT_TABLE("avx2", NULL, NULL);
    return &table;
}
