/* Decode attention for a CPU, reading K and V straight from the pool's pages
 * (server/model/native.py builds this file; attention.py says when it runs).
 *
 * The torch path (two embedding_bag calls) reads each KV head's keys and values
 * once per query head, and needs per-slot index and mask tensors built on the
 * host every step. Here one task per (row, KV head) reads each block once for
 * all the query heads that share it (GQA), with only the row's block table and
 * length as input.
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

/* 16 floats: GCC/Clang vector extensions, one AVX-512 register (two AVX2 ones,
 * four NEON ones; plain scalar code where there are none). Unaligned access. */
enum { LANES = 16 };
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef float vf_unaligned __attribute__((vector_size(64), aligned(4), may_alias));

static inline vf load(const float *p) { return *(const vf_unaligned *)p; }
static inline void store(float *p, vf v) { *(vf_unaligned *)p = v; }

/* e^x for x <= 0 (scores minus their max): Cody-Waite reduction by ln 2 and
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

/* s[c] = w . K^T[:, c] for a block's slots [c0, c1), LANES slots at a time with
 * four accumulators in registers (four independent chains) while the head dim
 * is walked. */
static void block_scores(const float *restrict kt, int64_t head_dim, int64_t block,
                         const float *restrict w, int64_t c0, int64_t c1, float *restrict s) {
    int64_t c = c0;
    for (; c + LANES <= c1; c += LANES) {
        vf acc[4] = {{0}, {0}, {0}, {0}};
        int64_t d = 0;
        for (; d + 4 <= head_dim; d += 4)
            for (int k = 0; k < 4; k++) acc[k] += w[d + k] * load(kt + (d + k) * block + c);
        for (; d < head_dim; d++) acc[0] += w[d] * load(kt + d * block + c);
        store(s + c, (acc[0] + acc[1]) + (acc[2] + acc[3]));
    }
    for (; c < c1; c++) {
        float acc = 0.0f;
        for (int64_t d = 0; d < head_dim; d++) acc += w[d] * kt[d * block + c];
        s[c] = acc;
    }
}

/* o[0, LANES) += sum over slots [c0, c1) of p[c] V[c][0, LANES), V's rows head_dim
 * apart; four accumulators as above. */
static vf block_values(const float *restrict v, int64_t head_dim, const float *restrict p,
                       int64_t c0, int64_t c1, vf acc0) {
    vf acc[4] = {acc0, {0}, {0}, {0}};
    int64_t c = c0;
    for (; c + 4 <= c1; c += 4)
        for (int k = 0; k < 4; k++) acc[k] += p[c + k] * load(v + (c + k) * head_dim);
    for (; c < c1; c++) acc[0] += p[c] * load(v + c * head_dim);
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
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

enum { AHEAD = 2 }; /* blocks fetched ahead of the one being read */

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
        for (int64_t b = first; b <= last; b++) {
            if (b + AHEAD <= last) prefetch(K_BLOCK(b + AHEAD), bytes);
            const int64_t c0 = b * block < lo ? lo - b * block : 0;
            const int64_t c1 = len - b * block < block ? len - b * block : block;
            for (int64_t j = 0; j < group; j++)
                block_scores(K_BLOCK(b), head_dim, block, w + j * head_dim, c0, c1,
                             s + j * slots + b * block);
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
            const float *vb = V_BLOCK(b);
            for (int64_t j = 0; j < group; j++) {
                const float *p = s + j * slots + b * block;
                float *restrict oj = o + j * head_dim;
                int64_t d0 = 0;
                for (; d0 + LANES <= head_dim; d0 += LANES)
                    store(oj + d0, block_values(vb + d0, head_dim, p, c0, c1, load(oj + d0)));
                for (; d0 < head_dim; d0++)
                    for (int64_t c = c0; c < c1; c++) oj[d0] += p[c] * vb[c * head_dim + d0];
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
