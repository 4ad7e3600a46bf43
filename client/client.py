"""Typed clients for LoraPoolService: `LoraPoolClient` (blocking) and
`AsyncLoraPoolClient` (grpc.aio). Both return the engine's plain dataclasses and
raise `LoraPoolClientError` instead of grpc.RpcError. How the channel is opened
(limits, key metadata, TLS, which calls gRPC retries) is client/channel.py.

Sampling options, two ways:

- `sampling=SamplingParams(...)`: the whole object is sent, every field of it,
  so what the request runs with is exactly what the object says (its dataclass
  defaults are the server's documented defaults). A plain dataclass cannot tell a
  field set to its default from one left alone, so "only the fields set" cannot
  be honoured for it; sending all of them is the unambiguous reading.
- keyword arguments (`max_new_tokens=8, temperature=0.7`, typed by
  `SamplingKwargs`): only those given are sent, and the server's defaults apply
  to the rest. Still supported, no warning; prefer `sampling=` in new code.

Given both, the keywords override the object's fields.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lorapool.client.channel import (
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT_S,
    MAX_MESSAGE_BYTES,
    PemSource,
    auth_metadata,
    channel_credentials,
    channel_options,
    open_channel,
)
from lorapool.client.errors import LoraPoolClientError, rpc_errors
from lorapool.client.requests import (
    ChatMessageLike,
    SamplingKwargs,
    generation_request,
    tokenize_request,
)
from lorapool.convert import (
    Completion,
    ModelInfo,
    Tokenized,
    adapter_info_from_proto,
    completion_from_proto,
    event_from_proto,
    model_info_from_proto,
    stats_from_proto,
)
from lorapool.types import AdapterInfo, EngineStats, SamplingParams, TokenEvent
from lorapool.v1 import lorapool_pb2 as pb
from lorapool.v1 import lorapool_pb2_grpc as pb_grpc

__all__ = [
    "DEFAULT_TARGET",
    "AsyncLoraPoolClient",
    "ChatMessageLike",
    "LoraPoolClient",
    "LoraPoolClientError",
    "SamplingKwargs",
    "SamplingParams",
    "generation_request",
]


# A conversation: {"role", "content"} dicts or ChatMessage messages, or a Chat.
Chat = Sequence[ChatMessageLike] | pb.Chat


@dataclass(frozen=True)
class _Unary:
    """One unary call, ready to send: the stub method, the request, and how to
    turn the reply into what the client returns."""

    method: Any
    request: Any
    read: Callable[[Any], Any]


class _ClientBase:
    """What both clients share: target, credentials, metadata, deadlines, the
    channel and stubs, and each RPC once (its request and how to read its reply).
    The subclasses only differ in how they wait for the stub."""

    _channels: Any  # the module that opens channels: grpc or grpc.aio

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: PemSource | None = None,
        tls_cert: PemSource | None = None,
        tls_key: PemSource | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        retries: int = 3,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        metadata: Sequence[tuple[str, str]] = (),
    ):
        self.target = target
        self.timeout = timeout
        self.metadata = auth_metadata(api_key) + tuple(metadata)
        self.options = channel_options(retries, max_message_bytes)
        self.credentials = channel_credentials(tls, root_certificates, tls_cert, tls_key)
        self.channel = open_channel(self._channels, target, self.credentials, self.options)
        self.stub = pb_grpc.LoraPoolServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        """Invoke a stub method: the reply (blocking), an awaitable (asyncio) or,
        for a streaming method, the call to iterate."""
        return method(request, timeout=self.deadline(timeout), metadata=self.metadata)

    # -- each RPC once ---------------------------------------------------------------------

    def _tokenize_call(self, text: str | None, chat: Chat | None, return_tokens: bool) -> _Unary:
        return _Unary(self.stub.Tokenize, tokenize_request(text, chat, return_tokens), _tokenized)

    def _load_adapter_call(self, adapter_id: str, source: str, pin: bool) -> _Unary:
        request = pb.LoadAdapterRequest(adapter_id=adapter_id, source=source, pin=pin)
        return _Unary(self.stub.LoadAdapter, request, lambda r: adapter_info_from_proto(r.adapter))

    def _unload_adapter_call(self, adapter_id: str) -> _Unary:
        request = pb.UnloadAdapterRequest(adapter_id=adapter_id)
        return _Unary(self.stub.UnloadAdapter, request, lambda r: None)

    def _list_adapters_call(self) -> _Unary:
        return _Unary(self.stub.ListAdapters, pb.ListAdaptersRequest(), _adapter_list)

    def _stats_call(self) -> _Unary:
        return _Unary(self.stub.GetStats, pb.GetStatsRequest(), stats_from_proto)

    def _model_info_call(self) -> _Unary:
        return _Unary(self.stub.GetModelInfo, pb.GetModelInfoRequest(), model_info_from_proto)

    def _health_call(self, service: str) -> _Unary:
        request = health_pb2.HealthCheckRequest(service=service)
        return _Unary(self.health_stub.Check, request, _serving_status)


def _tokenized(reply: pb.TokenizeResponse) -> Tokenized:
    return Tokenized(list(reply.token_ids), list(reply.tokens))


def _adapter_list(reply: pb.ListAdaptersResponse) -> list[AdapterInfo]:
    return [adapter_info_from_proto(a) for a in reply.adapters]


def _serving_status(reply: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class LoraPoolClient(_ClientBase):
    """Blocking client. `timeout` is the default deadline in seconds for every
    call (None: no deadline); each method takes its own `timeout` too."""

    _channels = grpc

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> LoraPoolClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, unary: _Unary, timeout: float | None) -> Any:
        with rpc_errors():
            reply = self._call(unary.method, unary.request, timeout)
        return unary.read(reply)

    def generate(
        self,
        prompt: str | None = None,
        *,
        input_ids: Sequence[int] | None = None,
        chat: Chat | None = None,
        adapter_id: str = "",
        request_id: str = "",
        priority: int = 0,
        timeout: float | None = None,
        sampling: SamplingParams | None = None,
        **sampling_kwargs: Unpack[SamplingKwargs],
    ) -> Iterator[TokenEvent]:
        """Yield TokenEvents as the server streams them; the last one has
        finish_reason, usage and the request_id. Stopping the iteration early
        cancels the call. Input: one of `prompt`, `input_ids`, or `chat`, a list
        of {"role": ..., "content": ...} dicts (or ChatMessage messages) that the
        server renders with the model's chat template, the assistant's turn
        opened. Sampling: `sampling=SamplingParams(...)` (sent whole) or,
        deprecated but supported, keyword arguments (only those given are sent)."""
        request = generation_request(
            pb.GenerateRequest,
            prompt,
            input_ids,
            adapter_id,
            request_id,
            priority,
            dict(sampling_kwargs),
            sampling,
            chat=chat,
        )
        return _stream(self._call(self.stub.Generate, request, timeout))

    def complete(
        self,
        prompt: str | None = None,
        *,
        input_ids: Sequence[int] | None = None,
        chat: Chat | None = None,
        adapter_id: str = "",
        request_id: str = "",
        priority: int = 0,
        timeout: float | None = None,
        sampling: SamplingParams | None = None,
        **sampling_kwargs: Unpack[SamplingKwargs],
    ) -> Completion:
        """The whole generation in one reply, with the request_id it ran under.
        Input and sampling as in generate."""
        request = generation_request(
            pb.CompleteRequest,
            prompt,
            input_ids,
            adapter_id,
            request_id,
            priority,
            dict(sampling_kwargs),
            sampling,
            chat=chat,
        )
        unary = _Unary(self.stub.Complete, request, completion_from_proto)
        return self._send(unary, timeout)

    def tokenize(
        self,
        text: str | None = None,
        *,
        chat: Chat | None = None,
        return_tokens: bool = False,
        timeout: float | None = None,
    ) -> Tokenized:
        """The token ids of text, or of chat rendered with the model's chat
        template exactly as generate renders it (give one of the two)."""
        return self._send(self._tokenize_call(text, chat, return_tokens), timeout)

    def load_adapter(
        self, adapter_id: str, source: str = "", *, pin: bool = False, timeout: float | None = None
    ) -> AdapterInfo:
        return self._send(self._load_adapter_call(adapter_id, source, pin), timeout)

    def unload_adapter(self, adapter_id: str, *, timeout: float | None = None) -> None:
        self._send(self._unload_adapter_call(adapter_id), timeout)

    def list_adapters(self, *, timeout: float | None = None) -> list[AdapterInfo]:
        return self._send(self._list_adapters_call(), timeout)

    def stats(self, *, timeout: float | None = None) -> EngineStats:
        return self._send(self._stats_call(), timeout)

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return self._send(self._model_info_call(), timeout)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The grpc.health.v1 status name: SERVING, NOT_SERVING, ..."""
        return self._send(self._health_call(service), timeout)


