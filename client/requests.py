"""Generate, Complete and Tokenize request messages from the clients' arguments:
the input (a prompt, token ids, or a chat of {"role", "content"} messages) and
typed sampling options (a SamplingParams, or keyword arguments sending only what
is given, so the server's documented defaults apply to the rest)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

from lorapool.convert import params_to_proto
from lorapool.types import SamplingParams
from lorapool.v1 import lorapool_pb2 as pb


class SamplingKwargs(TypedDict, total=False):
    """The sampling keyword arguments of generate/complete: SamplingParams' fields.
    None (like leaving one out) takes the server's default."""

    max_new_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: Sequence[str] | None
    stop_token_ids: Sequence[int] | None
    ignore_eos: bool | None
    repetition_penalty: float | None
    logprobs: int | None


# One chat turn: {"role": "user", "content": "..."} or a lorapool.v1 ChatMessage.
ChatMessageLike = Mapping[str, str] | pb.ChatMessage


def chat_to_proto(chat: Sequence[ChatMessageLike] | pb.Chat) -> pb.Chat:
    """The wire's Chat for a list of {"role", "content"} dicts (the shape
    transformers' chat templates take) or ChatMessage messages. Keys other than
    role and content are refused rather than dropped unsent; the server checks
    the roles and renders the messages with the model's chat template."""
    if isinstance(chat, pb.Chat):
        return chat
    if isinstance(chat, str | bytes) or not isinstance(chat, Sequence):
        raise TypeError(
            "chat is a list of messages, e.g. [{'role': 'user', 'content': 'Hi'}], "
            f"not {type(chat).__name__}"
        )
    wire = pb.Chat()
    for i, message in enumerate(chat):
        if isinstance(message, pb.ChatMessage):
            wire.messages.append(message)
            continue
        if not isinstance(message, Mapping):
            raise TypeError(
                f"chat[{i}] must be a {{'role', 'content'}} dict or a ChatMessage, "
                f"not {type(message).__name__}"
            )
        extra = set(message) - {"role", "content"}
        if extra:
            raise ValueError(f"chat[{i}] has keys the API does not carry: {sorted(extra)}")
        role, content = message.get("role"), message.get("content", "")
        if not isinstance(role, str) or not isinstance(content, str):
            raise TypeError(f"chat[{i}] needs a string 'role' and a string 'content'")
        wire.messages.add(role=role, content=content)
    return wire


def generation_request(
    message: type[pb.GenerateRequest] | type[pb.CompleteRequest],
    prompt: str | None,
    input_ids: Sequence[int] | None,
    adapter_id: str,
    request_id: str,
    priority: int,
    sampling: dict[str, Any],
    params: SamplingParams | None = None,
    *,
    chat: Sequence[ChatMessageLike] | pb.Chat | None = None,
) -> Any:
    """Build a Generate/Complete request from exactly one input: prompt,
    input_ids or chat. `sampling` holds SamplingParams field names; only those
    given (and not None) are sent, so the server's documented defaults apply to
    the rest. `params`, when given, is sent whole (every field), with the
    `sampling` entries overriding its fields."""
    if sum(x is not None for x in (prompt, input_ids, chat)) != 1:
        raise ValueError("pass exactly one of prompt, input_ids or chat")
    if params is not None and not isinstance(params, SamplingParams):
        raise TypeError(f"sampling must be a SamplingParams, not {type(params).__name__}")
    known = {f for f in SamplingParams.__dataclass_fields__}
    unknown = set(sampling) - known
    if unknown:
        raise TypeError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
    given = {k: v for k, v in sampling.items() if v is not None}
    if params is None:
        wire = pb.SamplingParams(**given)
    else:
        wire = params_to_proto(dataclasses.replace(params, **given))
    msg = message(request_id=request_id, adapter_id=adapter_id, priority=priority, params=wire)
    if input_ids is not None:
        msg.input_ids.SetInParent()  # an empty list still selects input_ids
        msg.input_ids.ids.extend(input_ids)
    elif chat is not None:
        msg.chat.CopyFrom(chat_to_proto(chat))  # an empty chat still selects chat
    else:
        msg.prompt = prompt
    return msg


def tokenize_request(
    text: str | None, chat: Sequence[ChatMessageLike] | pb.Chat | None, return_tokens: bool
) -> pb.TokenizeRequest:
    """A Tokenize request for exactly one of text or chat (rendered by the server
    as Generate renders it)."""
    if (text is None) == (chat is None):
        raise ValueError("pass exactly one of text or chat")
    msg = pb.TokenizeRequest(text=text or "", return_tokens=return_tokens)
    if chat is not None:
        msg.chat.CopyFrom(chat_to_proto(chat))
    return msg
