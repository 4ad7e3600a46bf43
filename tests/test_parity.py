"""Parity with the oracle: transformers + PEFT on the same checkpoint and adapter
files. Our logits must match row by row, at prefill and at every decode step, and
greedy tokens must equal PeftModel.generate whatever shares the batch.

Both tiny demo architectures are covered: Llama (llama3 rope scaling, GQA, untied
head) and Qwen2 (q/k/v biases, tied embeddings). The pool uses 16-token blocks and
a scrambled free list, so KV blocks and adapter matrices sit in scattered pages
and every sequence crosses page boundaries."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import Harness, Reference, Row, random_prompt

from lorapool.memory.block_manager import BlockManager
from lorapool.memory.peft_adapter import read_adapter
from lorapool.server.model.linear import Linear
from lorapool.server.model.model import Model

N_ADAPTERS = 6  # demo adapters 0..5
POOL_PAGES = 140
DECODE_STEPS = 40
NEW_TOKENS = DECODE_STEPS + 1  # the prefill step samples the first one
# (prompt length, adapter index or None for the base model)
MIXED = [
    (5, None),
    (17, 0),
    (3, 1),
    (40, 2),
    (9, 3),
    (33, 4),
    (16, 5),
    (1, None),
    (7, 2),
    (24, 1),
]
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
REL_TOL = 1e-4  # of the logits' standard deviation (about 1 for the demo models)


def prompt_for(i: int, length: int, vocab: int) -> list[int]:
    return random_prompt(np.random.default_rng(1000 + i), length, vocab)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def case(request):
    if request.param == "llama":
        demo = request.getfixturevalue("tiny_demo")
    else:
        demo = request.getfixturevalue("tiny_qwen2_demo")
    dirs = demo.adapter_dirs[:N_ADAPTERS]
    harness = Harness(demo.model_dir, dirs, num_pages=POOL_PAGES)
    reference = Reference(demo.model_dir, dirs)
    return request.param, demo, harness, reference


@pytest.fixture(scope="module")
def mixed(case):
    """One continuous batch: base rows and six adapters, prompts of 1..40 tokens."""
    _, _, harness, _ = case
    vocab = harness.spec.vocab_size
    rows = [Row(prompt_for(i, n, vocab), a) for i, (n, a) in enumerate(MIXED)]
    return rows, harness.generate(rows, NEW_TOKENS)


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, what
    atol = REL_TOL * float(ref.std())
    err = float((ours - ref).abs().max())
    assert err <= atol, f"{what}: max |ours - transformers| = {err:.3g} > {atol:.3g}"


def test_the_setup_is_demanding(case, mixed):
    """Guards against a weaker test: the adapters differ in rank, scaling and
    targets, the architecture is what it claims, pages are scattered and every
    sequence spans several blocks."""
    arch, demo, harness, _ = case
    spec = harness.spec
    weights = [read_adapter(d, spec) for d in demo.adapter_dirs[:N_ADAPTERS]]
    assert len({w.rank for w in weights}) == N_ADAPTERS
    assert {w.use_rslora for w in weights} == {True, False}
    assert len({w.scale for w in weights}) >= 4
    assert len({tuple(w.target_modules) for w in weights}) >= 4
    assert spec.num_kv_heads < spec.num_heads  # GQA
    config = json.loads((demo.model_dir / "config.json").read_text())
    if arch == "llama":
        assert config["rope_parameters"]["rope_type"] == "llama3"
        assert not spec.tie_word_embeddings
    else:
        assert spec.attention_bias and spec.tie_word_embeddings
        assert harness.model.layers[0].qkv.bias is not None
    placed = [a.pages.tolist() for a in harness.adapters]
    assert any(p != list(range(p[0], p[0] + len(p))) for p in placed), "pages not scattered"
    rows, _ = mixed
    lengths = [len(r.prompt) for r in rows]
    dense = harness.runner.dense_lora_tokens
    assert min(lengths) < dense <= max(lengths)  # both LoRA prefill paths
    assert all(n + NEW_TOKENS > 2 * harness.layout.block_size for n in lengths)


def test_mixed_batch_logits_match_peft(case, mixed):
    """Prefill and 40 decode steps of a mixed batch, every row against PEFT."""
    _, _, _, reference = case
    rows, results = mixed
    for i, (row, res) in enumerate(zip(rows, results, strict=True)):
        assert len(res.tokens) == NEW_TOKENS and len(res.logits) == NEW_TOKENS
        ids = row.prompt + res.tokens[:-1]
        ref = reference.logits(ids, row.adapter)[len(row.prompt) - 1 :]
        ours = torch.stack(res.logits)
        what = f"row {i} (adapter {row.adapter}, prompt {len(row.prompt)})"
        assert_logits_close(ours[:1], ref[:1], what + " prefill")
        assert_logits_close(ours[1:], ref[1:], what + " decode")
        assert torch.equal(ours.argmax(-1), torch.tensor(res.tokens))
        if row.adapter is not None:
            # The adapter visibly changes the logits, far beyond the tolerance.
            base = reference.logits(ids, None)[len(row.prompt) - 1 :]
            assert float((ref - base).abs().max()) > 1000 * REL_TOL * float(ref.std())


def test_greedy_tokens_equal_generate_alone_and_mixed(case, mixed):
    """Each row's greedy tokens equal PeftModel.generate, both when the row runs
    alone and inside the mixed batch."""
    _, _, harness, reference = case
    rows, results = mixed
    for i, (row, res) in enumerate(zip(rows, results, strict=True)):
        expect = reference.greedy(row.prompt, row.adapter, NEW_TOKENS)
        assert res.tokens == expect, f"row {i} (adapter {row.adapter}) in the mixed batch"
        (alone,) = harness.generate([row], NEW_TOKENS)
        assert alone.tokens == expect, f"row {i} (adapter {row.adapter}) alone"
        assert_logits_close(
            torch.stack(alone.logits), torch.stack(res.logits), f"row {i} alone vs mixed"
        )


def test_same_adapter_twice_and_another_batch_order(case, mixed):
    """Rows of one adapter side by side, and the mixed rows in reverse order
    with fewer neighbours, give the same tokens."""
    _, _, harness, _ = case
    rows, results = mixed
    pick = [3, 8, 2, 9, 0]  # adapter 2 twice, adapter 1 twice, a base row
    subset = [rows[i] for i in reversed(pick)]
    got = harness.generate(subset, NEW_TOKENS)
    for i, res in zip(reversed(pick), got, strict=True):
        assert res.tokens == results[i].tokens, f"row {i}"


def test_chunked_prefill_matches_peft(case):
    """Prompts computed over several steps (partial num_tokens) next to a
    decoding row: no logits until the prompt is complete, then the same logits."""
    _, _, harness, reference = case
    vocab = harness.spec.vocab_size
    rows = [
        Row(prompt_for(50, 37, vocab), 2, chunks=(20,)),  # 20 + 17: crosses 16 and 32
        Row(prompt_for(51, 30, vocab), 1, chunks=(5, 12)),  # short chunk: sparse LoRA path
        Row(prompt_for(52, 21, vocab), None, chunks=(16,)),  # ends on a block boundary
        Row(prompt_for(53, 6, vocab), 3),  # decodes while the others prefill
        Row(prompt_for(54, 26, vocab), 4, chunks=(3, 3, 3)),
    ]
    new = 12
    results = harness.generate(rows, new)
    for i, (row, res) in enumerate(zip(rows, results, strict=True)):
        assert res.steps_without_logits == len(row.chunks)
        assert len(res.logits) == new
        ref = reference.logits(row.prompt + res.tokens[:-1], row.adapter)[len(row.prompt) - 1 :]
        assert_logits_close(torch.stack(res.logits), ref, f"chunked row {i}")
        assert res.tokens == reference.greedy(row.prompt, row.adapter, new), f"row {i}"


def test_prefix_cache_hits_give_the_same_logits(case):
    """A prompt that reuses cached blocks of the same adapter matches PEFT; the same
    tokens under another adapter or the base model hit nothing."""
    _, _, harness, reference = case
    vocab = harness.spec.vocab_size
    blocks = BlockManager(harness.pool.allocator, harness.layout.block_size)
    free = harness.pool.allocator.free_count
    shared = prompt_for(60, 35, vocab)
    try:
        (first,) = harness.generate([Row(shared + [7, 8, 9], 1)], 4, blocks=blocks)
        assert first.cached_prompt_tokens == 0
        assert blocks.cached_pages == 2  # 38 prompt + 3 generated tokens: 2 full blocks
        rows = [
            Row(shared + [10, 11], 1),  # same adapter: two cached blocks
            Row(shared + [10, 11], 2),
            Row(shared + [10, 11], None),
        ]
        results = harness.generate(rows, 6, blocks=blocks)
        assert [r.cached_prompt_tokens for r in results] == [32, 0, 0]
        for i, (row, res) in enumerate(zip(rows, results, strict=True)):
            ids = row.prompt + res.tokens[:-1]
            ref = reference.logits(ids, row.adapter)[len(row.prompt) - 1 :]
            assert_logits_close(torch.stack(res.logits), ref, f"prefix-cache row {i}")
    finally:
        blocks.clear_cache()
    assert harness.pool.allocator.free_count == free


def test_any_rank_that_fits_matches_peft(case, tmp_path):
    """No rank cap and no padding to a maximum rank: a rank above the page
    alignment and an odd rank of 3 both run exactly, in one batch."""
    from lorapool.demo import ALL_MODULES, write_adapter

    _, demo, _, _ = case
    config = json.loads((demo.model_dir / "config.json").read_text())
    dirs = [
        write_adapter(
            config, tmp_path / "r160", rank=160, alpha=32, target_modules=["q_proj", "v_proj"]
        ),
        write_adapter(
            config, tmp_path / "r3", rank=3, alpha=5, target_modules=ALL_MODULES, use_rslora=True
        ),
    ]
    harness = Harness(demo.model_dir, dirs, num_pages=80, seed=3)
    reference = Reference(demo.model_dir, dirs)
    assert [a.rank for a in harness.adapters] == [160, 3]
    vocab = harness.spec.vocab_size
    rows = [
        Row(prompt_for(70, 20, vocab), 0),
        Row(prompt_for(71, 4, vocab), 0),
        Row(prompt_for(72, 19, vocab), 1),
        Row(prompt_for(73, 2, vocab), 1),
        Row(prompt_for(74, 11, vocab), None),
    ]
    new = 20
    results = harness.generate(rows, new)
    for i, (row, res) in enumerate(zip(rows, results, strict=True)):
        ref = reference.logits(row.prompt + res.tokens[:-1], row.adapter)[len(row.prompt) - 1 :]
        assert_logits_close(torch.stack(res.logits), ref, f"row {i} (adapter {row.adapter})")
        assert res.tokens == reference.greedy(row.prompt, row.adapter, new), f"row {i}"


def test_config_defaults_follow_peft(case, tmp_path):
    """An adapter_config.json without lora_alpha / use_rslora gets PEFT's
    defaults (alpha 8, no rsLoRA), not values of its own."""
    _, demo, _, _ = case
    d = tmp_path / "defaults"
    shutil.copytree(demo.adapter_dirs[2], d)  # rank 16, alpha 32, rsLoRA
    config = json.loads((d / "adapter_config.json").read_text())
    del config["lora_alpha"], config["use_rslora"]
    (d / "adapter_config.json").write_text(json.dumps(config))
    harness = Harness(demo.model_dir, [d], num_pages=60, seed=4)
    reference = Reference(demo.model_dir, [d])
    row = Row(prompt_for(80, 12, harness.spec.vocab_size), 0)
    (res,) = harness.generate([row], 6)
    ref = reference.logits(row.prompt + res.tokens[:-1], 0)[len(row.prompt) - 1 :]
    assert_logits_close(torch.stack(res.logits), ref, "adapter with default alpha")


@pytest.fixture(scope="module")
def sharded(case, tmp_path_factory):
    from lorapool.demo import make_demo

    arch = case[0]
    return make_demo(
        tmp_path_factory.mktemp(f"sharded-{arch}"),
        preset="tiny",
        arch=arch,
        n_adapters=0,
        shard_mib=0.05,
    )


def test_sharded_checkpoint_loads_identically(case, mixed, sharded):
    _, demo, harness, _ = case
    index = json.loads((sharded.model_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (sharded.model_dir / "model.safetensors").exists()
    one, many = harness.model, Model.from_pretrained(sharded.model_dir)
    assert one.spec == many.spec
    for name in ("embed", "lm_head", "norm"):
        assert _same_weights(getattr(one, name), getattr(many, name)), name
    for i, (a, b) in enumerate(zip(one.layers, many.layers, strict=True)):
        for field in vars(a):
            x, y = getattr(a, field), getattr(b, field)
            assert (x is None and y is None) or _same_weights(x, y), f"layer {i} {field}"
    # The same batch on the sharded model gives bit-identical logits.
    rows, results = mixed
    other = Harness(sharded.model_dir, demo.adapter_dirs[:N_ADAPTERS], num_pages=POOL_PAGES)
    steps = 6
    got = other.generate(rows, steps)
    for i, (res, base) in enumerate(zip(got, results, strict=True)):
        assert res.tokens == base.tokens[:steps], f"row {i}"
        assert torch.equal(torch.stack(res.logits), torch.stack(base.logits[:steps])), f"row {i}"


def _same_weights(x, y) -> bool:
    """Tensors equal; Linears (whose weights may be in oneDNN's opaque layout) give
    bit-identical outputs on the same input."""
    if not isinstance(x, Linear):
        return torch.equal(x, y)
    probe = torch.randn(5, x.in_features, generator=torch.Generator().manual_seed(0))
    return torch.equal(x(probe), y(probe))


# Half-precision serving (what --dtype bfloat16 runs on a GPU), checked on the CPU
# against fp32 PEFT: the error is the format's rounding, far below any adapter's effect.
HALF_TOL = {torch.bfloat16: 0.08, torch.float16: 0.01}  # of the logits' std


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_stays_close_to_fp32_peft(tiny_demo, dtype):
    dirs = tiny_demo.adapter_dirs[:N_ADAPTERS]
    harness = Harness(tiny_demo.model_dir, dirs, num_pages=POOL_PAGES, dtype=dtype)
    assert harness.pool.tensor.dtype == dtype
    reference = Reference(tiny_demo.model_dir, dirs)
    vocab = harness.spec.vocab_size
    rows = [Row(prompt_for(i, n, vocab), a) for i, (n, a) in enumerate(MIXED)]
    for i, (row, res) in enumerate(zip(rows, harness.generate(rows, 9), strict=True)):
        ids = row.prompt + res.tokens[:-1]
        ref = reference.logits(ids, row.adapter)[len(row.prompt) - 1 :]
        ours = torch.stack(res.logits)
        tol = HALF_TOL[dtype] * float(ref.std())
        err = float((ours - ref).abs().max())
        assert err <= tol, f"row {i} (adapter {row.adapter}): {err:.3g} > {tol:.3g}"
        if row.adapter is not None:
            base = reference.logits(ids, None)[len(row.prompt) - 1 :]
            assert float((ref - base).abs().max()) > 5 * tol, "adapter effect hidden by rounding"
