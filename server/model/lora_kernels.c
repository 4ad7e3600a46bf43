/* Multi-LoRA shrink and expand for a CPU, reading adapter rows straight from the
 * pool (server/model/native.py builds this file and calls it; lora.py says when).
 *
 * The torch path (embedding_bag) reads an adapter's rows once per token. Here the
 * tokens of one run (consecutive tokens of one adapter) share every row read: a
 * row is loaded once and applied to all of the run's tokens while it is in L1,
 * so a step reads each adapter once per run, whatever the run's length.
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
            for (int64_t d = 0; d < chunks; d++) {
                for (int64_t j = 0; j < r; j++) {
                    const float *restrict row = pool + (int64_t)(*idx++) * h;
                    for (int64_t t = 0; t < n; t++) {
                        const float w = in[t * v_width + k * r + j];
                        float *restrict out = y + (start + t) * y_stride + col + d * h;
                        for (int64_t c = 0; c < h; c++) out[c] += w * row[c];
                    }
                }
            }
        }
    }
}
