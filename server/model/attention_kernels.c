/* Decode attention for a CPU, reading K and V straight from the pool's pages
 * (server/model/native.py builds this file; attention.py says when it runs).
 *
 * The torch path (two embedding_bag calls) reads each KV head's keys and values
 * once per query head, and needs per-slot index and mask tensors built on the
 * host every step. Here one task per (row, KV head) reads each block once for
 * all the query heads that share it (GQA), in registers, with only the row's
 * block table and length as input.
 *
 * Page layout, as memory/pool.py's KV layout places it (per page and layer, at
 * `layer_offset` elements into the page): K transposed per KV head
 * ([kv heads][head_dim][block]), then V ([kv heads][block][head_dim]).
 * Slots [lo, len) of a row are attended, lo = len - window with a sliding
 * window, else 0. Scores are computed in float and softmax'd with the max
 * subtracted, as torch does.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

/* Register blocking: up to HEADS query heads of a GQA group at once, two vectors
 * of slots (or of output dims) each, so every K or V load feeds HEADS x 2
 * independent FMA chains: enough to hide the FMA latency, and each block is read
 * once for the group. The functions take nh as a constant (see the switches in
 * decode_attention) so the accumulators stay in registers. */
enum { HEADS = 4 };

/* s_j[c] = w_j . K^T[:, c] for heads j < nh and a block's slots [c0, c1); w_j
 * and s_j are `w_stride` and `s_stride` floats apart. */
static inline __attribute__((always_inline)) void
block_scores(const int nh, const float *restrict kt, int64_t head_dim, int64_t block,
             const float *restrict w, int64_t w_stride, int64_t c0, int64_t c1,
             float *restrict s, int64_t s_stride) {
    int64_t c = c0;
    for (; c + 2 * LANES <= c1; c += 2 * LANES) {
        vf acc[HEADS][2] = {{{0}}};
        for (int64_t d = 0; d < head_dim; d++) {
            const vf k0 = load(kt + d * block + c), k1 = load(kt + d * block + c + LANES);
            for (int j = 0; j < nh; j++) {
                acc[j][0] += w[j * w_stride + d] * k0;
                acc[j][1] += w[j * w_stride + d] * k1;
            }
        }
        for (int j = 0; j < nh; j++) {
            store(s + j * s_stride + c, acc[j][0]);
            store(s + j * s_stride + c + LANES, acc[j][1]);
        }
    }
    for (; c + LANES <= c1; c += LANES) {
        vf acc[HEADS] = {{0}};
        for (int64_t d = 0; d < head_dim; d++) {
            const vf k0 = load(kt + d * block + c);
            for (int j = 0; j < nh; j++) acc[j] += w[j * w_stride + d] * k0;
        }
        for (int j = 0; j < nh; j++) store(s + j * s_stride + c, acc[j]);
    }
    for (; c < c1; c++)
        for (int j = 0; j < nh; j++) {
            float acc = 0.0f;
            for (int64_t d = 0; d < head_dim; d++) acc += w[j * w_stride + d] * kt[d * block + c];
            s[j * s_stride + c] = acc;
        }
}

/* o_j[0, head_dim) += sum over slots [c0, c1) of p_j[c] V[c] for heads j < nh;
 * V's rows head_dim apart, p_j `p_stride` floats apart, o_j head_dim apart. */
