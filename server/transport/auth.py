"""API-key authentication for the grpc.aio front end."""

from __future__ import annotations

import grpc


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
