/* Multi-LoRA shrink and expand for a CPU, reading adapter rows straight from the
 * pool (server/model/native.py builds this file and calls it; lora.py says when).
 *
 * The torch path (embedding_bag) reads an adapter's rows once per token. Here the
 * tokens of one run (consecutive tokens of one adapter) share every row read: a
 * row is loaded once and applied to all of the run's tokens while it is in L1,
 * so a step reads each adapter once per run, whatever the run's length. A run of
 * one token (a decode row) sums its shrink in registers, several rows in flight.
 *
 * Layouts are memory/adapter_layout.py's: the pool is a flat float array; a row
 * of width w at row index k starts at element k * w. Per run and layer:
 *   shrink: bags x in row indices (width g), bag-major; v[t][b*g + c] =
 *           sum_i x[t][i] * row(idx[b*in + i])[c]
 *   expand: per targeted module k (output column col_k, chunks_k chunks of width
 *           h), chunk-major then j in 0..r-1: y[t][col_k + d*h + c] +=
 *           sum_j v[t][k*r + j] * row(idx[...])[c]
 * Runs own disjoint tokens, so they run in parallel without locks.
 */
#include <stdint.h>
#include <string.h>

#include "simd.h"

/* One token's shrink for one bag, columns [c0, c0 + NV * LANES) of its sub-rows:
 * NV vectors of U accumulators each in registers, U consecutive rows in flight,
 * so the sum over fan_in runs as U * NV independent FMA chains instead of one
 * chain through memory. NV and U are constants at each call (see below). */
static inline __attribute__((always_inline)) void
shrink_one(const int NV, const int U, const float *restrict pool, const float *restrict x,
           const int32_t *restrict ib, int64_t fan_in, int64_t g, int64_t c0,
           float *restrict out) {
    vf acc[4][4] = {{{0}}};
    int64_t i = 0;
    for (; i + U <= fan_in; i += U)
        for (int u = 0; u < U; u++) {
            const float *restrict row = pool + (int64_t)ib[i + u] * g + c0;
            for (int v = 0; v < NV; v++) acc[u][v] += x[i + u] * load(row + v * LANES);
        }
    for (; i < fan_in; i++) {
        const float *restrict row = pool + (int64_t)ib[i] * g + c0;
        for (int v = 0; v < NV; v++) acc[0][v] += x[i] * load(row + v * LANES);
    }
    for (int v = 0; v < NV; v++) {
        vf sum = acc[0][v];
        for (int u = 1; u < U; u++) sum += acc[u][v];
        store(out + c0 + v * LANES, sum);
    }
}

/* One run of the shrink: start token, tokens, sub-row width g, bags, index array
 * (int32, layer 0) and its per-layer stride, and where the run's v starts. */
enum { S_START, S_N, S_G, S_BAGS, S_IDX, S_STRIDE, S_VOFF, S_FIELDS };

void lora_shrink(const float *restrict pool, const float *restrict x, int64_t x_stride,
                 int64_t fan_in, const int64_t *runs, int64_t num_runs, int64_t layer,
                 float *restrict v) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t q = 0; q < num_runs; q++) {
        const int64_t *run = runs + q * S_FIELDS;
        const int64_t start = run[S_START], n = run[S_N], g = run[S_G], bags = run[S_BAGS];
        const int32_t *idx = (const int32_t *)(intptr_t)run[S_IDX] + layer * run[S_STRIDE];
        float *out = v + run[S_VOFF];
        const int64_t width = bags * g;
        if (n == 1 && g % LANES == 0) { /* a decode row: register accumulators */
            const float *xt = x + start * x_stride;
            for (int64_t b = 0; b < bags; b++)
                for (int64_t c0 = 0; c0 < g; c0 += 4 * LANES) {
                    const int64_t nv = (g - c0) / LANES;
                    const int32_t *ib = idx + b * fan_in;
                    float *o = out + b * g;
                    switch (nv < 4 ? nv : 4) {
                    case 1: shrink_one(1, 4, pool, xt, ib, fan_in, g, c0, o); break;
                    case 2: shrink_one(2, 4, pool, xt, ib, fan_in, g, c0, o); break;
                    case 3: shrink_one(3, 2, pool, xt, ib, fan_in, g, c0, o); break;
                    default: shrink_one(4, 2, pool, xt, ib, fan_in, g, c0, o); break;
                    }
                }
            continue;
        }
        memset(out, 0, sizeof(float) * n * width);
        for (int64_t b = 0; b < bags; b++) {
            const int32_t *ib = idx + b * fan_in;
            for (int64_t i = 0; i < fan_in; i++) {
                const float *restrict row = pool + (int64_t)ib[i] * g;
                for (int64_t t = 0; t < n; t++) {
                    const float w = x[(start + t) * x_stride + i];
                    float *restrict acc = out + t * width + b * g;
                    for (int64_t c = 0; c < g; c++) acc[c] += w * row[c];
                }
            }
        }
    }
}

/* One run of the expand: start token, tokens, rank, targeted modules, index
 * array (int32, layer 0) and its per-layer stride, where the run's v starts, and
 * its module table (int64 pairs: output column, chunks). */
enum { E_START, E_N, E_RANK, E_MODS, E_IDX, E_STRIDE, E_VOFF, E_TABLE, E_FIELDS };

void lora_expand(const float *restrict pool, int64_t h, float *restrict y, int64_t y_stride,
                 const float *restrict v, const int64_t *runs, int64_t num_runs, int64_t layer) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t q = 0; q < num_runs; q++) {
        const int64_t *run = runs + q * E_FIELDS;
        const int64_t start = run[E_START], n = run[E_N], r = run[E_RANK], mods = run[E_MODS];
        const int32_t *idx = (const int32_t *)(intptr_t)run[E_IDX] + layer * run[E_STRIDE];
        const int64_t *table = (const int64_t *)(intptr_t)run[E_TABLE];
        const float *in = v + run[E_VOFF];
        const int64_t v_width = mods * r;
        for (int64_t k = 0; k < mods; k++) {
            const int64_t col = table[2 * k], chunks = table[2 * k + 1];
            /* j outer, chunks inner: the chunks of one j are consecutive sub-rows of
             * B^T's row j, so the adapter streams through memory in order */
            for (int64_t j = 0; j < r; j++) {
                for (int64_t d = 0; d < chunks; d++) {
                    const float *restrict row = pool + (int64_t)idx[d * r + j] * h;
                    /* the sub-rows ahead, in pages the hardware prefetcher starts cold on */
                    for (int64_t c = 0; c < h; c += 16) __builtin_prefetch(row + 8 * h + c);
                    for (int64_t t = 0; t < n; t++) {
                        const float w = in[t * v_width + k * r + j];
                        float *restrict out = y + (start + t) * y_stride + col + d * h;
                        for (int64_t c = 0; c < h; c++) out[c] += w * row[c];
                    }
                }
            }
            idx += chunks * r;
        }
    }
}
