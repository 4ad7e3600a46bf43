"""A local, random-init base model and PEFT LoRA adapters for tests, benchmarks and
the default server, so that nothing has to be downloaded.

`make_demo(dir)` writes::

    dir/demo.json                  stamp: the parameters, written last
    dir/.lock                      serializes concurrent writers
    dir/model/                     Hugging Face layout (config, weights, tokenizer)
    dir/adapters/adapter-000/      PEFT layout (adapter_config.json, adapter_model.safetensors)
    dir/adapters/adapter-001/ ...

The weights are random but deterministic for a seed, scaled so that greedy decoding
produces varied tokens and every adapter visibly changes the output. The adapters are
written directly with safetensors under the key names PEFT uses, so writing them needs
no PEFT; `peft.PeftModel.from_pretrained` loads them as its own.

Heavy imports (torch, transformers, tokenizers) are deferred, so that `make-demo` on
an up-to-date directory returns at once.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAMP_NAME = "demo.json"
STAMP_VERSION = 1
ADAPTER_PREFIX = "adapter-"

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (BOS, EOS, PAD)  # ids 0, 1, 2

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ALL_MODULES = ATTN_MODULES + MLP_MODULES

ARCHS = ("llama", "qwen2")
MIXES = ("demo", "bench")

# Strength of the random LoRA deltas: the effective delta (scaling * B @ A) has
# entries of std DEFAULT_ADAPTER_SCALE / sqrt(fan_in), i.e. this fraction of the
# base projection's std. At 0.2 every demo adapter changes greedy output within a
# few tokens while the model's activations stay of the same order.
DEFAULT_ADAPTER_SCALE = 0.2


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    # Rope scaling applied for arch llama only (None: plain rope).
    llama_rope_scaling: dict[str, Any] | None = None


PRESETS = {
    # Small enough for unit tests; llama3 rope scaling so that code path is exercised.
    "tiny": Preset(
        hidden_size=64,
        intermediate_size=176,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        vocab_size=512,
        max_position_embeddings=2048,
        llama_rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
    ),
    # Big enough that batching and adapter math dominate Python overhead.
    "bench": Preset(
        hidden_size=512,
        intermediate_size=1408,
        num_layers=8,
        num_heads=8,
        num_kv_heads=2,
        vocab_size=8192,
        max_position_embeddings=4096,
    ),
}


@dataclass
class DemoPaths:
    root: Path
    model_dir: Path
    adapters_dir: Path
    adapter_dirs: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class AdapterSpec:
    rank: int
    alpha: int
    target_modules: tuple[str, ...]
    use_rslora: bool = False


# --------------------------------------------------------------------------- paths


def default_demo_dir() -> Path:
    """Where the server and benchmarks look for the demo when given no model.

    LORAPOOL_DEMO_DIR wins. Otherwise, in a source checkout (the editable install
    used for development) it is `<repo>/.cache/demo`, next to the code and already
    git-ignored; for an installed package it is `~/.cache/lorapool/demo`.
    """
    env = os.environ.get("LORAPOOL_DEMO_DIR")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").is_file() and (repo / "server" / "demo.py").is_file():
        return repo / ".cache" / "demo"
    return Path.home() / ".cache" / "lorapool" / "demo"


def adapter_name(index: int) -> str:
    return f"{ADAPTER_PREFIX}{index:03d}"


# --------------------------------------------------------------------------- make_demo


def make_demo(
    out_dir: str | os.PathLike[str],
    preset: str = "tiny",
    arch: str = "llama",
    n_adapters: int = 8,
    mix: str = "demo",
    seed: int = 0,
    shard_mib: float | None = None,
) -> DemoPaths:
    """Write (or reuse) a demo model and `n_adapters` adapters under `out_dir`.

    A directory whose stamp records the same parameters, with all files present, is
    returned untouched; anything else in model/ and adapters/ is replaced. A file lock
    makes concurrent callers (parallel test workers) wait for one writer.
    """
    _check_choice("preset", preset, PRESETS)
    _check_choice("arch", arch, ARCHS)
    _check_choice("mix", mix, MIXES)
    if n_adapters < 0:
        raise ValueError("n_adapters must be >= 0")
    if shard_mib is not None and shard_mib <= 0:
        raise ValueError("shard_mib must be > 0")
    root = Path(out_dir).expanduser().resolve()
    paths = _demo_paths(root, n_adapters)
    params = {
        "version": STAMP_VERSION,
        "preset": preset,
        "arch": arch,
        "n_adapters": n_adapters,
        "mix": mix,
        "seed": seed,
        "shard_mib": shard_mib,
    }
    if _is_complete(paths, params):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        if _is_complete(paths, params):  # another process finished it meanwhile
            return paths
        (root / STAMP_NAME).unlink(missing_ok=True)
        for stale in (paths.model_dir, paths.adapters_dir):
            if stale.exists():
                shutil.rmtree(stale)
        write_model(paths.model_dir, preset=preset, arch=arch, seed=seed, shard_mib=shard_mib)
        make_adapters(paths.model_dir, paths.adapters_dir, n_adapters, mix=mix, seed=seed)
        _write_json(root / STAMP_NAME, params)
    return paths


def _check_choice(what: str, value: str, choices: Sequence[str] | dict[str, Any]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose from {', '.join(choices)}")


def _demo_paths(root: Path, n_adapters: int) -> DemoPaths:
    adapters_dir = root / "adapters"
    return DemoPaths(
        root=root,
        model_dir=root / "model",
        adapters_dir=adapters_dir,
        adapter_dirs=[adapters_dir / adapter_name(i) for i in range(n_adapters)],
    )


def _is_complete(paths: DemoPaths, params: dict[str, Any]) -> bool:
    """True when the stamp matches and the files it promises are there."""
    try:
        stamp = json.loads((paths.root / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return False
    if stamp != params:
        return False
    model_files = ["config.json", "tokenizer.json", "tokenizer_config.json"]
    weights = ["model.safetensors.index.json" if params["shard_mib"] else "model.safetensors"]
    if not all((paths.model_dir / name).is_file() for name in model_files + weights):
        return False
    if params["shard_mib"] and not _shards_present(paths.model_dir):
        return False
    return all(
        (d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file()
        for d in paths.adapter_dirs
    )


def _shards_present(model_dir: Path) -> bool:
    try:
        index = json.loads((model_dir / "model.safetensors.index.json").read_text())
        shards = set(index["weight_map"].values())
    except (OSError, ValueError, KeyError):
        return False
    return all((model_dir / name).is_file() for name in shards)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- tokenizer

# Deterministic training text: varied English prose, dialogue, numbers, code and a
# little non-ASCII so that multi-byte UTF-8 merges exist.
CORPUS = """\
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Once upon a time, in a small village by the sea, there lived an old fisherman who
told stories to anyone who would listen. Every morning he walked down to the harbour,
checked his nets, and watched the gulls circle above the boats.
"Where are you going?" asked the girl. "To the market," he replied, "and then home."
She laughed, picked up her basket, and followed him along the narrow stone path.
A server that hosts many adapters of one base model must decide which adapters stay
in memory, which are evicted, and how requests for different adapters share a batch.
Latency matters: the first token should arrive quickly, and the following tokens
should stream at a steady pace. Throughput matters too, because hardware is costly.
In 1969, people first walked on the Moon. In 2024, the price was $3.50 per unit, up
12% from the year before; the total came to 1,234,567 units across 89 regions.
def greet(name: str) -> str:
    return f"Hello, {name}!"

