"""Typed clients for LoraPoolService: `LoraPoolClient` (blocking) and
`AsyncLoraPoolClient` (grpc.aio). Both return the engine's plain dataclasses and
raise `LoraPoolClientError` instead of grpc.RpcError.

Retries are left to gRPC's own retry policy (service config), limited to calls
that are safe to repeat: the read-only unary calls and Generate. gRPC commits a
streaming call when the first response arrives, so Generate is retried only
while nothing came back yet. Complete, LoadAdapter and UnloadAdapter are never
retried: a repeated Complete would redo the whole generation.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lorapool.convert import (
    Completion,
    ModelInfo,
    Tokenized,
    adapter_info_from_proto,
    completion_from_proto,
    error_info,
    event_from_proto,
    model_info_from_proto,
    stats_from_proto,
)
from lorapool.types import AdapterInfo, EngineStats, SamplingParams, TokenEvent
from lorapool.v1 import lorapool_pb2 as pb
from lorapool.v1 import lorapool_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT_S = 120.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVICE = "lorapool.v1.LoraPoolService"
RETRIED_METHODS = ("GetStats", "ListAdapters", "GetModelInfo", "Tokenize", "Generate")


class LoraPoolClientError(Exception):
    """A failed call: the gRPC status code, its message, and the machine-readable
    reason from the google.rpc.ErrorInfo detail ("" when the server sent none,
    e.g. a deadline that expired on the client)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        reason: str = "",
        metadata: dict[str, str] | None = None,
    ):
        self.code = code
        self.details = details
        self.reason = reason
        self.metadata = metadata or {}
        super().__init__(str(self))

    def __str__(self) -> str:
        suffix = f" [{self.reason}]" if self.reason else ""
        return f"{self.code.name}: {self.details}{suffix}"

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> LoraPoolClientError:
        call: Any = err  # RpcError raised by a call is also a grpc.Call
        info = error_info(call.trailing_metadata())
        return cls(call.code(), call.details() or "", info.reason, dict(info.metadata))


def service_config(retries: int) -> str:
    """gRPC service config JSON that retries UNAVAILABLE on the safe methods."""
    if retries <= 0:
        return json.dumps({"methodConfig": []})
    names = [{"service": SERVICE, "method": m} for m in RETRIED_METHODS]
    names.append({"service": "grpc.health.v1.Health", "method": "Check"})
    policy = {
        "maxAttempts": min(retries + 1, 5),  # gRPC caps attempts at 5
        "initialBackoff": "0.1s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})


def channel_options(retries: int, max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.enable_retries", 1 if retries > 0 else 0),
        ("grpc.service_config", service_config(retries)),
    ]


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The key goes both as x-api-key and as a bearer token, so either check works."""
    if not api_key:
        return ()
    return (("x-api-key", api_key), ("authorization", f"Bearer {api_key}"))


def generation_request(
    message: type[pb.GenerateRequest] | type[pb.CompleteRequest],
    prompt: str | None,
    input_ids: Sequence[int] | None,
    adapter_id: str,
    request_id: str,
    priority: int,
    sampling: dict[str, Any],
) -> Any:
    """Build a Generate/Complete request. `sampling` holds SamplingParams field
    names; only those given are sent, so the server's documented defaults apply
    to the rest."""
    if (prompt is None) == (input_ids is None):
        raise ValueError("pass exactly one of prompt or input_ids")
    known = {f for f in SamplingParams.__dataclass_fields__}
    unknown = set(sampling) - known
    if unknown:
        raise TypeError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
    params = pb.SamplingParams(**{k: v for k, v in sampling.items() if v is not None})
    msg = message(request_id=request_id, adapter_id=adapter_id, priority=priority, params=params)
    if input_ids is not None:
        msg.input_ids.SetInParent()  # an empty list still selects input_ids
        msg.input_ids.ids.extend(input_ids)
    else:
        msg.prompt = prompt
    return msg


class _Settings:
    """What both clients share: target, credentials, metadata, deadlines."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        retries: int = 3,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        metadata: Sequence[tuple[str, str]] = (),
    ):
        self.target = target
        self.timeout = timeout
        self.metadata = auth_metadata(api_key) + tuple(metadata)
        self.options = channel_options(retries, max_message_bytes)
        self.credentials = (
            grpc.ssl_channel_credentials(root_certificates)
            if tls or root_certificates is not None
            else None
        )

    def deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout


class LoraPoolClient(_Settings):
    """Blocking client. `timeout` is the default deadline in seconds for every
    call (None: no deadline); each method takes its own `timeout` too."""

    def __init__(self, target: str = DEFAULT_TARGET, **kwargs: Any):
        super().__init__(target, **kwargs)
        if self.credentials is None:
            self.channel = grpc.insecure_channel(target, options=self.options)
        else:
            self.channel = grpc.secure_channel(target, self.credentials, options=self.options)
        self.stub = pb_grpc.LoraPoolServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> LoraPoolClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=self.deadline(timeout), metadata=self.metadata)
        except grpc.RpcError as err:
            raise LoraPoolClientError.from_rpc_error(err) from None

    def generate(
        self,
        prompt: str | None = None,
        *,
        input_ids: Sequence[int] | None = None,
        adapter_id: str = "",
        request_id: str = "",
        priority: int = 0,
        timeout: float | None = None,
        **sampling: Any,
    ) -> Iterator[TokenEvent]:
        """Yield TokenEvents as the server streams them; the last one has
        finish_reason and usage. Stopping the iteration early cancels the call."""
        request = generation_request(
            pb.GenerateRequest, prompt, input_ids, adapter_id, request_id, priority, sampling
        )
        call = self.stub.Generate(request, timeout=self.deadline(timeout), metadata=self.metadata)
        return _stream(call)

    def complete(
        self,
        prompt: str | None = None,
        *,
        input_ids: Sequence[int] | None = None,
        adapter_id: str = "",
        request_id: str = "",
        priority: int = 0,
        timeout: float | None = None,
        **sampling: Any,
    ) -> Completion:
        request = generation_request(
            pb.CompleteRequest, prompt, input_ids, adapter_id, request_id, priority, sampling
        )
        return completion_from_proto(self._unary(self.stub.Complete, request, timeout))

    def tokenize(
        self, text: str, *, return_tokens: bool = False, timeout: float | None = None
    ) -> Tokenized:
        request = pb.TokenizeRequest(text=text, return_tokens=return_tokens)
        reply = self._unary(self.stub.Tokenize, request, timeout)
        return Tokenized(list(reply.token_ids), list(reply.tokens))

    def load_adapter(
        self, adapter_id: str, source: str = "", *, pin: bool = False, timeout: float | None = None
    ) -> AdapterInfo:
        request = pb.LoadAdapterRequest(adapter_id=adapter_id, source=source, pin=pin)
        return adapter_info_from_proto(self._unary(self.stub.LoadAdapter, request, timeout).adapter)

    def unload_adapter(self, adapter_id: str, *, timeout: float | None = None) -> None:
        request = pb.UnloadAdapterRequest(adapter_id=adapter_id)
        self._unary(self.stub.UnloadAdapter, request, timeout)

    def list_adapters(self, *, timeout: float | None = None) -> list[AdapterInfo]:
        reply = self._unary(self.stub.ListAdapters, pb.ListAdaptersRequest(), timeout)
        return [adapter_info_from_proto(a) for a in reply.adapters]

    def stats(self, *, timeout: float | None = None) -> EngineStats:
        return stats_from_proto(self._unary(self.stub.GetStats, pb.GetStatsRequest(), timeout))

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        reply = self._unary(self.stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)
        return model_info_from_proto(reply)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The grpc.health.v1 status name: SERVING, NOT_SERVING, ..."""
        request = health_pb2.HealthCheckRequest(service=service)
        reply = self._unary(self.health_stub.Check, request, timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _stream(call: Any) -> Iterator[TokenEvent]:
    try:
        for msg in call:
            yield event_from_proto(msg)
    except grpc.RpcError as err:
        raise LoraPoolClientError.from_rpc_error(err) from None
    finally:
        call.cancel()  # a no-op once the stream ended; frees the server otherwise


class AsyncLoraPoolClient(_Settings):
    """The same API on grpc.aio: coroutines, and an async iterator for generate.
    Create it inside the event loop that will use it."""

    def __init__(self, target: str = DEFAULT_TARGET, **kwargs: Any):
        super().__init__(target, **kwargs)
        if self.credentials is None:
            self.channel = grpc.aio.insecure_channel(target, options=self.options)
        else:
            self.channel = grpc.aio.secure_channel(target, self.credentials, options=self.options)
        self.stub = pb_grpc.LoraPoolServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncLoraPoolClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=self.deadline(timeout), metadata=self.metadata)
        except grpc.RpcError as err:
            raise LoraPoolClientError.from_rpc_error(err) from None

    async def generate(
        self,
        prompt: str | None = None,
        *,
        input_ids: Sequence[int] | None = None,
        adapter_id: str = "",
        request_id: str = "",
        priority: int = 0,
        timeout: float | None = None,
        **sampling: Any,
    ) -> AsyncIterator[TokenEvent]:
        """Async-iterate the streamed TokenEvents; leaving the loop early cancels."""
        request = generation_request(
            pb.GenerateRequest, prompt, input_ids, adapter_id, request_id, priority, sampling
        )
        call = self.stub.Generate(request, timeout=self.deadline(timeout), metadata=self.metadata)
        try:
            async for msg in call:
                yield event_from_proto(msg)
        except grpc.RpcError as err:
            raise LoraPoolClientError.from_rpc_error(err) from None
        finally:
            call.cancel()

    async def complete(
        self,
        prompt: str | None = None,
        *,
        input_ids: Sequence[int] | None = None,
        adapter_id: str = "",
        request_id: str = "",
        priority: int = 0,
        timeout: float | None = None,
        **sampling: Any,
    ) -> Completion:
        request = generation_request(
            pb.CompleteRequest, prompt, input_ids, adapter_id, request_id, priority, sampling
        )
        return completion_from_proto(await self._unary(self.stub.Complete, request, timeout))

    async def tokenize(
        self, text: str, *, return_tokens: bool = False, timeout: float | None = None
    ) -> Tokenized:
        request = pb.TokenizeRequest(text=text, return_tokens=return_tokens)
        reply = await self._unary(self.stub.Tokenize, request, timeout)
        return Tokenized(list(reply.token_ids), list(reply.tokens))

    async def load_adapter(
        self, adapter_id: str, source: str = "", *, pin: bool = False, timeout: float | None = None
    ) -> AdapterInfo:
        request = pb.LoadAdapterRequest(adapter_id=adapter_id, source=source, pin=pin)
        reply = await self._unary(self.stub.LoadAdapter, request, timeout)
        return adapter_info_from_proto(reply.adapter)

    async def unload_adapter(self, adapter_id: str, *, timeout: float | None = None) -> None:
        request = pb.UnloadAdapterRequest(adapter_id=adapter_id)
        await self._unary(self.stub.UnloadAdapter, request, timeout)

    async def list_adapters(self, *, timeout: float | None = None) -> list[AdapterInfo]:
        reply = await self._unary(self.stub.ListAdapters, pb.ListAdaptersRequest(), timeout)
        return [adapter_info_from_proto(a) for a in reply.adapters]

    async def stats(self, *, timeout: float | None = None) -> EngineStats:
        reply = await self._unary(self.stub.GetStats, pb.GetStatsRequest(), timeout)
        return stats_from_proto(reply)

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        reply = await self._unary(self.stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)
        return model_info_from_proto(reply)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        request = health_pb2.HealthCheckRequest(service=service)
        reply = await self._unary(self.health_stub.Check, request, timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
