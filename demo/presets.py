"""The demo base model's sizes (presets) and architectures, the projections a LoRA
adapter may target, and the transformers config for a preset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ARCHS = ("llama", "qwen2")

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ALL_MODULES = ATTN_MODULES + MLP_MODULES


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