for i in range(10):
    print(i, i * i, i ** 3)

if (x > 0 && y < 100) { return x + y; } else { return -1; }
SELECT name, count(*) FROM users WHERE age >= 18 GROUP BY name ORDER BY 2 DESC;
The weather today is mild and cloudy, with a chance of rain in the afternoon. Winds
from the west at ten to fifteen miles per hour. Tomorrow will be sunny and warmer.
Scientists study the stars, the oceans, the forests and the tiny cells inside us.
Music, painting, poetry and dance are ways in which people share what they feel.
Water boils at one hundred degrees Celsius at sea level, and freezes at zero.
She sells sea shells by the sea shore; the shells she sells are surely sea shells.
Please remember to save your work often, back up your files, and test your code.
Questions? Answers! Lists: apples, oranges, pears; brackets [a], {b}, (c), <d>.
A naïve café owner in Zürich served crème brûlée and a piña colada to a façade
designer. Tokyo is 東京, Beijing is 北京, and hello is こんにちは or 你好 or 안녕하세요.
Greek: αβγδε, Russian: Привет мир, Arabic: مرحبا, Hindi: नमस्ते, emoji: 😀 🚀 ❤️ 👍.
The committee met on Tuesday to review the budget, approve the new schedule, and
discuss the plans for the library, the park, and the bridge over the river.
Good software is simple, clear, and well tested; it fails loudly and recovers well.
"""


# The pre-tokenizer split of Qwen2's tokenizer. transformers 5 loads any model of
# type qwen2 with its own Qwen2Tokenizer class, which rebuilds the normalizer (NFC)
# and pre-tokenizer from this pattern whatever tokenizer.json says; training the
# qwen2 demo tokenizer the same way keeps tokenizer.json and AutoTokenizer in step.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def build_tokenizer(vocab_size: int, arch: str = "llama") -> Any:
    """Train a byte-level BPE tokenizer on CORPUS.

    Byte-level pre-tokenization and decoding make decode(encode(s)) == s for any
    string (for qwen2: any NFC-normalized string, as with the real Qwen2 tokenizer);
    the template post-processor prepends <s> like Llama tokenizers do.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    tokenizer = Tokenizer(models.BPE())
    if arch == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    text = CORPUS.splitlines(keepends=True)
    _train(tokenizer, text, vocab_size)
    if tokenizer.get_vocab_size() < vocab_size:
        # Fill a large vocabulary too: ids the tokenizer cannot decode would make
        # most generated tokens print as nothing. English still merges first.
        _train(tokenizer, text * 20 + _filler_text(40 * vocab_size), vocab_size)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B:1",
        special_tokens=[(BOS, bos_id)],
    )
    return tokenizer


