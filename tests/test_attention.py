"""Paged attention against a naive float64 reference read from the pool's K/V
views: decode rows through the C kernel and through embedding_bag, with GQA
groups of any size, head dims and block sizes that are not powers of two, rows
ending on and off block boundaries, sliding windows, and decode rows sharing a
step with a prefill chunk that has tokens cached before it."""

from __future__ import annotations

import pytest
import torch

from lorapool.memory.pool import PageLayout, PagePool
from lorapool.server.model import native
from lorapool.server.model.attention import PagedAttention

# (layers, block, kv heads, query heads, head dim, window)
SHAPES = [
    (2, 16, 2, 8, 64, None),
    (1, 4, 1, 3, 24, None),
    (2, 5, 3, 3, 12, None),
    (2, 8, 2, 4, 20, 11),
    (1, 16, 4, 8, 8, 16),
    (1, 32, 1, 6, 40, None),  # a group larger than the kernel's register block
    (1, 24, 2, 10, 16, 30),
]
LENS = [1, 4, 5, 16, 17, 31, 40, 2]


@pytest.fixture(params=["native", "torch"])
def kernels(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setenv("LORAPOOL_NATIVE", "0")
    elif native.load() is None:
        pytest.skip("no C compiler here: the kernels cannot be built")
    return request.param


def reference(pool, layer, table, positions, q, scale, window):
    """[len(positions), heads, head_dim]: each query at position p attends to slots
    [max(0, p + 1 - window), p] of the sequence whose block table is `table`."""
    lay = pool.layout
    bs, group = lay.block_size, q.shape[1] // lay.num_kv_heads
    n = positions[-1] + 1
    pages = torch.as_tensor(table)[torch.arange(n) // bs]
    slots = torch.arange(n) % bs
    k = pool.k[pages, layer, :, :, slots].double()  # [n, kv heads, head dim]
    v = pool.v[pages, layer, :, slots, :].double()
    out = torch.empty(q.shape, dtype=torch.float64)
    for i, p in enumerate(positions):
        lo = max(0, p + 1 - window) if window else 0
        for h in range(q.shape[1]):
            kh, vh = k[lo : p + 1, h // group], v[lo : p + 1, h // group]
            probs = torch.softmax(kh @ q[i, h].double() * scale, dim=0)
            out[i, h] = probs @ vh
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
def test_decode_rows_and_a_prefill_chunk_match_the_reference(shape, kernels):
    layers, bs, nkv, heads, hd, window = shape
    pool = PagePool(PageLayout(layers, bs, nkv, hd), 64, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(sum(shape[:5]))
    pool.tensor.copy_(torch.randn(pool.tensor.shape, generator=gen))
    attention = PagedAttention(pool)
    assert (attention.native is not None) == (kernels == "native")
    free = iter(torch.randperm(pool.num_pages, generator=gen).tolist())
    tables = [[next(free) for _ in range(-(-n // bs))] for n in LENS]
    # one more sequence: 6 tokens cached, a chunk of 5 new ones
    chunk_table = [next(free) for _ in range(-(-11 // bs))]
    scale = hd**-0.5
    meta = attention.build_meta(
        heads, [], [], tables, LENS, [(len(LENS), 5, 11, chunk_table)], scale, window
    )
    tokens = len(LENS) + 5
    # q as the model hands it over: a view into q and k heads side by side
    qk = torch.randn(tokens, heads + nkv, hd, generator=gen)
    q = qk[:, :heads]
    for layer in range(layers):
        out = attention(layer, q, None, None, meta)
        for row, (table, n) in enumerate(zip(tables, LENS, strict=True)):
            want = reference(pool, layer, table, [n - 1], q[row : row + 1], scale, window)
            err = float((out[row : row + 1].double() - want).abs().max())
            assert err < 1e-5, f"layer {layer} row {row} (len {n}): max error {err:.3g}"
        want = reference(
            pool, layer, chunk_table, list(range(6, 11)), q[len(LENS) :], scale, window
        )
        err = float((out[len(LENS) :].double() - want).abs().max())
        assert err < 1e-5, f"layer {layer} prefill chunk: max error {err:.3g}"


def test_decode_only_steps_use_the_kernel_where_it_builds(kernels):
    pool = PagePool(PageLayout(1, 16, 2, 64), 8, torch.float32, "cpu")
    attention = PagedAttention(pool)
    meta = attention.build_meta(8, [], [], [[0, 1]], [20], [], 0.125)
    assert (meta.decode_pages is not None) == (kernels == "native")
    assert (meta.k_rows is not None) == (kernels == "torch")
    out = attention(0, torch.randn(1, 8, 64), None, None, meta)
    assert out.shape == (1, 8, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s[:5])))
def test_new_keys_and_values_land_in_their_slots_and_nowhere_else(shape, kernels):
    layers, bs, nkv, heads, hd, _ = shape
    pool = PagePool(PageLayout(layers, bs, nkv, hd), 16, torch.float32, "cpu")
    attention = PagedAttention(pool)
    gen = torch.Generator().manual_seed(hd)
    slots = [(3, 0), (3, bs - 1), (7, 1 % bs), (0, 2 % bs), (15, bs - 1)]
    pages, offsets = zip(*slots, strict=True)
    meta = attention.build_meta(heads, list(pages), list(offsets), [], [], [], 1.0)
    before = pool.tensor.clone()
    for layer in range(layers):
        # k as the model hands it over: a strided view next to q's heads
        qk = torch.randn(len(slots), heads + nkv, hd, generator=gen)
        k, v = qk[:, heads:], torch.randn(len(slots), nkv, hd, generator=gen)
        attention.write(layer, k, v, meta)
        for i, (page, slot) in enumerate(slots):
            assert torch.equal(pool.k[page, layer, :, :, slot], k[i])
            assert torch.equal(pool.v[page, layer, :, slot, :], v[i])
            pool.k[page, layer, :, :, slot] = 0
            pool.v[page, layer, :, slot, :] = 0
    assert torch.equal(pool.tensor, before), "a write touched an element outside its slots"
