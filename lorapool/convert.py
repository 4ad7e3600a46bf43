"""Conversions between lorapool.v1 messages and the engine's plain dataclasses.

Both ends use them: the service turns requests into `GenerationRequest` and
engine results into replies; the client turns replies back into the same
dataclasses. Keeping both directions here keeps the wire format in one place and
lets a round trip be tested without an engine. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2

from lorapool.errors import InvalidRequest, LoraPoolError
from lorapool.types import (
    AdapterInfo,
    AdapterState,
    EngineStats,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
    Usage,
)
from lorapool.v1 import lorapool_pb2 as pb

ERROR_DOMAIN = "lorapool"
STATUS_DETAILS_KEY = "grpc-status-details-bin"

_DEFAULTS = SamplingParams()


# -- results the client returns that have no engine dataclass ------------------------------


@dataclass
class Completion:
    """A whole generation, as Complete returns it."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage
    logprobs: list[TokenLogprob] = field(default_factory=list)
    request_id: str = ""


@dataclass
class Tokenized:
    token_ids: list[int]
    tokens: list[str] = field(default_factory=list)


@dataclass
class ModelInfo:
    """Mirrors GetModelInfoResponse; the engine reports it as a dict of these keys."""

    model_name: str = ""
    model_path: str = ""
    architecture: str = ""
    vocab_size: int = 0
    max_model_len: int = 0
    hidden_size: int = 0
    num_layers: int = 0
    eos_token_id: int = -1
    dtype: str = ""
    device: str = ""
    page_bytes: int = 0
    total_pages: int = 0
    block_size: int = 0
    max_new_tokens_limit: int = 0


# -- sampling and requests -------------------------------------------------------------------


def params_to_proto(params: SamplingParams) -> pb.SamplingParams:
    """Every field is written, so the server's defaults never apply by accident."""
    msg = pb.SamplingParams(
        max_new_tokens=params.max_new_tokens,
        stop=params.stop,
        stop_token_ids=params.stop_token_ids,
        ignore_eos=params.ignore_eos,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        repetition_penalty=params.repetition_penalty,
        logprobs=params.logprobs,
    )
    if params.seed is not None:
        msg.seed = params.seed
    return msg


def params_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """Unset fields take the documented defaults. Range checks stay with the engine."""
    return SamplingParams(
        max_new_tokens=msg.max_new_tokens or _DEFAULTS.max_new_tokens,
        temperature=msg.temperature if msg.HasField("temperature") else _DEFAULTS.temperature,
        top_p=msg.top_p if msg.HasField("top_p") else _DEFAULTS.top_p,
        top_k=msg.top_k,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=list(msg.stop),
        stop_token_ids=list(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        repetition_penalty=(
            msg.repetition_penalty
            if msg.HasField("repetition_penalty")
            else _DEFAULTS.repetition_penalty
        ),
        logprobs=msg.logprobs,
    )


def request_from_proto(
    msg: pb.GenerateRequest | pb.CompleteRequest, request_id: str = ""
) -> GenerationRequest:
    """`request_id` is used when the caller sent none. Raises InvalidRequest when
    none of prompt, input_ids and chat is set. A chat's messages are passed on as
    the wire holds them (walking a huge list here would stall the event loop; the
    engine bounds its length first, then reads it off the loop)."""
    which = msg.WhichOneof("input")
    if which is None:
        raise InvalidRequest("set one input: prompt or input_ids or chat", field="input")
    return GenerationRequest(
        request_id=msg.request_id or request_id,
        prompt=msg.prompt if which == "prompt" else None,
        input_ids=list(msg.input_ids.ids) if which == "input_ids" else None,
        chat=msg.chat.messages if which == "chat" else None,
        adapter_id=msg.adapter_id,
        params=params_from_proto(msg.params),
        priority=msg.priority,
    )


# -- generation results ----------------------------------------------------------------------


def _logprobs_to_proto(items: Iterable[TokenLogprob]) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top=[pb.TopLogprob(token_id=t, logprob=p) for t, p in lp.top],
        )
        for lp in items
    ]


def _logprobs_from_proto(items: Iterable[pb.TokenLogprob]) -> list[TokenLogprob]:
    return [
        TokenLogprob(lp.token_id, lp.logprob, [(t.token_id, t.logprob) for t in lp.top])
        for lp in items
    ]


def usage_to_proto(usage: Usage) -> pb.Usage:
    return pb.Usage(**dataclasses.asdict(usage))


def usage_from_proto(msg: pb.Usage) -> Usage:
    return Usage(**{f.name: getattr(msg, f.name) for f in dataclasses.fields(Usage)})


def event_to_proto(event: TokenEvent, request_id: str = "") -> pb.GenerateResponse:
    """request_id is written on the last event only, with usage."""
    msg = pb.GenerateResponse(
        token_ids=event.token_ids,
        text=event.text,
        logprobs=_logprobs_to_proto(event.logprobs),
        finish_reason=int(event.finish_reason),
    )
    if event.finish_reason != FinishReason.NONE:
        msg.request_id = request_id
        msg.usage.CopyFrom(usage_to_proto(event.usage or Usage()))
    return msg


