/* The AVX-512 (F+BW+VL+DQ) vector vocabulary for gemm_fma.inc, shared by the
 * avx512 and avx512bf16 units.  Static inline only: no symbol leaves a unit. */
#ifndef KTSFT_AVX512_VOCAB_H
#define KTSFT_AVX512_VOCAB_H
#include <immintrin.h>

typedef __m512 VF;
#define VLEN 16
#define V_ZERO() _mm512_setzero_ps()
#define V_SET1(x) _mm512_set1_ps(x)
#define V_MUL(a, b) _mm512_mul_ps(a, b)
#define V_ADD(a, b) _mm512_add_ps(a, b)
#define V_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define V_LOADN(p, n) _mm512_maskz_loadu_ps(kt_mask16(n), p)
#define V_STOREN(p, v, n) _mm512_mask_storeu_ps(p, kt_mask16(n), v)
#define V_REDUCE(v) _mm512_reduce_add_ps(v)
#define NT_MR 6
#define NT_NR 4
#define NN_MR 12
#define NN_NV 2

static inline __mmask16 kt_mask16(int64_t n)
{
    return n >= 16 ? (__mmask16)0xffff : (n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u));
}

static inline __mmask32 kt_mask32(int64_t n)
{
    return n >= 32 ? (__mmask32)0xffffffffu : (n <= 0 ? (__mmask32)0 : (__mmask32)((1u << n) - 1u));
}

static inline __m512 kt_widen_bf16x16(__m256i b)
{
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

/* Horizontal sums of 16 vectors at once: result[e] = sum of in[e]'s lanes.
 * A tree of lane shuffles (45 operations) instead of 16 separate
 * reductions (about 130). */
static inline __m512 kt_hsum16(const __m512 in[16])
{
    __m512 v[16], w[8], x[4], y[2];
    /* the tree leaves sum(v[4j + L]) at element 4L + j */
    for (int L = 0; L < 4; ++L)
        for (int j = 0; j < 4; ++j) v[4 * j + L] = in[4 * L + j];
    for (int p = 0; p < 8; ++p)
        w[p] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], 0xEE));
    for (int q = 0; q < 4; ++q)
        x[q] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * q], w[2 * q + 1], 0x88),
                             _mm512_shuffle_f32x4(w[2 * q], w[2 * q + 1], 0xDD));
    for (int r = 0; r < 2; ++r)
        y[r] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * r], x[2 * r + 1], 0x44),
                             _mm512_shuffle_ps(x[2 * r], x[2 * r + 1], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xDD));
}

#define KT_LOAD_F32(p) _mm512_loadu_ps(p)
#define KT_LOAD_BF16(p) kt_widen_bf16x16(_mm256_loadu_si256((const __m256i *)(p)))
#define KT_LOADN_BF16(p, n) kt_widen_bf16x16(_mm256_maskz_loadu_epi16(kt_mask16(n), p))

#define KT_LOAD_I8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#define KT_LOADN_I8(p, n) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(kt_mask16(n), p)))

/* int4 (two per byte, element 2i in the low nibble, stored as q + 8) through
 * a table: t holds (q - 8) * s for q = 0..15 (one rounding, as converting q - 8
 * and multiplying by s would give), and vpermps picks lane i's value by the
 * low four bits of index lane i.  Byte b of 8 goes to qword b; b | b << 28
 * leaves the low nibble in the low bits of dword 2b and the high nibble in
 * those of dword 2b + 1: four instructions per 16 weights instead of eight. */
static inline __m512 kt_i4_table(float s)
{
    const __m512 q = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    return _mm512_mul_ps(q, _mm512_set1_ps(s));
}

static inline __m512 kt_deq_i4x16_bytes(__m128i b, __m512 t)
{
    const __m512i q = _mm512_cvtepu8_epi64(b);
    return _mm512_permutexvar_ps(_mm512_or_si512(q, _mm512_slli_epi64(q, 28)), t);
}

static inline __m512 kt_deq_i4x16(const uint8_t *p, __m512 t)
{
    return kt_deq_i4x16_bytes(_mm_loadl_epi64((const __m128i *)p), t);
}

static inline __m512 kt_deqn_i4x16(const uint8_t *p, int64_t n, __m512 t)
{
    const int64_t bytes = (n + 1) / 2;
    return _mm512_maskz_mov_ps(kt_mask16(n), kt_deq_i4x16_bytes(_mm_maskz_loadu_epi8(kt_mask16(bytes), p), t));
}
#define KT_I4_TABLE(s) kt_i4_table(s)
#define KT_DEQ_I4(row, k, t) kt_deq_i4x16((row) + ((k) >> 1), t)
#define KT_DEQN_I4(row, k, n, t) kt_deqn_i4x16((row) + ((k) >> 1), n, t)
#define OUT_RT 16

#endif
