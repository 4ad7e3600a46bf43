"""The demo base model's weights: a seeded random init that decodes like a real model,
written in the Hugging Face layout, in one file or in safetensors shards."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorapool.demo.presets import PRESETS, model_config
from lorapool.demo.tokenizer import write_tokenizer

MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
WEIGHTS_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"


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
    with _quiet_progress():
        model.save_pretrained(model_dir, max_shard_size=_max_shard_size(shard_mib))
    return model_dir


def _max_shard_size(shard_mib: float | None) -> int | str:
    """save_pretrained's shard limit: shard_mib in bytes, else one file (no demo
    model comes near 50GB)."""
    return int(shard_mib * 2**20) if shard_mib else "50GB"


def model_complete(model_dir: Path, sharded: bool) -> bool:
    """True when `write_model` left config, tokenizer and every weight file in place."""
    weights = SHARD_INDEX if sharded else WEIGHTS_FILE
    if not all((model_dir / name).is_file() for name in (*MODEL_FILES, weights)):
        return False
    return not sharded or _shards_present(model_dir)


def _shards_present(model_dir: Path) -> bool:
    try:
        index = json.loads((model_dir / SHARD_INDEX).read_text())
        shards = set(index["weight_map"].values())
    except (OSError, ValueError, KeyError):
        return False
    return all((model_dir / name).is_file() for name in shards)


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
