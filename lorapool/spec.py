"""The shape of a base model: what the memory layout, the adapter checks and the
runner need to know about an architecture. Plain data, no torch, so every layer
can use it (server/model/checkpoint.py reads it from a checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

# The linear modules a LoRA adapter may target, with their (in, out) widths.
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelSpec:
    """What the runner needs to know about the architecture."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position: int
    attention_bias: bool
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    sliding_window: int | None = None
    # the checkpoint's own config (the model builds its HF modules from it)
    hf_config: PreTrainedConfig | None = field(default=None, compare=False, repr=False)

    def module_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a targetable linear module."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }[module]
