"""Random PEFT LoRA adapters for a demo (or any Llama-family) model: the rank, alpha
and target mix of the n-th adapter, and writing one adapter directly with
safetensors under the key names PEFT uses, so that writing needs no PEFT and
`peft.PeftModel.from_pretrained` loads it as its own."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorapool.demo.common import check_choice, write_json
from lorapool.demo.presets import ALL_MODULES, ATTN_MODULES, MLP_MODULES

ADAPTER_PREFIX = "adapter-"
MIXES = ("demo", "bench")

# Strength of the random LoRA deltas: the effective delta (scaling * B @ A) has
# entries of std DEFAULT_ADAPTER_SCALE / sqrt(fan_in), i.e. this fraction of the
# base projection's std. At 0.2 every demo adapter changes greedy output within a
# few tokens while the model's activations stay of the same order.
DEFAULT_ADAPTER_SCALE = 0.2


@dataclass(frozen=True)
class AdapterSpec:
    rank: int
    alpha: int
    target_modules: tuple[str, ...]
    use_rslora: bool = False


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


def adapter_name(index: int) -> str:
    return f"{ADAPTER_PREFIX}{index:03d}"


def adapter_spec(index: int, mix: str = "demo", seed: int = 0) -> AdapterSpec:
    """The rank, alpha, targets and scaling of adapter `index` in a mix."""
    check_choice("mix", mix, MIXES)
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
    from safetensors.torch import save_file

    if rank <= 0:
        raise ValueError("rank must be > 0")
    unknown = sorted(set(target_modules) - set(ALL_MODULES))
    if unknown:
        raise ValueError(f"unknown target modules {unknown}; choose from {ALL_MODULES}")
    config = _read_model_config(model_dir_or_config)
    scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
    b_std = scale / (scaling * math.sqrt(rank))
    tensors = _lora_tensors(config, rank, b_std, target_modules, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = _adapter_config(config, rank, alpha, target_modules, use_rslora)
    adapter_config.update(extra_config or {})
    write_json(out_dir / "adapter_config.json", adapter_config)
    return out_dir


def adapter_complete(adapter_dir: Path) -> bool:
    """True when `write_adapter` left both of its files in `adapter_dir`."""
    names = ("adapter_config.json", "adapter_model.safetensors")
    return all((adapter_dir / name).is_file() for name in names)


def _lora_tensors(
    config: dict[str, Any], rank: int, b_std: float, target_modules: Sequence[str], seed: int
) -> dict[str, Any]:
    """Seeded A (std 1/sqrt(fan_in)) and B (std b_std) of every layer's targets, by
    PEFT key name, drawn layer by layer in module name order."""
    import torch

    shapes = module_shapes(config)
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
    return tensors


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
