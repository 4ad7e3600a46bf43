"""Adapters that cannot be served exactly are refused with a typed error whose
message names the problem, and a refused adapter costs no pool pages."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorapool.demo import write_adapter
from lorapool.errors import AdapterIncompatible, AdapterNotFound, AdapterTooLarge
from lorapool.memory.adapter_layout import pack_adapter, place_adapter
from lorapool.memory.adapters import AdapterManager
from lorapool.memory.allocator import OutOfPages
from lorapool.memory.peft_adapter import read_adapter
from lorapool.memory.pool import PageLayout, PagePool
from lorapool.memory.sources import SourceRegistry
from lorapool.server.model.checkpoint import load_spec

GOOD = 2  # demo adapter 2: rank 16, rslora, all seven modules
POOL_PAGES = 96


@pytest.fixture(scope="module")
def spec(tiny_demo):
    return load_spec(tiny_demo.model_dir)


@pytest.fixture(scope="module")
def model_config(tiny_demo):
    return json.loads((tiny_demo.model_dir / "config.json").read_text())


@pytest.fixture
def pool(spec):
    layout = PageLayout(spec.num_layers, 16, spec.num_kv_heads, spec.head_dim)
    return PagePool(layout, POOL_PAGES, torch.float32, "cpu")


def pack(spec, pool, weights):
    return pack_adapter(spec, weights, pool.dtype, pool.page_elems)


# Each builder turns a copy of a good adapter (or an empty dir) into a bad one.


def set_config(**fields):
    def build(d: Path, ctx):
        config = json.loads((d / "adapter_config.json").read_text())
        config.update(fields)
        (d / "adapter_config.json").write_text(json.dumps(config))

    return build


def edit_tensors(fn):
    def build(d: Path, ctx):
        path = d / "adapter_model.safetensors"
        tensors = load_file(str(path))
        fn(tensors)
        save_file(tensors, str(path))

    return build


def truncate(d: Path, ctx):
    path = d / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(d: Path, ctx):
    (d / "adapter_model.safetensors").write_bytes(b"\x00\xff not a safetensors file" * 50)


def bad_json(d: Path, ctx):
    (d / "adapter_config.json").write_text('{"r": 16, "lora_alpha": ')


def config_is_a_list(d: Path, ctx):
    (d / "adapter_config.json").write_text('[{"r": 16}]')


def first_key(tensors, part):
    return next(k for k in sorted(tensors) if part in k)


def nan_weight(tensors):
    key = first_key(tensors, "layers.1.mlp.down_proj.lora_B")
    tensors[key][3, 0] = float("nan")


def inf_weight(tensors):
    key = first_key(tensors, "lora_A")
    tensors[key][0, 0] = float("inf")


def drop_lora_b(tensors):
    del tensors[first_key(tensors, "layers.0.self_attn.k_proj.lora_B")]


def drop_layer(tensors):
    for key in [k for k in tensors if "layers.1.self_attn.o_proj" in k]:
        del tensors[key]


def add_magnitude(tensors):
    # What a DoRA adapter saved without use_dora in its config would hold.
    key = first_key(tensors, "layers.0.self_attn.q_proj.lora_A")
    tensors[key.replace("lora_A.weight", "lora_magnitude_vector")] = torch.ones(64)


def other_model(**changes):
    """An adapter written for a model of another shape."""

    def build(d: Path, ctx):
        shutil.rmtree(d)
        config = dict(ctx["config"], **changes)
        write_adapter(config, d, rank=8, alpha=16, target_modules=["q_proj", "down_proj"])

    return build


def rank_mismatch(d: Path, ctx):
    set_config(r=8)(d, ctx)  # the tensors have rank 16


def pickle_only(d: Path, ctx):
    """adapter_model.bin only, holding a pickle that would leave a mark if loaded."""
    (d / "adapter_model.safetensors").unlink()
    marker = d / "unpickled"
    payload = pickle.dumps(_Trap(str(marker)))
    (d / "adapter_model.bin").write_bytes(payload)


class _Trap:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def no_weights(d: Path, ctx):
    (d / "adapter_model.safetensors").unlink()


def empty_weights(d: Path, ctx):
    save_file({}, str(d / "adapter_model.safetensors"))


CASES = {
    # name: (builder, error type, words the message must contain)
    "truncated safetensors": (truncate, AdapterIncompatible, ["corrupt safetensors"]),
    "garbage safetensors": (garbage, AdapterIncompatible, ["corrupt safetensors"]),
    "config not json": (bad_json, AdapterIncompatible, ["adapter_config.json", "not valid JSON"]),
    "dora": (set_config(use_dora=True), AdapterIncompatible, ["use_dora", "DoRA"]),
    "dora tensors": (edit_tensors(add_magnitude), AdapterIncompatible, ["lora_magnitude_vector"]),
    "modules_to_save": (
        set_config(modules_to_save=["lm_head"]),
        AdapterIncompatible,
        ["modules_to_save"],
    ),
    "bias all": (set_config(bias="all"), AdapterIncompatible, ["bias=all"]),
    "bias lora_only": (set_config(bias="lora_only"), AdapterIncompatible, ["bias=lora_only"]),
    "lora_bias": (set_config(lora_bias=True), AdapterIncompatible, ["lora_bias"]),
    "rank_pattern": (set_config(rank_pattern={"q_proj": 4}), AdapterIncompatible, ["rank_pattern"]),
    "alpha_pattern": (
        set_config(alpha_pattern={"q_proj": 4}),
        AdapterIncompatible,
        ["alpha_pattern"],
    ),
    "layers_to_transform": (
        set_config(layers_to_transform=[0]),
        AdapterIncompatible,
        ["layers_to_transform"],
    ),
    "fan_in_fan_out": (set_config(fan_in_fan_out=True), AdapterIncompatible, ["fan_in_fan_out"]),
    "not lora": (set_config(peft_type="IA3"), AdapterIncompatible, ["peft_type=IA3"]),
    "pissa init": (
        set_config(init_lora_weights="pissa"),
        AdapterIncompatible,
        ["init_lora_weights=pissa"],
    ),
    "pickle only": (pickle_only, AdapterIncompatible, ["adapter_model.bin", "pickle"]),
    "no weights file": (no_weights, AdapterIncompatible, ["no adapter_model.safetensors"]),
    "no tensors": (empty_weights, AdapterIncompatible, ["no LoRA weights"]),
    "nan weights": (edit_tensors(nan_weight), AdapterIncompatible, ["layer 1 down_proj", "NaN"]),
    "inf weights": (edit_tensors(inf_weight), AdapterIncompatible, ["inf"]),
    "missing lora_B": (
        edit_tensors(drop_lora_b),
        AdapterIncompatible,
        ["layer 0 k_proj", "lora_B"],
    ),
    "missing layer": (edit_tensors(drop_layer), AdapterIncompatible, ["o_proj", "[1]"]),
    "wider model": (
        other_model(hidden_size=96, num_attention_heads=6, num_key_value_heads=3),
        AdapterIncompatible,
        ["do not fit the base model", "lora_B (96, 8)"],
    ),
    "wider mlp": (
        other_model(intermediate_size=200),
        AdapterIncompatible,
        ["down_proj", "do not fit the base model"],
    ),
    "deeper model": (other_model(num_hidden_layers=3), AdapterIncompatible, ["layer 2"]),
    "activated lora": (
        set_config(alora_invocation_tokens=[5, 6]),
        AdapterIncompatible,
        ["alora_invocation_tokens"],
    ),
    "config is a list": (config_is_a_list, AdapterIncompatible, ["JSON object", "list"]),
    "rank a string": (set_config(r="four"), AdapterIncompatible, ["positive integer rank", "four"]),
    "rank null": (set_config(r=None), AdapterIncompatible, ["positive integer rank", "None"]),
    "rank fractional": (set_config(r=15.5), AdapterIncompatible, ["positive integer rank"]),
    "alpha a string": (set_config(lora_alpha="eight"), AdapterIncompatible, ["lora_alpha"]),
    "alpha nan": (set_config(lora_alpha=float("nan")), AdapterIncompatible, ["lora_alpha", "nan"]),
    "alpha infinite": (set_config(lora_alpha=float("inf")), AdapterIncompatible, ["lora_alpha"]),
    "alpha overflows B": (set_config(lora_alpha=1e308), AdapterIncompatible, ["overflows"]),
    "rslora a string": (set_config(use_rslora="yes"), AdapterIncompatible, ["use_rslora"]),
    "rank differs from config": (
        rank_mismatch,
        AdapterIncompatible,
        ["rank 8", "do not fit the base model"],
    ),
}


@pytest.fixture(params=sorted(CASES))
def bad_case(request, tiny_demo, model_config, tmp_path):
    builder, error, words = CASES[request.param]
    d = tmp_path / "bad-adapter"
    shutil.copytree(tiny_demo.adapter_dirs[GOOD], d)
    builder(d, {"config": model_config})
    return d, error, words


def test_read_adapter_refuses_by_name(bad_case, spec):
    d, error, words = bad_case
    with pytest.raises(error) as exc:
        read_adapter(d, spec)
    assert type(exc.value) is error
    message = str(exc.value)
    assert str(d) in message, "the message should name the adapter"
    for word in words:
        assert word in message
    assert exc.value.status == "FAILED_PRECONDITION"
    assert not (d / "unpickled").exists(), "a pickle file was loaded"


async def test_refused_adapter_takes_no_pages(bad_case, spec, pool, tiny_demo):
    d, error, words = bad_case
    manager = AdapterManager(SourceRegistry(), pool, spec, host_cache_bytes=1 << 30)
    try:
        # a good adapter is resident; the bad one must not disturb it
        good = manager.entry("good", str(tiny_demo.adapter_dirs[GOOD]))
        await manager.ensure_host(good)
        pages = pool.allocator.allocate(manager.pages_needed(good))
        manager.place(good, pages)
        free = pool.allocator.free_count
        assert free == POOL_PAGES - len(pages)
        entry = manager.entry("bad", str(d))
        with pytest.raises(error) as exc:
            await manager.ensure_host(entry)
        assert all(w in str(exc.value) for w in words)
        assert not (d / "unpickled").exists(), "a pickle file was loaded"
        assert pool.allocator.free_count == free
        assert list(manager.host) == list(manager.device) == [good.content_hash]
        assert manager.device_pages == len(pages) and not manager.reserved
        assert manager.info(entry).pages == 0 and not entry.content_hash
    finally:
        manager.shutdown()


def test_missing_directory_is_not_found(spec, tmp_path):
    with pytest.raises(AdapterNotFound, match="no adapter_config.json") as exc:
        read_adapter(tmp_path / "nowhere", spec)
    assert exc.value.status == "NOT_FOUND"
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterNotFound):
        read_adapter(tmp_path / "empty", spec)


async def test_unknown_adapter_id_is_not_found(spec, pool, tmp_path):
    manager = AdapterManager(SourceRegistry([tmp_path]), pool, spec, host_cache_bytes=1 << 30)
    try:
        with pytest.raises(AdapterNotFound, match="'ghost' is unknown"):
            manager.entry("ghost")
        entry = manager.entry("gone", str(tmp_path / "gone"))
        with pytest.raises(AdapterNotFound):
            await manager.ensure_host(entry)
        assert pool.allocator.free_count == POOL_PAGES
    finally:
        manager.shutdown()


def big_adapter(model_config, d: Path, rank: int = 64) -> Path:
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return write_adapter(model_config, d, rank=rank, alpha=rank, target_modules=modules, seed=7)


def test_rank_too_big_for_the_free_pool_takes_nothing(spec, pool, model_config, tmp_path):
    """Placing needs more pages than are free: allocation raises OutOfPages and
    takes no page; once KV pages return, the same adapter places fine."""
    weights = read_adapter(big_adapter(model_config, tmp_path / "big"), spec)
    packed = pack(spec, pool, weights)
    need = packed.num_pages(pool.page_elems)
    assert 1 < need < POOL_PAGES
    kv = pool.allocator.allocate(POOL_PAGES - need + 1)  # one page short
    free = pool.allocator.free_count
    with pytest.raises(OutOfPages, match=f"need {need} pages, {need - 1} free"):
        pool.allocator.allocate(need)
    assert pool.allocator.free_count == free
    assert pool.allocator.refcounts(kv).tolist() == [1] * len(kv)
    pool.allocator.free(kv[:1])
    pages = pool.allocator.allocate(need)
    placed = place_adapter(pool, spec, packed, pages, weights.content_hash)
    assert pool.allocator.free_count == 0 and placed.pages.numel() == need


async def test_adapter_larger_than_the_pool_is_refused(spec, model_config, tmp_path):
    layout = PageLayout(spec.num_layers, 16, spec.num_kv_heads, spec.head_dim)
    small = PagePool(layout, 8, torch.float32, "cpu")
    d = big_adapter(model_config, tmp_path / "huge", rank=128)
    need = pack(spec, small, read_adapter(d, spec)).num_pages(small.page_elems)
    manager = AdapterManager(SourceRegistry(), small, spec, host_cache_bytes=1 << 30)
    try:
        entry = manager.entry("huge", str(d))
        with pytest.raises(AdapterTooLarge) as exc:
            await manager.ensure_host(entry)
        message = str(exc.value)
        assert f"needs {need} pages" in message and "holds 8" in message
        assert "--pool-mib" in message
        assert exc.value.status == "FAILED_PRECONDITION"
        assert small.allocator.free_count == 8 and not manager.host
    finally:
        manager.shutdown()


def test_good_adapter_still_loads(tiny_demo, spec):
    """The builders above start from this adapter: it must be accepted as is."""
    weights = read_adapter(tiny_demo.adapter_dirs[GOOD], spec)
    assert weights.rank == 16 and weights.use_rslora
    assert len(weights.target_modules) == 7