def _train(tokenizer: Any, text: list[str], vocab_size: int) -> None:
    from tokenizers import pre_tokenizers, trainers

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text, trainer=trainer)


_ONSETS = "- b c d f g h j k l m n p r s t v w z br ch st tr sh th pl gr".split()
_VOWELS = "a e i o u ai ea ou y".split()
_CODAS = "- - - n r s t l m ck ng st".split()


def _filler_text(n_chars: int) -> list[str]:
    """Deterministic lines of pronounceable pseudo-words, about n_chars long."""
    import random

    rng = random.Random(0)

    def syllable() -> str:
        parts = (rng.choice(_ONSETS), rng.choice(_VOWELS), rng.choice(_CODAS))
        return "".join(p for p in parts if p != "-")

    lines, total = [], 0
    while total < n_chars:
        words = ["".join(syllable() for _ in range(rng.randint(1, 3))) for _ in range(12)]
        line = " ".join(words).capitalize() + ".\n"
        lines.append(line)
        total += len(line)
    return lines


def write_tokenizer(model_dir: Path, vocab_size: int, arch: str = "llama") -> dict[str, int]:
    """Save tokenizer.json and a config transformers loads as a fast tokenizer.

    Returns the special token ids, for the model and generation configs.
    """
    tokenizer = build_tokenizer(vocab_size, arch)
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    ids = {
        name: tokenizer.token_to_id(tok)
        for name, tok in zip(("bos", "eos", "pad"), SPECIAL_TOKENS, strict=True)
    }
    _write_json(
        model_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "unk_token": None,  # else Qwen2Tokenizer adds <|endoftext|> past the vocab
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000,
            "padding_side": "left",
        },
    )
    _write_json(
        model_dir / "special_tokens_map.json",
        {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD},
    )
    return ids


# --------------------------------------------------------------------------- model


def model_config(
    preset: str = "tiny", arch: str = "llama", token_ids: dict[str, int] | None = None
) -> Any:
    """The transformers config for a preset; Qwen2 always has q/k/v biases."""
    from transformers import LlamaConfig, Qwen2Config

    p = PRESETS[preset]
    ids = token_ids or {"bos": 0, "eos": 1, "pad": 2}
    common = dict(
        vocab_size=p.vocab_size,
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads,
        num_key_value_heads=p.num_kv_heads,
        max_position_embeddings=p.max_position_embeddings,
        rms_norm_eps=1e-6,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        dtype="float32",
    )
    # transformers 5 writes all rope settings, rope_theta included, under
    # "rope_parameters" in config.json (no top-level rope_theta / rope_scaling).
    if arch == "llama":
        rope = {"rope_type": "default", **(p.llama_rope_scaling or {})}
        rope["rope_theta"] = p.rope_theta
        return LlamaConfig(**common, rope_parameters=rope, tie_word_embeddings=False)
    rope = {"rope_type": "default", "rope_theta": p.rope_theta}
    return Qwen2Config(**common, rope_parameters=rope, tie_word_embeddings=True)


