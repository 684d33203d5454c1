/* Scalar bfloat16 helpers: bf16 is the top half of an IEEE fp32. */
#ifndef KTSFT_BF16_H
#define KTSFT_BF16_H

#include <stdint.h>
#include <string.h>

static inline float kt_bf16_to_f32(uint16_t b)
{
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even; truncation would bias every product low. */
static inline uint16_t kt_f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t quiet_nan = (u >> 16) | 0x40u;
    return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? quiet_nan : rounded);
}

#endif
