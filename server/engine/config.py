"""What an engine is started with."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    model_dir: str
    model_name: str = ""  # reported by model_info; default: the checkpoint dir's name
    adapter_dirs: list[str] = field(default_factory=list)
    device: str = "cpu"
    dtype: str = "float32"
    pool_mib: float = 256.0
    block_size: int = 16
    max_batch_tokens: int = 512
    max_running: int = 128
    max_waiting: int = 1024  # bounded admission queue
    max_new_tokens_limit: int = 4096
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    host_cache_mib: float = 1024.0
    starvation_steps: int = 32
    watermark: float = 0.02
    enable_prefix_cache: bool = True
    pinned: list[str] = field(default_factory=list)
    max_logprobs: int = 20
    tokenizer_dir: str | None = None  # default: the checkpoint's own tokenizer, if any

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = DTYPES.get(self.dtype)
        if dtype is None:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        return dtype
