"""Load a Llama-family checkpoint (Llama, Mistral, Qwen2) from a Hugging Face
directory: config.json through transformers' config classes, weights from
model.safetensors or shards listed in model.safetensors.index.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig

from lorapool import progress
from lorapool.errors import LoraPoolError
from lorapool.memory.sources import hub_snapshot, parse_hub_id
from lorapool.spec import ModelSpec

SUPPORTED_ARCHS = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}
UNSUPPORTED_ROPE = {"dynamic", "longrope"}
_GET = "pass --model a Hugging Face checkpoint folder (config.json and model.safetensors)"


class CheckpointError(LoraPoolError, ValueError):
    """The checkpoint folder cannot be served; the message says what is wrong and
    what to do, in one line."""

    status = "FAILED_PRECONDITION"
    reason = "BAD_CHECKPOINT"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{path} is not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg}); "
            f"restore the {what} from the original checkpoint"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {path} ({_one_line(exc)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; restore the {what}")
    return data


# What a served checkpoint needs from a Hub repo (weights in safetensors only).
HUB_MODEL_FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
]


def resolve_model_dir(model: str | Path) -> Path:
    """A checkpoint folder, or a Hugging Face Hub id `org/name[@revision]` resolved
    through huggingface_hub's cache (downloaded if missing; an unreachable hub fails
    fast with one line). An existing local path always wins over a Hub id."""
    path = Path(model).expanduser()
    parsed = None if path.exists() else parse_hub_id(str(model))
    if parsed is None:
        return path
    repo, revision = parsed
    try:
        return hub_snapshot(repo, revision, allow_patterns=HUB_MODEL_FILES)
    except LookupError as exc:
        raise CheckpointError(
            f"{model} is neither a local folder nor a model on the Hugging Face Hub ({exc})"
        ) from exc
    except ConnectionError as exc:
        raise CheckpointError(
            f"{model} is not a local folder, and as a Hugging Face Hub id: {exc}; download "
            "it first (huggingface-cli download) or pass a local checkpoint folder"
        ) from exc


def check_model_dir(model_dir: str | Path) -> list[Path]:
    """Check a checkpoint folder before anything large is loaded: the folder, a
    readable config.json naming a supported architecture, and safetensors weights
    whose headers open (single file or every shard of the index). Returns the weight
    files; raises CheckpointError naming the problem and the fix."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise CheckpointError(f"model folder {model_dir} does not exist; {_GET}")
    if not model_dir.is_dir():
        raise CheckpointError(f"model path {model_dir} is not a folder; {_GET}")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json; {_GET}")
    config = _read_json(config_path, "config.json")
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not set(map(str, archs)) & SUPPORTED_ARCHS:
        raise CheckpointError(
            f"{config_path}: architecture {archs or config.get('model_type', '?')} is not "
            f"supported; supported: {', '.join(sorted(SUPPORTED_ARCHS))}"
        )
    files = _weight_files(model_dir)
    for path in files:
        if not path.is_file():
            raise CheckpointError(
                f"{model_dir}: weight shard {path.name} named by model.safetensors.index.json "
                "is missing; download the complete checkpoint"
            )
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as exc:  # SafetensorError and OS errors: a broken or partial file
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({_one_line(exc)}); download it again"
            ) from None
    return files


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index, "weight index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map; restore the weight index")
        names = sorted({str(v) for v in weight_map.values()})
        if any(Path(name).name != name for name in names):
            raise CheckpointError(f"{index}: shard names must be plain file names")
        return [model_dir / name for name in names]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    if any(model_dir.glob("pytorch_model*.bin")):
        raise CheckpointError(
            f"{model_dir} has only pickle weights (pytorch_model*.bin), which are not loaded; "
            "convert them to model.safetensors"
        )
    raise CheckpointError(
        f"{model_dir} has no weights (model.safetensors or model.safetensors.index.json); "
        "download the complete checkpoint"
    )


def load_spec(model_dir: str | Path) -> ModelSpec:
    check_model_dir(model_dir)
    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except (ValueError, OSError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{model_dir}/config.json cannot be read by transformers ({_one_line(exc)}); "
            "restore it from the original checkpoint"
        ) from None
    archs = set(getattr(config, "architectures", None) or [])
    if not archs & SUPPORTED_ARCHS:
        raise CheckpointError(
            f"{model_dir}: architecture {sorted(archs) or config.model_type} is not supported; "
            f"supported: {sorted(SUPPORTED_ARCHS)}"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") in UNSUPPORTED_ROPE:
        raise CheckpointError(f"{model_dir}: rope_type {rope['rope_type']!r} is not supported")
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
    """Every tensor of the checkpoint, shard after shard, with a progress bar over
    the tensors on stderr when someone watches (lorapool.progress: a terminal, or
    LORAPOOL_PROGRESS=1)."""
    tensors: dict[str, torch.Tensor] = {}
    files = checkpoint_files(model_dir)
    total = 0
    for path in files:  # headers only: the bar's total
        with safe_open(str(path), framework="pt") as f:
            total += len(f.keys())
    with progress.bar(total, f"loading {Path(model_dir).name}", "tensor") as shown:
        for path in files:
            shown.set_postfix_str(path.name, refresh=False)
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
                    shown.update()
    return tensors
