"""Read a PEFT LoRA adapter directory into host memory and check it against the
base model. Only what lorapool computes exactly is accepted; every other PEFT
feature is refused by name, never silently ignored."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from lorapool.errors import AdapterIncompatible, AdapterNotFound
from lorapool.spec import LINEAR_MODULES, ModelSpec

_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\."
    r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.lora_([AB])(?:\.default)?\.weight$"
)

# (layer, module) -> (A [r, in], B [out, r])
LoraWeights = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class AdapterWeights:
    """An adapter in host memory, validated against the base model."""

    rank: int
    alpha: float
    use_rslora: bool
    target_modules: list[str]
    weights: LoraWeights
    content_hash: str  # xxhash of config values that matter + every tensor byte
    nbytes: int

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def read_adapter(path: str | Path, spec: ModelSpec, label: str | None = None) -> AdapterWeights:
    """Raise AdapterNotFound for a missing directory and AdapterIncompatible for
    anything that cannot be served exactly on `spec`. Messages name the adapter
    by `label` (default: its path)."""
    path = Path(path)
    name = label or str(path)
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterNotFound(f"{name}: no adapter_config.json")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterIncompatible(f"{name}/adapter_config.json is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterIncompatible(
            f"{name}/adapter_config.json must hold a JSON object, not {type(config).__name__}"
        )
    _check_config(name, config)
    weights_file = path / "adapter_model.safetensors"
    if not weights_file.is_file():
        if (path / "adapter_model.bin").exists():
            raise AdapterIncompatible(
                f"{name}: adapter_model.bin is a pickle file, which is never loaded; "
                "convert it to adapter_model.safetensors"
            )
        raise AdapterIncompatible(f"{name}: no adapter_model.safetensors")
    data = weights_file.read_bytes()
    try:
        tensors = load_safetensors_bytes(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterIncompatible(
            f"{name}/adapter_model.safetensors: corrupt safetensors file ({exc})"
        ) from exc
    return _build(name, config, tensors, spec)


def _check_config(path: str, config: dict) -> None:
    def refuse(feature: str, why: str) -> None:
        raise AdapterIncompatible(f"{path}: unsupported PEFT feature {feature}: {why}")

    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        refuse(f"peft_type={peft_type}", "only LORA adapters are served")
    if config.get("use_dora"):
        refuse("use_dora", "DoRA magnitude vectors are not applied")
    if config.get("modules_to_save"):
        refuse("modules_to_save", "full copies of base modules are not served")
    if config.get("bias", "none") != "none":
        refuse(f"bias={config['bias']}", "only bias='none' is supported")
    if config.get("rank_pattern"):
        refuse("rank_pattern", "per-module ranks are not supported")
    if config.get("alpha_pattern"):
        refuse("alpha_pattern", "per-module alphas are not supported")
    if config.get("layers_to_transform") is not None:
        refuse("layers_to_transform", "adapters must cover every layer")
    if config.get("fan_in_fan_out"):
        refuse("fan_in_fan_out", "weights must be stored as nn.Linear (out, in)")
    if config.get("alora_invocation_tokens"):
        refuse("alora_invocation_tokens", "activated LoRA applies only after its invocation tokens")
    for key, why in (
        ("target_parameters", "LoRA on raw parameters is not served"),
        ("layer_replication", "replicated layers are not served"),
        ("trainable_token_indices", "trainable token embeddings are not applied"),
    ):
        if config.get(key):
            refuse(key, why)
    if config.get("use_qalora") or config.get("lora_bias"):
        refuse("lora_bias/qalora", "not supported")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "eva")):
        # These change the base weights at init; the saved adapter is only exact
        # against the modified base.
        refuse(f"init_lora_weights={init}", "it modifies the base weights")


def _scaling(path: str, config: dict) -> tuple[int, float, bool]:
    """(r, lora_alpha, use_rslora), each checked for type and range: a string, a
    null, NaN or Infinity (which JSON parsers accept) is refused by name."""
    rank = config.get("r")
    if isinstance(rank, float) and rank.is_integer():
        rank = int(rank)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise AdapterIncompatible(
            f"{path}: adapter_config.json needs a positive integer rank r, got {rank!r}"
        )
    alpha = config.get("lora_alpha", 8)  # PEFT's LoraConfig default
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise AdapterIncompatible(
            f"{path}: adapter_config.json needs a finite number lora_alpha, got {alpha!r}"
        )
    use_rslora = config.get("use_rslora") or False
    if not isinstance(use_rslora, bool):
        raise AdapterIncompatible(
            f"{path}: adapter_config.json needs use_rslora true or false, got {use_rslora!r}"
        )
    return rank, float(alpha), use_rslora


def _build(
    path: str, config: dict, tensors: dict[str, torch.Tensor], spec: ModelSpec
) -> AdapterWeights:
    pairs = _pairs(path, tensors, spec)
    rank, alpha, use_rslora = _scaling(path, config)
    scale = alpha / (math.sqrt(rank) if use_rslora else rank)
    weights: LoraWeights = {}
    modules = sorted({mod for _, mod in pairs})
    for (layer, module), ab in sorted(pairs.items()):
        weights[(layer, module)] = _checked_pair(path, layer, module, ab, rank, scale, spec)
    _check_every_layer(path, modules, weights, spec)
    content_hash, nbytes = _content_hash(rank, alpha, use_rslora, weights)
    return AdapterWeights(
        rank=rank,
        alpha=alpha,
        use_rslora=use_rslora,
        target_modules=modules,
        weights=weights,
        content_hash=content_hash,
        nbytes=nbytes,
    )


def _pairs(
    path: str, tensors: dict[str, torch.Tensor], spec: ModelSpec
) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """(layer, module) -> {"A": lora_A, "B": lora_B}; any other tensor is refused."""
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterIncompatible(
                f"{path}: tensor {key!r} is not a LoRA A/B matrix of a supported module "
                f"({', '.join(LINEAR_MODULES)})"
            )
        layer, module, which = int(m.group(1)), m.group(2), m.group(3)
        if layer >= spec.num_layers:
            raise AdapterIncompatible(
                f"{path}: {key} targets layer {layer}, base model has {spec.num_layers} layers"
            )
        pairs.setdefault((layer, module), {})[which] = tensor
    if not pairs:
        raise AdapterIncompatible(f"{path}: adapter_model.safetensors holds no LoRA weights")
    return pairs


def _checked_pair(
    path: str,
    layer: int,
    module: str,
    ab: dict[str, torch.Tensor],
    rank: int,
    scale: float,
    spec: ModelSpec,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one module, both present, shaped for the base model and finite
    (B also once scaled)."""
    if set(ab) != {"A", "B"}:
        raise AdapterIncompatible(f"{path}: layer {layer} {module} lacks lora_A or lora_B")
    a, b = ab["A"], ab["B"]
    fan_in, fan_out = spec.module_shape(module)
    if tuple(a.shape) != (rank, fan_in) or tuple(b.shape) != (fan_out, rank):
        raise AdapterIncompatible(
            f"{path}: layer {layer} {module}: lora_A {tuple(a.shape)} / lora_B "
            f"{tuple(b.shape)} do not fit the base model, which needs "
            f"({rank}, {fan_in}) / ({fan_out}, {rank}) for rank {rank}"
        )
    # B scaled is finite only where B is (the scale is finite): one pass over B
    if not (torch.isfinite(a).all() and torch.isfinite(b.float() * scale).all()):
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterIncompatible(f"{path}: layer {layer} {module} holds NaN or inf")
        raise AdapterIncompatible(
            f"{path}: layer {layer} {module}: lora_B times the scale {scale:g} overflows"
        )
    return a, b


def _check_every_layer(
    path: str,
    modules: list[str],
    weights: LoraWeights,
    spec: ModelSpec,
) -> None:
    for module in modules:
        missing = [i for i in range(spec.num_layers) if (i, module) not in weights]
        if missing:
            raise AdapterIncompatible(
                f"{path}: {module} is adapted in some layers but not in {missing[:4]}; "
                "adapters must cover every layer of a module they target"
            )


def _content_hash(
    rank: int,
    alpha: float,
    use_rslora: bool,
    weights: LoraWeights,
) -> tuple[str, int]:
    """(xxhash of the config values that matter and every tensor byte, bytes
    hashed): the adapter's identity whatever it is called."""
    h = xxhash.xxh3_128()
    h.update(json.dumps([rank, alpha, use_rslora]).encode())
    nbytes = 0
    for key in sorted(weights):
        for t in weights[key]:
            raw = t.contiguous().view(torch.uint8).numpy().tobytes()
            h.update(raw)
            nbytes += len(raw)
    return h.hexdigest(), nbytes