def init_weights(model: Any, seed: int) -> None:
    """Overwrite every parameter from one seeded generator, in name order.

    Projections get std 1/sqrt(fan_in), so that with RMS-normed inputs every layer's
    output has unit scale and attention and MLPs shape the next token (tiny weights
    leave the last token's embedding in charge, and greedy decoding loops at once).
    Untied models get unit embeddings and an lm_head of std 1/sqrt(hidden): logits
    of unit std. With tied embeddings the residual's own embedding would dominate
    the logits and repeat the input token, so embeddings are small (std 0.02) and
    the final norm's weight restores logits of unit std. Biases (Qwen2's q/k/v) get
    std 0.1: non-zero, so that bias handling is exercised, but not dominant.
    """
    import torch

    config = model.config
    hidden = config.hidden_size
    tied = bool(config.tie_word_embeddings)
    emb_std = 0.02 if tied else 1.0
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name == "model.norm.weight":
                param.fill_(1.0 / (emb_std * math.sqrt(hidden)) if tied else 1.0)
                continue
            if "norm" in name:
                param.fill_(1.0)
                continue
            if "embed_tokens" in name:
                std = emb_std
            elif name.endswith(".bias"):
                std = 0.1
            else:  # projections and an untied lm_head: [out, in]
                std = param.shape[1] ** -0.5
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def write_model(
    model_dir: str | os.PathLike[str],
    preset: str = "tiny",
    arch: str = "llama",
    seed: int = 0,
    shard_mib: float | None = None,
) -> Path:
    """Write tokenizer, config, generation config and weights in the HF layout."""
    model_dir = Path(model_dir)
    p = PRESETS[preset]
    ids = write_tokenizer(model_dir, p.vocab_size, arch)
    return write_checkpoint(model_dir, model_config(preset, arch, ids), seed, shard_mib)


