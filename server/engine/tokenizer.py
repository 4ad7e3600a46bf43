"""The tokenizer of a checkpoint, optional: a checkpoint without tokenizer files is
served for token-id requests only (prompts and stop strings are then refused with
FAILED_PRECONDITION), and another directory's tokenizer can be named instead. Chat
requests are rendered with the tokenizer's chat template, as transformers does."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lorapool.errors import InvalidRequest, NoChatTemplate

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


def check_chat_template(tokenizer: Any) -> None:
    """Raise NoChatTemplate unless the tokenizer has a chat template to render with."""
    try:
        tokenizer.get_chat_template()
    except ValueError:
        raise NoChatTemplate(
            "this model's tokenizer has no chat template, so a chat cannot be rendered; "
            "send a prompt written in the model's format instead",
            field="chat",
        ) from None


def chat_template_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The token ids of messages rendered with the tokenizer's chat template, the
    generation prompt added: exactly transformers' `apply_chat_template(messages,
    add_generation_prompt=True, tokenize=True)`. A template that raises (roles must
    alternate, no system role, ...) refuses this conversation: InvalidRequest with
    the template's own message. Runs on the tokenizer thread."""
    from jinja2 import TemplateSyntaxError

    try:
        encoded = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
    except TemplateSyntaxError as exc:
        raise NoChatTemplate(
            f"this model's chat template does not compile ({_cut(exc)}); send a prompt "
            "written in the model's format instead",
            field="chat",
        ) from None
    except Exception as exc:  # whatever the template raises is about this conversation
        raise InvalidRequest(
            f"the model's chat template refused this chat: {_cut(exc)}", field="chat"
        ) from None
    ids = list(encoded["input_ids"])
    if not ids:
        raise InvalidRequest(
            "the model's chat template rendered this chat as no tokens", field="chat"
        )
    return ids


def _cut(exc: BaseException, limit: int = 300) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."