static inline __attribute__((always_inline)) void
block_values(const int nh, const float *restrict v, int64_t head_dim, const float *restrict p,
             int64_t p_stride, int64_t c0, int64_t c1, float *restrict o) {
    int64_t d = 0;
    for (; d + 2 * LANES <= head_dim; d += 2 * LANES) {
        vf acc[HEADS][2];
        for (int j = 0; j < nh; j++) {
            acc[j][0] = load(o + j * head_dim + d);
            acc[j][1] = load(o + j * head_dim + d + LANES);
        }
        for (int64_t c = c0; c < c1; c++) {
            const vf v0 = load(v + c * head_dim + d), v1 = load(v + c * head_dim + d + LANES);
            for (int j = 0; j < nh; j++) {
                acc[j][0] += p[j * p_stride + c] * v0;
                acc[j][1] += p[j * p_stride + c] * v1;
            }
        }
        for (int j = 0; j < nh; j++) {
            store(o + j * head_dim + d, acc[j][0]);
            store(o + j * head_dim + d + LANES, acc[j][1]);
        }
    }
    for (; d + LANES <= head_dim; d += LANES) {
        vf acc[HEADS];
        for (int j = 0; j < nh; j++) acc[j] = load(o + j * head_dim + d);
        for (int64_t c = c0; c < c1; c++) {
            const vf v0 = load(v + c * head_dim + d);
            for (int j = 0; j < nh; j++) acc[j] += p[j * p_stride + c] * v0;
        }
        for (int j = 0; j < nh; j++) store(o + j * head_dim + d, acc[j]);
    }
    for (; d < head_dim; d++)
        for (int j = 0; j < nh; j++)
            for (int64_t c = c0; c < c1; c++)
                o[j * head_dim + d] += p[j * p_stride + c] * v[c * head_dim + d];
}

/* The switches: nh as a compile-time constant in each case. */
#define BY_HEADS(nh, call)                                                                   \
    switch (nh) {                                                                            \
    case 1: call(1); break;                                                                  \
    case 2: call(2); break;                                                                  \
    case 3: call(3); break;                                                                  \
    default: call(4); break;                                                                 \
    }

/* s[lo, len) = e^(s - m), returning their sum. */
static float exp_and_sum(float *restrict s, int64_t lo, int64_t len, float m) {
    vf sum = {0};
    int64_t c = lo;
    for (; c + LANES <= len; c += LANES) {
        const vf e = exp_nonpositive(load(s + c) - m);
        store(s + c, e);
        sum += e;
    }
    float total = 0.0f, tail[LANES];
    for (int64_t l = 0; l < LANES; l++) tail[l] = c + l < len ? s[c + l] - m : -100.0f;
    store(tail, exp_nonpositive(load(tail)));
    for (int64_t l = 0; c + l < len; l++) {
        s[c + l] = tail[l];
        total += tail[l];
    }
    for (int64_t l = 0; l < LANES; l++) total += sum[l];
    return total;
}

/* Hints the cache to fetch n floats from p (blocks lie in random pages, where the
 * hardware's stream prefetcher starts cold). */
static inline void prefetch(const float *p, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(p + i);
}

/* The same into L2 only: a task's V blocks, fetched while its K pass runs. */
static inline void prefetch_l2(const float *p, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(p + i, 0, 2);
}

enum { AHEAD = 2 };               /* blocks fetched into L1 ahead of the one being read */
enum { L2_AHEAD = 128 * 1024 / 4 }; /* floats of V fetched into L2 at a task's start */