def write_checkpoint(
    model_dir: str | os.PathLike[str],
    config: Any,
    seed: int = 0,
    shard_mib: float | None = None,
) -> Path:
    """Write config, generation config and seeded weights (no tokenizer) for any
    Llama-family transformers config: any widths, head dim, KV heads or vocab."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    model_dir = Path(model_dir)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config)
    init_weights(model, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    shard = int(shard_mib * 2**20) if shard_mib else "50GB"
    with _quiet_progress():
        model.save_pretrained(model_dir, max_shard_size=shard)
    return model_dir


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide transformers' per-shard progress bar, which is noise for a tiny model."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------- adapters

# The demo mix cycles through co-prime-length tables, so that the first few
# adapters already cover small and large ranks, attention-only, MLP-only and full
# targeting, plain and rsLoRA scaling.
DEMO_RANKS = (4, 8, 16, 32, 64, 12, 24, 48, 6)
DEMO_TARGETS = (
    ("q_proj", "v_proj"),
    ATTN_MODULES,
    ALL_MODULES,
    MLP_MODULES,
    ("q_proj", "k_proj", "v_proj"),
    ("o_proj", "down_proj"),
    ("q_proj", "v_proj", "up_proj"),
)
DEMO_ALPHAS = (8, 16, 32, "r", "2r")
BENCH_RANKS = (8, 16, 32)


def adapter_spec(index: int, mix: str = "demo", seed: int = 0) -> AdapterSpec:
    """The rank, alpha, targets and scaling of adapter `index` in a mix."""
    _check_choice("mix", mix, MIXES)
    if mix == "bench":
        # Half q,v; a quarter the attention projections; a quarter all seven.
        targets = (("q_proj", "v_proj"),) * 2 + (ATTN_MODULES, ALL_MODULES)
        rank = BENCH_RANKS[(index + seed) % len(BENCH_RANKS)]
        alpha = 2 * rank if ((index + seed) // len(BENCH_RANKS)) % 2 == 0 else rank
        return AdapterSpec(rank=rank, alpha=alpha, target_modules=targets[index % 4])
    k = index + seed
    rank = DEMO_RANKS[k % len(DEMO_RANKS)]
    alpha = DEMO_ALPHAS[k % len(DEMO_ALPHAS)]
    alpha = {"r": rank, "2r": 2 * rank}.get(alpha, alpha)  # type: ignore[arg-type]
    return AdapterSpec(
        rank=rank,
        alpha=int(alpha),
        target_modules=DEMO_TARGETS[k % len(DEMO_TARGETS)],
        use_rslora=k % 3 == 2,
    )


def make_adapters(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    n: int,
    mix: str = "demo",
    seed: int = 0,
    start_index: int = 0,
) -> list[Path]:
    """Write adapters `adapter-<start_index>` ... for the model in `model_dir`."""
    out_dir = Path(out_dir)
    config = _read_model_config(model_dir)
    dirs = []
    for index in range(start_index, start_index + n):
        spec = adapter_spec(index, mix, seed)
        dirs.append(
            write_adapter(
                config,
                out_dir / adapter_name(index),
                rank=spec.rank,
                alpha=spec.alpha,
                target_modules=spec.target_modules,
                use_rslora=spec.use_rslora,
                seed=_adapter_seed(seed, index),
            )
        )
    return dirs


def _adapter_seed(seed: int, index: int) -> int:
    """Distinct, stable weight seeds per (demo seed, adapter index)."""
    return (seed * 1_000_003 + index + 1) % 2**63


def write_adapter(
    model_dir_or_config: str | os.PathLike[str] | dict[str, Any] | Any,
    out_dir: str | os.PathLike[str],
    rank: int,
    alpha: int | float,
    target_modules: Sequence[str],
    use_rslora: bool = False,
    seed: int = 0,
    extra_config: dict[str, Any] | None = None,
    scale: float = DEFAULT_ADAPTER_SCALE,
) -> Path:
    """Write one LoRA adapter into `out_dir` (the adapter's own directory).

    Unlike PEFT's init (B = 0), both A and B are random: the effective delta
    scaling * B @ A has entries of std `scale` / sqrt(fan_in), i.e. `scale` times
    the base projection's std, whatever the rank, alpha or rsLoRA setting. Every
    layer gets the same target modules, as PEFT does by default. `extra_config`
    entries override adapter_config.json fields (e.g. {"use_dora": True}).
    """
    import torch
    from safetensors.torch import save_file

    if rank <= 0:
        raise ValueError("rank must be > 0")
    unknown = sorted(set(target_modules) - set(ALL_MODULES))
    if unknown:
        raise ValueError(f"unknown target modules {unknown}; choose from {ALL_MODULES}")
    config = _read_model_config(model_dir_or_config)
    shapes = module_shapes(config)
    scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
    b_std = scale / (scaling * math.sqrt(rank))
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module in sorted(target_modules):
            fan_in, fan_out = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.{_block(module)}.{module}"
            a = torch.randn((rank, fan_in), generator=generator) * fan_in**-0.5
            b = torch.randn((fan_out, rank), generator=generator) * b_std
            tensors[f"{prefix}.lora_A.weight"] = a.contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.contiguous()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = _adapter_config(config, rank, alpha, target_modules, use_rslora)
    adapter_config.update(extra_config or {})
    _write_json(out_dir / "adapter_config.json", adapter_config)
    return out_dir


def _adapter_config(
    config: dict[str, Any],
    rank: int,
    alpha: int | float,
    target_modules: Sequence[str],
    use_rslora: bool,
) -> dict[str, Any]:
    """adapter_config.json as PEFT writes it (fields a loader may look at)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": config.get("_name_or_path") or None,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "use_rslora": use_rslora,
        "use_dora": False,
        "target_modules": sorted(target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_bias": False,
    }


def _block(module: str) -> str:
    return "self_attn" if module in ATTN_MODULES else "mlp"


def module_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(fan_in, fan_out) of each LoRA-targetable projection of a config dict."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def _read_model_config(source: str | os.PathLike[str] | dict[str, Any] | Any) -> dict[str, Any]:
    """A config dict from a model dir, a config.json path, a dict or a config object."""
    if isinstance(source, dict):
        return dict(source)
    if hasattr(source, "to_dict"):
        return source.to_dict()
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    config = json.loads(path.read_text())
    config["_name_or_path"] = str(path.parent.resolve())
    return config


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser, name: str = "make-demo") -> None:
    parser.add_argument(
        "dir",
        nargs="?",
        type=Path,
        default=None,
        help="output directory (default: $LORAPOOL_DEMO_DIR or <repo>/.cache/demo)",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--arch", choices=ARCHS, default="llama")
    parser.add_argument("--adapters", type=int, default=8, metavar="N", help="number of adapters")
    parser.add_argument("--mix", choices=MIXES, default="demo", help="adapter rank/target mix")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shard-mib",
        type=float,
        default=None,
        metavar="M",
        help="split the weights into safetensors shards of at most M MiB (fractions allowed)",
    )


def run(args: argparse.Namespace) -> int:
    import time

    start = time.perf_counter()
    paths = make_demo(
        args.dir if args.dir is not None else default_demo_dir(),
        preset=args.preset,
        arch=args.arch,
        n_adapters=args.adapters,
        mix=args.mix,
        seed=args.seed,
        shard_mib=args.shard_mib,
    )
    elapsed = time.perf_counter() - start
    print(f"model:    {paths.model_dir}")
    print(f"adapters: {paths.adapters_dir} ({len(paths.adapter_dirs)})")
    print(f"ready in {elapsed:.1f}s")
    return 0
