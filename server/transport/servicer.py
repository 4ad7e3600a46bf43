"""The gRPC face of the engine: LoraPoolService on grpc.aio.

A thin layer: convert messages, call the engine, map typed engine errors to the
status codes of the error contract (with an ErrorInfo reason in the rich
details), observe metrics and log one structured line per request. Client
cancellation and deadlines arrive as CancelledError at the handler's current
await; the engine's generator frees the request's pages in its `finally`."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from lorapool import convert
from lorapool.errors import Draining, InvalidRequest, LoraPoolError
from lorapool.server.transport.metrics import Metrics
from lorapool.v1 import lorapool_pb2 as pb
from lorapool.v1 import lorapool_pb2_grpc as pb_grpc

log = logging.getLogger("lorapool.service")


class LoraPoolServicer(pb_grpc.LoraPoolServiceServicer):
    def __init__(self, engine, metrics: Metrics):
        self.engine = engine  # None while the model loads: every call gets UNAVAILABLE
        self.metrics = metrics

    async def _ready(self, context, method: str):
        if self.engine is None:
            await self._abort(
                context, Draining("the model is still loading; retry shortly"), method
            )
        return self.engine

    async def Generate(self, request, context):
        req = await self._request(request, context, "Generate")
        async for event in self._events(req, context, "Generate"):
            yield convert.event_to_proto(event, req.request_id)

    async def Complete(self, request, context):
        req = await self._request(request, context, "Complete")
        events = [e async for e in self._events(req, context, "Complete")]
        return convert.events_to_complete(events, req.request_id)

    async def Tokenize(self, request, context):
        await self._ready(context, "Tokenize")
        ids = self.engine.tokenizer(request.text)["input_ids"]
        tokens = self.engine.tokenizer.convert_ids_to_tokens(ids) if request.return_tokens else []
        return pb.TokenizeResponse(token_ids=ids, tokens=tokens)

    async def LoadAdapter(self, request, context):
        await self._ready(context, "LoadAdapter")
        try:
            info = await self.engine.load_adapter(
                request.adapter_id, request.source or None, request.pin
            )
        except LoraPoolError as exc:
            await self._abort(context, exc, "LoadAdapter", request.adapter_id)
        log.info(
            "adapter_loaded adapter=%s state=%s load_ms=%.1f",
            info.adapter_id,
            info.state.name,
            info.load_ms,
        )
        return pb.LoadAdapterResponse(adapter=convert.adapter_info_to_proto(info))

    async def UnloadAdapter(self, request, context):
        await self._ready(context, "UnloadAdapter")
        try:
            await self.engine.unload_adapter(request.adapter_id)
        except LoraPoolError as exc:
            await self._abort(context, exc, "UnloadAdapter", request.adapter_id)
        log.info("adapter_unloaded adapter=%s", request.adapter_id)
        return pb.UnloadAdapterResponse()

    async def ListAdapters(self, request, context):
        await self._ready(context, "ListAdapters")
        infos = self.engine.list_adapters()
        return pb.ListAdaptersResponse(adapters=[convert.adapter_info_to_proto(i) for i in infos])

    async def GetStats(self, request, context):
        await self._ready(context, "GetStats")
        return convert.stats_to_proto(self.engine.stats())

    async def GetModelInfo(self, request, context):
        await self._ready(context, "GetModelInfo")
        return convert.model_info_to_proto(self.engine.model_info())

    # -- helpers ----------------------------------------------------------------------------
    async def _request(self, request, context, method: str):
        await self._ready(context, method)
        try:
            return convert.request_from_proto(request)
        except InvalidRequest as exc:
            await self._abort(context, exc, method, request.adapter_id)

    def _label(self, adapter_id: str) -> str:
        """Metric label for an adapter: ids no source knows share one label, so that
        clients sending random ids cannot grow the metric series without bound."""
        if not adapter_id:
            return "base"
        if adapter_id in self.engine.adapters.entries or self.engine.registry.uri_for(adapter_id):
            return adapter_id
        return "unknown"

    async def _events(self, req, context, method: str):
        adapter = self._label(req.adapter_id)
        start = time.monotonic()
        last = None
        status, tokens, usage = "OK", 0, None
        try:
            async for event in self.engine.generate(req):
                now = time.monotonic()
                if event.token_ids:
                    if last is None:
                        self.metrics.ttft.observe(now - start)
                    else:
                        self.metrics.itl.observe(now - last)
                    last = now
                    tokens += len(event.token_ids)
                usage = event.usage or usage
                yield event
        except LoraPoolError as exc:
            status = exc.status
            await self._abort(context, exc, method, req.adapter_id, req.request_id, count=False)
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        finally:
            self.metrics.requests.labels(adapter, method, status).inc()
            self.metrics.tokens.labels(adapter).inc(tokens)
            log.info(
                "request request_id=%s method=%s adapter=%s status=%s tokens=%d ttft_ms=%.1f "
                "total_ms=%.1f",
                req.request_id,
                method,
                adapter,
                status,
                tokens,
                usage.ttft_ms if usage else -1.0,
                (time.monotonic() - start) * 1000,
            )

    async def _abort(self, context, exc, method, adapter_id="", request_id="", count=True):
        if count:
            self.metrics.requests.labels(self._label(adapter_id), method, exc.status).inc()
        log.info(
            "rejected request_id=%s method=%s adapter=%s status=%s reason=%s msg=%s",
            request_id,
            method,
            adapter_id,
            exc.status,
            exc.reason,
            exc,
        )
        await context.abort(*convert.status_for_error(exc))


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without the configured key (metadata `x-api-key` or
    `authorization: Bearer <key>`) with UNAUTHENTICATED. Health checks and
    reflection stay open. The rejecting handler has the same streaming kind as
    the real one, as grpc requires."""

    OPEN = ("/grpc.health.v1.", "/grpc.reflection.")

    def __init__(self, api_key: str):
        self.api_key = api_key

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(self.OPEN):
            return handler
        md = dict(details.invocation_metadata or ())
        given = md.get("x-api-key") or md.get("authorization", "").removeprefix("Bearer ").strip()
        if given == self.api_key:
            return handler
        return _deny(handler)


def _deny(handler):
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key (x-api-key)")

    async def streaming(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key (x-api-key)")
        yield  # pragma: no cover - makes this an async generator

    kw = dict(
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **kw)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(streaming, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)