def _stream(call: Any) -> Iterator[TokenEvent]:
    with rpc_errors(call):
        for msg in call:
            yield event_from_proto(msg)


class AsyncLoraPoolClient(_ClientBase):
    """The same API on grpc.aio: coroutines, and an async iterator for generate.
    Create it inside the event loop that will use it."""

    _channels = grpc.aio

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncLoraPoolClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _send(self, unary: _Unary, timeout: float | None) -> Any:
        with rpc_errors():
            reply = await self._call(unary.method, unary.request, timeout)
        return unary.read(reply)

    async def generate(
        self,
        prompt: str | None = None,
        *,
        input_ids: Sequence[int] | None = None,
        chat: Chat | None = None,
        adapter_id: str = "",
        request_id: str = "",
        priority: int = 0,
        timeout: float | None = None,
        sampling: SamplingParams | None = None,
        **sampling_kwargs: Unpack[SamplingKwargs],
    ) -> AsyncIterator[TokenEvent]:
        """Async-iterate the streamed TokenEvents; leaving the loop early cancels.
        Input and sampling as in LoraPoolClient.generate."""
        request = generation_request(
            pb.GenerateRequest,
            prompt,
            input_ids,
            adapter_id,
            request_id,
            priority,
            dict(sampling_kwargs),
            sampling,
            chat=chat,
        )
        call = self._call(self.stub.Generate, request, timeout)
        with rpc_errors(call):
            async for msg in call:
                yield event_from_proto(msg)

    async def complete(
        self,
        prompt: str | None = None,
        *,
        input_ids: Sequence[int] | None = None,
        chat: Chat | None = None,
        adapter_id: str = "",
        request_id: str = "",
        priority: int = 0,
        timeout: float | None = None,
        sampling: SamplingParams | None = None,
        **sampling_kwargs: Unpack[SamplingKwargs],
    ) -> Completion:
        """The whole generation in one reply; input and sampling as in generate."""
        request = generation_request(
            pb.CompleteRequest,
            prompt,
            input_ids,
            adapter_id,
            request_id,
            priority,
            dict(sampling_kwargs),
            sampling,
            chat=chat,
        )
        unary = _Unary(self.stub.Complete, request, completion_from_proto)
        return await self._send(unary, timeout)

    async def tokenize(
        self,
        text: str | None = None,
        *,
        chat: Chat | None = None,
        return_tokens: bool = False,
        timeout: float | None = None,
    ) -> Tokenized:
        """As LoraPoolClient.tokenize."""
        return await self._send(self._tokenize_call(text, chat, return_tokens), timeout)

    async def load_adapter(
        self, adapter_id: str, source: str = "", *, pin: bool = False, timeout: float | None = None
    ) -> AdapterInfo:
        return await self._send(self._load_adapter_call(adapter_id, source, pin), timeout)

    async def unload_adapter(self, adapter_id: str, *, timeout: float | None = None) -> None:
        await self._send(self._unload_adapter_call(adapter_id), timeout)

    async def list_adapters(self, *, timeout: float | None = None) -> list[AdapterInfo]:
        return await self._send(self._list_adapters_call(), timeout)

    async def stats(self, *, timeout: float | None = None) -> EngineStats:
        return await self._send(self._stats_call(), timeout)

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return await self._send(self._model_info_call(), timeout)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The grpc.health.v1 status name: SERVING, NOT_SERVING, ..."""
        return await self._send(self._health_call(service), timeout)