void decode_attention(const float *restrict pool, int64_t page_elems, int64_t layer_offset,
                      const float *restrict q, int64_t q_stride, float *restrict out,
                      const int32_t *restrict tables, int64_t width,
                      const int32_t *restrict lens, int64_t rows, int64_t heads,
                      int64_t kv_heads, int64_t head_dim, int64_t block, int64_t window,
                      float scale, float *restrict scores) {
    const int64_t group = heads / kv_heads, slots = width * block, bytes = head_dim * block;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t task = 0; task < rows * kv_heads; task++) {
        /* one KV head of one row, and the group of query heads that share it: each
         * block is read from memory once for all of them */
        const int64_t row = task / kv_heads, kvh = task % kv_heads, head0 = kvh * group;
        const int64_t len = lens[row];
        const int64_t lo = (window > 0 && len > window) ? len - window : 0;
        const int64_t first = lo / block, last = (len - 1) / block;
        const int32_t *table = tables + row * width;
        const float *k_at = pool + layer_offset + kvh * bytes;
        const float *v_at = pool + layer_offset + (kv_heads + kvh) * bytes;
#define K_BLOCK(b) (k_at + (int64_t)table[b] * page_elems)
#define V_BLOCK(b) (v_at + (int64_t)table[b] * page_elems)
        float *restrict s = scores + (row * heads + head0) * slots;
        float *restrict o = out + (row * heads + head0) * head_dim;
        float w[group * head_dim];
        for (int64_t j = 0; j < group; j++)
            for (int64_t d = 0; d < head_dim; d++)
                w[j * head_dim + d] = scale * q[row * q_stride + (head0 + j) * head_dim + d];

        for (int64_t b = first; b <= last && b < first + AHEAD; b++) prefetch(K_BLOCK(b), bytes);
        for (int64_t b = first; b <= last && (b - first) * bytes < L2_AHEAD; b++)
            prefetch_l2(V_BLOCK(b), bytes);
        for (int64_t b = first; b <= last; b++) {
            if (b + AHEAD <= last) prefetch(K_BLOCK(b + AHEAD), bytes);
            const int64_t c0 = b * block < lo ? lo - b * block : 0;
            const int64_t c1 = len - b * block < block ? len - b * block : block;
            for (int64_t j = 0; j < group; j += HEADS) {
                const int64_t nh = group - j < HEADS ? group - j : HEADS;
#define SCORES(n) block_scores(n, K_BLOCK(b), head_dim, block, w + j * head_dim, head_dim, \
                               c0, c1, s + j * slots + b * block, slots)
                BY_HEADS(nh, SCORES)
#undef SCORES
            }
        }
        for (int64_t b = first; b <= last && b < first + AHEAD; b++) prefetch(V_BLOCK(b), bytes);
        float inv[group];
        for (int64_t j = 0; j < group; j++) {
            float m = -INFINITY;
            for (int64_t c = lo; c < len; c++) m = s[j * slots + c] > m ? s[j * slots + c] : m;
            inv[j] = 1.0f / exp_and_sum(s + j * slots, lo, len, m);
        }

        /* o_j = sum_slot p_j[slot] V[slot], LANES output dims at a time */
        memset(o, 0, sizeof(float) * group * head_dim);
        for (int64_t b = first; b <= last; b++) {
            if (b + AHEAD <= last) prefetch(V_BLOCK(b + AHEAD), bytes);
            const int64_t c0 = b * block < lo ? lo - b * block : 0;
            const int64_t c1 = len - b * block < block ? len - b * block : block;
            for (int64_t j = 0; j < group; j += HEADS) {
                const int64_t nh = group - j < HEADS ? group - j : HEADS;
#define VALUES(n) block_values(n, V_BLOCK(b), head_dim, s + j * slots + b * block, slots, \
                               c0, c1, o + j * head_dim)
                BY_HEADS(nh, VALUES)
#undef VALUES
            }
        }
#undef K_BLOCK
#undef V_BLOCK
        for (int64_t j = 0; j < group; j++)
            for (int64_t d = 0; d < head_dim; d++) o[j * head_dim + d] *= inv[j];
    }
}

/* The step's new K and V into their slots: token t goes to slot offsets[t] of
 * page pages[t]; K transposed (one element per K^T row), V as a row. k and v are
 * [tokens][kv heads][head_dim] with the given token strides. */
void kv_write(float *restrict pool, int64_t page_elems, int64_t layer_offset,
              const float *restrict k, int64_t k_stride, const float *restrict v,
              int64_t v_stride, const int32_t *restrict pages, const int32_t *restrict offsets,
              int64_t tokens, int64_t kv_heads, int64_t head_dim, int64_t block) {
    const int64_t bytes = head_dim * block;
    for (int64_t t = 0; t < tokens; t++) {
        float *page = pool + (int64_t)pages[t] * page_elems + layer_offset;
        const int64_t slot = offsets[t];
        for (int64_t h = 0; h < kv_heads; h++) {
            float *kt = page + h * bytes + slot;
            const float *kh = k + t * k_stride + h * head_dim;
            for (int64_t d = 0; d < head_dim; d++) kt[d * block] = kh[d];
            memcpy(page + (kv_heads + h) * bytes + slot * head_dim, v + t * v_stride + h * head_dim,
                   sizeof(float) * head_dim);
        }
    }
}
