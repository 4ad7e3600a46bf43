"""The LoRA plan of a step against a naive reference: every token's delta computed
from the packed adapter (never through the pool's index math), whatever mix of
runs, lengths, paths and target sets shares the step; and the layout self-check,
which runs once per layout signature on a probe, not on the adapter's weights."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from helpers import Harness, Row, random_prompt

import lorapool.memory.adapter_layout as layout_module
from lorapool.errors import AdapterIncompatible
from lorapool.memory.adapter_layout import SITES, pack_adapter, site_columns, verify_layout
from lorapool.memory.peft_adapter import read_adapter
from lorapool.server.model import native
from lorapool.server.model.lora import NATIVE_DENSE_SEGMENT_TOKENS, LoraBatch, merge_runs

N_ADAPTERS = 6


@pytest.fixture(scope="module")
def setup(tiny_demo):
    dirs = tiny_demo.adapter_dirs[:N_ADAPTERS]
    harness = Harness(tiny_demo.model_dir, dirs, num_pages=140)
    spec = harness.spec
    packed = [
        pack_adapter(spec, read_adapter(d, spec), torch.float32, harness.pool.page_elems)
        for d in dirs
    ]
    return harness, packed


def site_widths(spec) -> dict[str, tuple[int, int]]:
    return {
        site: (
            spec.module_shape(mods[0])[0],
            sum(spec.module_shape(m)[1] for m in mods),
        )
        for site, mods in SITES.items()
    }


def reference(spec, packed, segments, layer, site, x):
    """y[t] = sum over the modules of `site` that t's adapter targets of
    x[t] A^T (sB)^T, read from the packed run."""
    y = torch.zeros(x.shape[0], site_widths(spec)[site][1], dtype=torch.float64)
    cols = site_columns(spec, site)
    for start, n, index in segments:
        if index is None:
            continue
        p = packed[index]
        for m in SITES[site]:
            if (layer, m) not in p.offsets:
                continue
            fan_in, fan_out = spec.module_shape(m)
            off_a, off_b = p.offsets[(layer, m)]
            a_t = p.flat[off_a : off_a + fan_in * p.rank].view(fan_in, p.rank).double()
            b_t = p.flat[off_b : off_b + p.rank * fan_out].view(p.rank, fan_out).double()
            xs = x[start : start + n].double()
            y[start : start + n, cols[m] : cols[m] + fan_out] += xs @ a_t @ b_t
    return y


# (first token, tokens, adapter index or None): decode rows, adjacent segments of
# one adapter (merged into one run), runs on both sides of the dense threshold,
# base rows between them, and the same adapter in two places.
SEGMENTS = [
    [(0, 1, 0), (1, 1, 1), (2, 1, None), (3, 1, 2), (4, 1, 3), (5, 1, 4), (6, 1, 5)],
    [(0, 1, 2), (1, 1, 2), (2, 1, 2), (3, 1, 2), (4, 1, 0), (5, 9, 1), (14, 3, None), (17, 5, 3)],
    [(0, 2, 4), (2, 2, 4), (4, 7, 5), (11, 1, None), (12, 12, 0), (24, 2, 0), (26, 3, 4)],
    [(0, 3, None), (3, 20, 2), (23, 1, 1)],
]


@pytest.fixture(params=["native", "torch"])
def kernels(request, monkeypatch):
    """Short runs through lora_kernels.c, or through embedding_bag (the path of
    GPUs, bfloat16 pools and machines without a C compiler)."""
    if request.param == "torch":
        monkeypatch.setenv("LORAPOOL_NATIVE", "0")
    elif native.load() is None:
        pytest.skip("no C compiler here: the kernels cannot be built")
    return request.param


@pytest.mark.parametrize("dense_min", [1, 4, 1000])
@pytest.mark.parametrize("case", range(len(SEGMENTS)))
def test_every_mix_of_runs_matches_the_packed_weights(setup, case, dense_min, kernels):
    harness, packed = setup
    spec = harness.spec
    segs = SEGMENTS[case]
    tokens = segs[-1][0] + segs[-1][1]
    placed = [(s, n, None if i is None else harness.adapters[i]) for s, n, i in segs]
    lora = LoraBatch(harness.pool, spec, placed, tokens, dense_min)
    assert (lora.native is not None) == (kernels == "native")
    gen = torch.Generator().manual_seed(case)
    for site, (fan_in, width) in site_widths(spec).items():
        for layer in range(spec.num_layers):
            x = torch.randn(tokens, fan_in, generator=gen)
            base = torch.randn(tokens, width, generator=gen)
            y = base.clone()
            lora.apply(layer, site, x, y)
            want = base.double() + reference(spec, packed, segs, layer, site, x)
            err = float((y.double() - want).abs().max())
            assert err < 1e-4, f"{site} layer {layer}: max error {err:.3g}"


def test_the_kernels_build_on_a_machine_with_a_c_compiler(setup):
    """Where there is a compiler (CI has one), a float32 CPU pool's short runs go
    to the kernels; so a slow fallback cannot pass unnoticed."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here")
    harness, _ = setup
    lora = LoraBatch(harness.pool, harness.spec, [(0, 1, harness.adapters[0])], 1)
    assert lora.native is not None
    assert lora.dense_min_tokens == NATIVE_DENSE_SEGMENT_TOKENS