def event_from_proto(msg: pb.GenerateResponse) -> TokenEvent:
    return TokenEvent(
        token_ids=list(msg.token_ids),
        text=msg.text,
        logprobs=_logprobs_from_proto(msg.logprobs),
        finish_reason=FinishReason(msg.finish_reason),
        usage=usage_from_proto(msg.usage) if msg.HasField("usage") else None,
        request_id=msg.request_id,
    )


def events_to_complete(events: Iterable[TokenEvent], request_id: str = "") -> pb.CompleteResponse:
    """Join a finished event stream into one Complete reply."""
    msg = pb.CompleteResponse(request_id=request_id)
    text: list[str] = []
    for event in events:
        msg.token_ids.extend(event.token_ids)
        msg.logprobs.extend(_logprobs_to_proto(event.logprobs))
        text.append(event.text)
        if event.finish_reason != FinishReason.NONE:
            msg.finish_reason = int(event.finish_reason)
            msg.usage.CopyFrom(usage_to_proto(event.usage or Usage()))
    msg.text = "".join(text)
    return msg


def completion_from_proto(msg: pb.CompleteResponse) -> Completion:
    return Completion(
        text=msg.text,
        token_ids=list(msg.token_ids),
        finish_reason=FinishReason(msg.finish_reason),
        usage=usage_from_proto(msg.usage),
        logprobs=_logprobs_from_proto(msg.logprobs),
        request_id=msg.request_id,
    )


# -- adapters, stats, model ------------------------------------------------------------------


def adapter_info_to_proto(info: AdapterInfo) -> pb.AdapterInfo:
    fields = dataclasses.asdict(info)
    fields["state"] = int(info.state)
    return pb.AdapterInfo(**fields)


def adapter_info_from_proto(msg: pb.AdapterInfo) -> AdapterInfo:
    values = {f.name: getattr(msg, f.name) for f in dataclasses.fields(AdapterInfo)}
    values["state"] = AdapterState(msg.state)
    values["target_modules"] = list(msg.target_modules)
    return AdapterInfo(**values)


def stats_to_proto(stats: EngineStats) -> pb.GetStatsResponse:
    return pb.GetStatsResponse(**dataclasses.asdict(stats))


def stats_from_proto(msg: pb.GetStatsResponse) -> EngineStats:
    return EngineStats(**{f.name: getattr(msg, f.name) for f in dataclasses.fields(EngineStats)})


def model_info_to_proto(info: ModelInfo | Mapping[str, Any]) -> pb.GetModelInfoResponse:
    """Accepts the engine's dict; keys the proto does not know are skipped, so the
    engine may report more than the wire carries."""
    values = dataclasses.asdict(info) if isinstance(info, ModelInfo) else dict(info)
    known = {f.name for f in dataclasses.fields(ModelInfo)}
    return pb.GetModelInfoResponse(**{k: v for k, v in values.items() if k in known})


def model_info_from_proto(msg: pb.GetModelInfoResponse) -> ModelInfo:
    return ModelInfo(**{f.name: getattr(msg, f.name) for f in dataclasses.fields(ModelInfo)})


# -- errors ----------------------------------------------------------------------------------


def error_status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    metadata: Mapping[str, str] | None = None,
    field: str = "",
) -> tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...]]:
    """(code, details, trailing_metadata) for `context.abort(*error_status(...))`,
    with a google.rpc.ErrorInfo carrying `reason` and `metadata` in the rich
    details, and a google.rpc.BadRequest naming `field` when one is at fault."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata or {})
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    status.details.add().Pack(info)
    if field:
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    return code, message, ((STATUS_DETAILS_KEY, status.SerializeToString()),)


def status_for_error(exc: LoraPoolError) -> tuple[grpc.StatusCode, str, tuple]:
    """The status a typed engine error maps to (see lorapool.errors)."""
    return error_status(
        grpc.StatusCode[exc.status],
        str(exc) or exc.reason,
        exc.reason,
        getattr(exc, "metadata", None),
        getattr(exc, "field", ""),
    )


def error_info(trailing_metadata: Iterable[tuple[str, Any]] | None) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo in a failed call's trailers; an empty one when there is none."""
    return _detail(trailing_metadata, error_details_pb2.ErrorInfo)


def bad_request(
    trailing_metadata: Iterable[tuple[str, Any]] | None,
) -> error_details_pb2.BadRequest:
    """The BadRequest (field violations) in a failed call's trailers, or an empty one."""
    return _detail(trailing_metadata, error_details_pb2.BadRequest)


def _detail(trailing_metadata, kind):
    for key, value in trailing_metadata or ():
        if key != STATUS_DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(kind.DESCRIPTOR):
                found = kind()
                detail.Unpack(found)
                return found
    return kind()
