"""Load a Llama-family checkpoint (Llama, Mistral, Qwen2) from a Hugging Face
directory: config.json through transformers' config classes, weights from
model.safetensors or shards listed in model.safetensors.index.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig

from lorapool.spec import ModelSpec

SUPPORTED_ARCHS = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}
UNSUPPORTED_ROPE = {"dynamic", "longrope"}


def load_spec(model_dir: str | Path) -> ModelSpec:
    config = AutoConfig.from_pretrained(str(model_dir))
    archs = set(getattr(config, "architectures", None) or [])
    if not archs & SUPPORTED_ARCHS:
        raise ValueError(
            f"{model_dir}: architecture {sorted(archs) or config.model_type} is not supported; "
            f"supported: {sorted(SUPPORTED_ARCHS)}"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") in UNSUPPORTED_ROPE:
        raise ValueError(f"{model_dir}: rope_type {rope['rope_type']!r} is not supported")
    eos = config.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (() if eos is None else (eos,))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    use_sw = getattr(config, "use_sliding_window", True)
    sliding = getattr(config, "sliding_window", None) if use_sw else None
    return ModelSpec(
        arch=sorted(archs & SUPPORTED_ARCHS)[0],
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        rms_norm_eps=config.rms_norm_eps,
        max_position=config.max_position_embeddings,
        attention_bias=bool(getattr(config, "attention_bias", False))
        or config.model_type == "qwen2",
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        eos_token_ids=eos_ids,
        sliding_window=sliding,
        hf_config=config,
    )


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(
        f"{model_dir}: no model.safetensors or model.safetensors.index.json "
        "(pickle checkpoints are not loaded)"
    )


def load_tensors(model_dir: str | Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors
