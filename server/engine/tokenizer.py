"""The tokenizer of a checkpoint, optional: a checkpoint without tokenizer files is
served for token-id requests only (prompts and stop strings are then refused with
FAILED_PRECONDITION), and another directory's tokenizer can be named instead."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("lorapool.engine")

# Any of these in a directory means it holds a Hugging Face tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(directory: str | Path) -> bool:
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(model_dir: str | Path, tokenizer_dir: str | Path | None = None):
    """The tokenizer of tokenizer_dir (which must hold one), else of model_dir, else
    None when model_dir has no tokenizer files."""
    from transformers import AutoTokenizer

    if tokenizer_dir is not None:
        if not has_tokenizer(tokenizer_dir):
            raise ValueError(
                f"--tokenizer {tokenizer_dir}: no tokenizer files there "
                f"(expected one of {', '.join(TOKENIZER_FILES)})"
            )
        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if not has_tokenizer(model_dir):
        log.warning(
            "%s has no tokenizer: serving token-id requests only (--tokenizer PATH adds one)",
            Path(model_dir).name,
        )
        return None
    return AutoTokenizer.from_pretrained(str(model_dir))