def test_a_failed_build_falls_back_to_the_torch_path(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    monkeypatch.setenv("LORAPOOL_CACHE_DIR", str(tmp_path))
    with caplog.at_level("WARNING", logger="lorapool.model"):
        assert native._build_and_load() is None
    assert "torch path" in caplog.text
    assert not list(tmp_path.rglob("*.so"))


def test_adjacent_segments_of_one_adapter_merge_into_one_run(setup):
    harness, _ = setup
    a, b = harness.adapters[0], harness.adapters[1]
    runs = merge_runs([(0, 1, a), (1, 1, a), (2, 4, a), (6, 1, b), (7, 1, None), (8, 2, None)])
    assert runs == [(0, 6, a), (6, 1, b), (7, 3, None)]


def test_a_step_groups_rows_of_one_adapter(setup):
    """The runner puts a step's rows of one adapter side by side (decode rows
    first), so their LoRA weights are read once per run."""
    harness, _ = setup
    captured = []
    original = harness.runner._lora_batch

    def spy(segments, num_tokens):
        captured.append(list(segments))
        return original(segments, num_tokens)

    harness.runner._lora_batch = spy
    try:
        rng = np.random.default_rng(3)
        vocab = harness.spec.vocab_size
        rows = [Row(random_prompt(rng, 3, vocab), i % 3) for i in range(9)]
        harness.generate(rows, 2)
    finally:
        harness.runner._lora_batch = original
    decode_step = captured[-1]
    keys = [a.key if a else "" for _, _, a in decode_step]
    assert len(merge_runs(decode_step)) == len(set(keys)) == 3


def test_layout_check_runs_once_per_signature(setup, monkeypatch):
    harness, packed = setup
    calls = []
    real = layout_module._read_back
    monkeypatch.setattr(layout_module, "_VERIFIED", type(layout_module._VERIFIED)())
    monkeypatch.setattr(
        layout_module, "_read_back", lambda *a: (calls.append(a[2].rank), real(*a))[1]
    )
    for p in packed + packed:
        verify_layout(harness.layout, harness.spec, p, torch.float32)
    signatures = {layout_module.layout_signature(harness.layout, harness.spec, p) for p in packed}
    assert len(calls) == len(signatures)


def test_a_misread_is_caught_even_when_the_weights_are_zeros(setup, monkeypatch):
    """The check reads back a probe of distinct values, so an adapter whose B is
    all zeros (an untrained LoRA) cannot pass a broken index path."""
    harness, packed = setup
    p = packed[0]
    zeros = type(p)(flat=torch.zeros_like(p.flat), rank=p.rank, offsets=p.offsets)
    monkeypatch.setattr(layout_module, "_VERIFIED", type(layout_module._VERIFIED)())
    real = layout_module.gather_weights

    def off_by_one(pool, spec, adapter, layer, module, view):
        a_t, b_t = real(pool, spec, adapter, layer, module, view)
        return a_t.roll(1, 0), b_t

    monkeypatch.setattr(layout_module, "gather_weights", off_by_one)
    with pytest.raises(AdapterIncompatible):
        verify_layout(harness.layout, harness.spec, zeros, torch.float32)
