/* Vector helpers shared by the C kernels (GCC/Clang vector extensions). */
#ifndef LORAPOOL_SIMD_H
#define LORAPOOL_SIMD_H

#include <stdint.h>

/* One machine register of floats (GCC/Clang vector extensions): 16 with AVX-512,
 * 8 with AVX, else 4 (SSE, NEON; scalar code where there are none). Vectors wider
 * than a register are split by the compiler into spills to the stack, which made
 * the attention kernel slower than torch's on AVX2. Unaligned access. */
#if defined(__AVX512F__)
enum { LANES = 16 };
#elif defined(__AVX__)
enum { LANES = 8 };
#else
enum { LANES = 4 };
#endif
typedef float vf __attribute__((vector_size(LANES * 4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4)));
typedef float vf_unaligned __attribute__((vector_size(LANES * 4), aligned(4), may_alias));

static inline vf load(const float *p) { return *(const vf_unaligned *)p; }
static inline void store(float *p, vf v) { *(vf_unaligned *)p = v; }

/* e^x for x <= 0 (scores minus their max, -|x|): Cody-Waite reduction by ln 2 and
 * Cephes' expf polynomial, relative error about 1e-7 as expf's. */
static inline vf exp_nonpositive(vf x) {
    const vf floor_x = x - x - 87.0f; /* keeps 2^n normal; e^-87 is 1.6e-38 */
    const vi below = x < floor_x;
    x = (vf)(((vi)x & ~below) | ((vi)floor_x & below));
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    const vf t = x * 1.44269504088896341f + magic;
    const vf n = t - magic;
    const vi ni = (vi)t - 0x4B400000; /* n as an integer: t's low mantissa bits */
    const vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
    vf p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * (vf)((ni + 127) << 23);
}

#endif
