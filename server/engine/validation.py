"""Request validation at the door: every value a request sends is checked before
the request reaches the scheduler, so that no row can fail another row's step
and a message says what to fix (InvalidRequest -> INVALID_ARGUMENT)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lorapool.errors import InvalidRequest
from lorapool.types import GenerationRequest

# Temperatures below this sample as greedy: dividing logits by them overflows.
GREEDY_BELOW = 1e-5
MAX_STOP_TOKEN_IDS = 1024
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1024
# Roles a chat message may have (a template may still refuse one, e.g. "system").
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_model_len: int
    max_prompt_chars: int  # a longer prompt can never fit the context
    max_new_tokens: int
    max_logprobs: int
    block_size: int
    total_pages: int

    @classmethod
    def for_model(cls, vocab_size: int, max_model_len: int, vocab: Iterable[str], **limits):
        """No token spans more characters than the longest vocabulary entry, so a
        prompt longer than max_model_len such entries (doubled, for byte-level
        tokenizers' escapes) can never fit the context: it is refused without
        tokenizing it (which would stall every stream for a huge prompt)."""
        longest = max((len(t) for t in vocab), default=1)
        return cls(vocab_size, max_model_len, 2 * longest * max_model_len, **limits)


# Adapter ids: 1 to 256 characters from a charset that is safe in paths, URLs,
# metric labels and log lines (Hugging Face style "org/name" included).
ADAPTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+/-]{0,255}")


def check_adapter_id(adapter_id: str, required: bool = False) -> None:
    """ "" is the base model where an adapter is optional."""
    if not adapter_id and not required:
        return
    if not ADAPTER_ID.fullmatch(adapter_id):
        shown = adapter_id[:40].encode("unicode_escape").decode()
        raise InvalidRequest(
            f"adapter_id {shown!r}{'...' if len(adapter_id) > 40 else ''} is not valid: use 1 "
            "to 256 characters, letters, digits and . _ : @ + / -, starting with a letter "
            "or digit",
            field="adapter_id",
        )


class RequestValidator:
    def __init__(self, limits: Limits):
        self.limits = limits

    def input_ids(self, request: GenerationRequest) -> list[int] | None:
        """The request's validated input_ids, or None when its prompt (checked for
        length: a huge prompt is refused before it is tokenized) must be tokenized.
        Length bounds come first, so nothing scans or tokenizes a hostile size."""
        lim = self.limits
        if request.chat is not None:
            self.check_chat_length(request.chat)
            return None
        if len(request.input_ids or ()) > lim.max_model_len:
            raise InvalidRequest(
                f"input_ids has {len(request.input_ids)} tokens; the context holds "
                f"{lim.max_model_len}",
                field="input_ids",
            )
        if request.input_ids is not None:
            if not request.input_ids:  # e.g. a bare list where the TokenIds wrapper goes
                raise InvalidRequest(
                    "input_ids.ids is empty: send at least one token id, inside the "
                    "TokenIds wrapper: input_ids: {ids: [...]}",
                    field="input_ids.ids",
                )
            ids = list(request.input_ids)
            bad = [t for t in ids if not 0 <= t < lim.vocab_size]
            if bad:
                raise InvalidRequest(
                    f"input_ids {bad[:4]} are outside the vocabulary [0, {lim.vocab_size})",
                    field="input_ids",
                )
            return ids
        if not request.prompt:
            raise InvalidRequest(
                "empty prompt: set a non-empty prompt or input_ids", field="prompt"
            )
        self.check_text(request.prompt, "prompt")
        return None

    def check_text(self, text: str, what: str) -> None:
        """Text longer than max_prompt_chars can never fit the context."""
        if len(text) > self.limits.max_prompt_chars:
            raise InvalidRequest(
                f"{what} of {len(text)} characters is longer than the context of "
                f"{self.limits.max_model_len} tokens can hold; shorten it",
                field=what,
            )

    def check_chat_length(self, chat: Sequence[Any]) -> None:
        """A chat has at least one message and no more than the context has tokens
        (a template writes every turn as one token at least). Only the count is
        read, so a conversation of any size is refused at once, on the event loop."""
        if not chat:
            raise InvalidRequest("chat has no messages; send at least one", field="chat.messages")
        if len(chat) > self.limits.max_model_len:
            raise InvalidRequest(
                f"chat has {len(chat)} messages; the context of {self.limits.max_model_len} "
                "tokens cannot hold that many turns",
                field="chat.messages",
            )

    def chat_messages(self, chat: Sequence[Any]) -> list[dict[str, str]]:
        """The conversation as chat templates take it, {"role", "content"} dicts,
        checked: every role one of CHAT_ROLES, and all contents together no longer
        than a prompt may be. Walks every message, so it runs off the event loop,
        after check_chat_length has bounded their number."""
        messages, chars = [], 0
        for i, message in enumerate(chat):
            role, content = _role_and_content(message, i)
            if role not in CHAT_ROLES:
                raise InvalidRequest(
                    f"chat.messages[{i}].role {_shown(role)} is not one of {', '.join(CHAT_ROLES)}",
                    field=f"chat.messages[{i}].role",
                )
            chars += len(content)
            if chars > self.limits.max_prompt_chars:
                raise InvalidRequest(
                    f"the chat's messages hold more than {self.limits.max_prompt_chars} "
                    f"characters, more than the context of {self.limits.max_model_len} tokens "
                    "can hold; shorten them",
                    field="chat.messages",
                )
            messages.append({"role": role, "content": content})
        return messages

    def check(self, request: GenerationRequest, ids: list[int]) -> None:
        """Sampling values and the request's size against the context and the pool."""
        lim, p = self.limits, request.params
        if not 1 <= p.max_new_tokens <= lim.max_new_tokens:
            raise InvalidRequest(
                f"max_new_tokens must be in [1, {lim.max_new_tokens}], got {p.max_new_tokens}",
                field="params.max_new_tokens",
            )
        if not (math.isfinite(p.temperature) and p.temperature >= 0):
            raise InvalidRequest(
                f"temperature must be a finite number >= 0, got {p.temperature}",
                field="params.temperature",
            )
        if p.temperature < GREEDY_BELOW:
            p.temperature = 0.0  # a vanishing temperature is greedy (and would overflow)
        if not 0 < p.top_p <= 1:  # also refuses NaN
            raise InvalidRequest(f"top_p must be in (0, 1], got {p.top_p}", field="params.top_p")
        if p.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {p.top_k}", field="params.top_k")
        if not (math.isfinite(p.repetition_penalty) and p.repetition_penalty > 0):
            raise InvalidRequest(
                f"repetition_penalty must be a finite number > 0, got {p.repetition_penalty}",
                field="params.repetition_penalty",
            )
        if not 0 <= p.logprobs <= lim.max_logprobs:
            raise InvalidRequest(
                f"logprobs must be in [0, {lim.max_logprobs}]", field="params.logprobs"
            )
        if len(p.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequest(
                f"stop_token_ids has {len(p.stop_token_ids)} entries; at most "
                f"{MAX_STOP_TOKEN_IDS} are accepted",
                field="params.stop_token_ids",
            )
        if len(p.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in p.stop):
            raise InvalidRequest(
                f"stop accepts at most {MAX_STOP_STRINGS} strings of at most "
                f"{MAX_STOP_CHARS} characters each",
                field="params.stop",
            )
        total = len(ids) + p.max_new_tokens
        if total > lim.max_model_len:
            raise InvalidRequest(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({p.max_new_tokens}) exceeds the "
                f"context of {lim.max_model_len} tokens; shorten the prompt or max_new_tokens",
                field="params.max_new_tokens",
            )
        if -(-total // lim.block_size) > lim.total_pages:
            raise InvalidRequest(
                f"prompt + max_new_tokens ({total} tokens) can never fit the pool "
                f"({lim.total_pages} pages of {lim.block_size} tokens)",
                field="params.max_new_tokens",
            )


def _role_and_content(message: Any, i: int) -> tuple[str, str]:
    """A message's role and content: a mapping's keys, or a ChatMessage's fields."""
    if isinstance(message, Mapping):
        role, content = message.get("role"), message.get("content")
    else:
        role, content = getattr(message, "role", None), getattr(message, "content", None)
    if not isinstance(role, str) or not isinstance(content, str):
        raise InvalidRequest(
            f"chat.messages[{i}] needs a role and a content, both strings",
            field=f"chat.messages[{i}]",
        )
    return role, content


def _shown(value: str, limit: int = 40) -> str:
    """A client's string, quoted, escaped and cut, for an error message."""
    text = repr(value[:limit].encode("unicode_escape").decode("ascii"))
    return text + ("..." if len(value) > limit else "")
