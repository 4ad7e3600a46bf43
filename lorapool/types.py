"""Plain data passed between the service, the engine and the scheduler."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class FinishReason(enum.IntEnum):
    """Why a sequence stopped. Values match the proto enum."""

    NONE = 0  # not finished
    LENGTH = 1  # max_new_tokens reached
    STOP = 2  # a stop string or stop token id matched
    EOS = 3  # the model's end-of-sequence token
    CANCELLED = 4
    ERROR = 5


@dataclass
class SamplingParams:
    """temperature 0 means greedy. seed None means nondeterministic."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    logprobs: int = 0  # number of top alternatives to return per token; 0 = none


@dataclass
class GenerationRequest:
    """Exactly one of prompt / input_ids / chat is set. adapter_id "" is the base model.

    chat is a conversation the engine renders with the tokenizer's chat template:
    a sequence of {"role": ..., "content": ...} mappings, or of objects with `role`
    and `content` attributes (the wire's ChatMessage, kept as received so that a
    huge conversation is refused by its length before anything walks it)."""

    request_id: str
    prompt: str | None = None
    input_ids: list[int] | None = None
    adapter_id: str = ""
    params: SamplingParams = field(default_factory=SamplingParams)
    priority: int = 0  # higher runs first and is preempted last
    chat: Sequence[Any] | None = None


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    queue_ms: float = 0.0
    ttft_ms: float = 0.0


@dataclass
class TokenEvent:
    """One streamed increment. `text` is the new text only (never a broken UTF-8
    character). The last event has finish_reason != NONE and usage set.

    `request_id` is the id the server ran the request under (the caller's, or one
    the server picked), as the wire carries it: on the last event only, "" on the
    others. It identifies the request rather than being part of the increment, so
    it takes no part in ==."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason = FinishReason.NONE
    usage: Usage | None = None
    request_id: str = field(default="", compare=False)


class AdapterState(enum.IntEnum):
    UNKNOWN = 0
    KNOWN = 1  # a source knows it; no bytes in memory
    LOADING = 2
    HOST = 3  # weights in host memory
    DEVICE = 4  # weights in pool pages


@dataclass
class AdapterInfo:
    adapter_id: str
    state: AdapterState
    source: str = ""
    rank: int = 0
    alpha: float = 0.0
    target_modules: list[str] = field(default_factory=list)
    pages: int = 0
    bytes: int = 0
    content_hash: str = ""
    pinned: bool = False
    requests_served: int = 0
    running_requests: int = 0
    last_used: float = 0.0  # unix time
    load_ms: float = 0.0


@dataclass
class EngineStats:
    """Pool pages by owner: free + kv + cached + adapter == total, always."""

    total_pages: int = 0
    free_pages: int = 0
    kv_pages: int = 0
    cached_pages: int = 0
    adapter_pages: int = 0
    page_bytes: int = 0
    running_requests: int = 0
    waiting_requests: int = 0
    tokens_per_second: float = 0.0
    generated_tokens: int = 0
    steps: int = 0
    adapter_loads: int = 0
    adapter_evictions: int = 0
    preemptions: int = 0
    prefix_cache_hit_tokens: int = 0
    host_cache_bytes: int = 0
