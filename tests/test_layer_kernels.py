"""The C kernels of a layer's small ops (layer_kernels.c) against the torch ops the
model runs elsewhere: widths that are not multiples of any vector width, strided
rows as the model hands them over (views into qkv and gate_up), silu over large
positive and negative inputs, and rope at scattered positions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorapool.server.model import native
from lorapool.server.model.model import _rope

WIDTHS = [1, 7, 64, 96, 100, 513]


@pytest.fixture(scope="module")
def kernels():
    k = native.load()
    if k is None:
        pytest.skip("no C compiler here: the kernels cannot be built")
    return k


@pytest.mark.parametrize("dim", WIDTHS)
@pytest.mark.parametrize("rows", [1, 3, 33])
def test_add_rms_norm_adds_in_place_and_normalizes(kernels, rows, dim):
    gen = torch.Generator().manual_seed(rows * 1000 + dim)
    wide = torch.randn(rows, dim + 5, generator=gen) * 3  # rows strided, as slices give
    x, residual = wide[:, :dim], torch.randn(rows, dim + 2, generator=gen)[:, 2:]
    weight = torch.randn(dim, generator=gen)
    want_x = x + residual
    want = F.rms_norm(want_x, (dim,), weight, 1e-6)
    got = kernels.add_rms_norm(x, residual, weight, 1e-6)
    torch.testing.assert_close(x, want_x, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # without a residual, x is left as it is
    before = x.clone()
    torch.testing.assert_close(kernels.add_rms_norm(x, None, weight, 1e-6), want)
    assert torch.equal(x, before)


@pytest.mark.parametrize("inter", WIDTHS)
def test_silu_mul_matches_torch_over_the_whole_range(kernels, inter):
    gen = torch.Generator().manual_seed(inter)
    gu = torch.randn(9, 2 * inter + 3, generator=gen) * 8
    gu[0, :inter] = torch.linspace(-120, 120, inter)  # e^-g overflows for g < -88
    gu = gu[:, : 2 * inter]  # strided rows
    want = F.silu(gu[:, :inter]) * gu[:, inter:]
    got = kernels.silu_mul(gu)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head_dim", [2, 6, 64, 80, 96])
def test_rope_rotates_the_given_heads_in_place(kernels, head_dim):
    gen = torch.Generator().manual_seed(head_dim)
    tokens, heads, kv_heads, positions = 11, 5, 2, 300
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen)
    # tables as model.py builds them: full width, sin's first half negated
    angles = torch.rand(positions, head_dim // 2, generator=gen) * 6
    cos = torch.cat((angles.cos(), angles.cos()), -1)
    sin = torch.cat((-angles.sin(), angles.sin()), -1)
    pos = torch.randint(0, positions, (tokens,), generator=gen)
    rotated = heads + kv_heads
    view = qkv[:, : rotated * head_dim].view(tokens, rotated, head_dim)
    want = _rope(view, cos[pos].unsqueeze(1), sin[pos].unsqueeze(1))
    untouched = qkv[:, rotated * head_dim :].clone()
    kernels.rope(qkv, rotated, head_dim, cos, sin, pos)
    torch.testing.assert_close(view, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(qkv[:, rotated * head_dim :], untouched)  # V is not rotated
