"""Generate and Complete request messages from the clients' arguments: typed
sampling options (a SamplingParams, or keyword arguments sending only what is
given, so the server's documented defaults apply to the rest)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
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


def generation_request(
    message: type[pb.GenerateRequest] | type[pb.CompleteRequest],
    prompt: str | None,
    input_ids: Sequence[int] | None,
    adapter_id: str,
    request_id: str,
    priority: int,
    sampling: dict[str, Any],
    params: SamplingParams | None = None,
) -> Any:
    """Build a Generate/Complete request. `sampling` holds SamplingParams field
    names; only those given (and not None) are sent, so the server's documented
    defaults apply to the rest. `params`, when given, is sent whole (every field),
    with the `sampling` entries overriding its fields."""
    if (prompt is None) == (input_ids is None):
        raise ValueError("pass exactly one of prompt or input_ids")
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
    else:
        msg.prompt = prompt
    return msg
