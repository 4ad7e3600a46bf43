/* The small ops of a decoder layer for a CPU, one pass over memory each
 * (server/model/native.py builds this file; model.py says when it runs).
 *
 * In torch each of these is several kernels with a temporary between them (rope:
 * cat, mul, addcmul; silu and mul; the residual add and the norm), each a parallel
 * region of its own; at decode batch sizes those calls cost more than the
 * arithmetic. Here every op is one loop over rows, split between the threads.
 * The math is torch's, in float: rms_norm as F.rms_norm, rope as transformers'
 * rotate_half, silu(g) * u as F.silu(g) * u.
 */
#include <math.h>
#include <stdint.h>

#include "simd.h"

/* Rows per thread below which a loop stays on one thread. */
enum { MIN_ROWS = 4 };

/* x[r] += d[r] (when d is given), then out[r] = x[r] / rms(x[r]) * w: a residual
 * add and the next norm in one pass. x and d rows are `x_stride` / `d_stride`
 * floats apart, out is contiguous. */
void add_rms_norm(float *restrict x, int64_t x_stride, const float *restrict d, int64_t d_stride,
                  const float *restrict w, float *restrict out, int64_t rows, int64_t dim,
                  float eps) {
#pragma omp parallel for schedule(static) if (rows >= 2 * MIN_ROWS)
    for (int64_t r = 0; r < rows; r++) {
        float *restrict xr = x + r * x_stride;
        if (d) {
            const float *restrict dr = d + r * d_stride;
            for (int64_t i = 0; i < dim; i++) xr[i] += dr[i];
        }
        vf acc[2] = {{0}, {0}};
        int64_t i = 0;
        for (; i + 2 * LANES <= dim; i += 2 * LANES) {
            const vf a = load(xr + i), b = load(xr + i + LANES);
            acc[0] += a * a;
            acc[1] += b * b;
        }
        for (; i + LANES <= dim; i += LANES) acc[0] += load(xr + i) * load(xr + i);
        float sum = 0.0f;
        for (; i < dim; i++) sum += xr[i] * xr[i];
        for (int l = 0; l < LANES; l++) sum += acc[0][l] + acc[1][l];
        const float inv = 1.0f / sqrtf(sum / (float)dim + eps);
        float *restrict o = out + r * dim;
        for (int64_t i = 0; i < dim; i++) o[i] = xr[i] * inv * w[i];
    }
}

/* Rotary embedding in place on the first `heads` heads of every row (query and
 * key heads side by side): x[i] = x[i] cos[i] + rotate_half(x)[i] sin[i], with
 * the tables' rows picked by each token's position; cos and sin are full width
 * (head_dim), sin's first half already negated (rotate_half's sign). */
void rope(float *restrict x, int64_t x_stride, int64_t rows, int64_t heads, int64_t head_dim,
          const float *restrict cos_table, const float *restrict sin_table,
          const int64_t *restrict positions) {
    const int64_t half = head_dim / 2;
#pragma omp parallel for schedule(static) if (rows >= 2 * MIN_ROWS)
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict c = cos_table + positions[r] * head_dim;
        const float *restrict s = sin_table + positions[r] * head_dim;
        for (int64_t h = 0; h < heads; h++) {
            float *restrict a = x + r * x_stride + h * head_dim, *restrict b = a + half;
            for (int64_t i = 0; i < half; i++) {
                const float lo = a[i], hi = b[i];
                a[i] = lo * c[i] + hi * s[i];
                b[i] = hi * c[half + i] + lo * s[half + i];
            }
        }
    }
}

/* out[r] = silu(g[r]) * u[r], g = the first `inter` columns of row r of gu and u
 * the next `inter`; gu rows are `gu_stride` floats apart, out is contiguous.
 * silu(g) = g / (1 + e^-g), computed from e = e^-|g| (never overflows): g / (1 + e)
 * for g >= 0, g e / (1 + e) below. */
void silu_mul(const float *restrict gu, int64_t gu_stride, float *restrict out, int64_t rows,
              int64_t inter) {
#pragma omp parallel for schedule(static) if (rows >= 2 * MIN_ROWS)
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict g = gu + r * gu_stride, *restrict u = g + inter;
        float *restrict o = out + r * inter;
        int64_t i = 0;
        for (; i + LANES <= inter; i += LANES) {
            const vf x = load(g + i);
            const vi negative = x < 0.0f;
            const vf e = exp_nonpositive((vf)((vi)x | INT32_MIN)); /* e^-|x| */
            const vf one = x - x + 1.0f;
            const vf scale = (vf)(((vi)e & negative) | ((vi)one & ~negative));
            store(o + i, x * scale / (one + e) * load(u + i));
        }
        for (; i < inter; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}
