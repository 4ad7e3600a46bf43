"""API-key authentication and the admin role for the grpc.aio front end."""

from __future__ import annotations

import hmac

import grpc

from lorapool import convert
from lorapool.v1 import lorapool_pb2 as pb

_SERVICE = pb.DESCRIPTOR.services_by_name["LoraPoolService"].full_name
# RPCs that change what every caller is served: loading (replacing, pinning) and
# unloading adapters.
ADMIN_METHODS = frozenset(f"/{_SERVICE}/{name}" for name in ("LoadAdapter", "UnloadAdapter"))
KEY_HINT = "x-api-key metadata or authorization: Bearer <key>"


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Two keys, compared in constant time. The inference key (`api_key`) opens every
    RPC but the admin ones; the admin key (`admin_api_key`) opens everything. With no
    inference key inference is open; with no admin key the admin RPCs are refused to
    every caller (PERMISSION_DENIED). Health checks and reflection stay open.

    A caller without a valid key gets UNAUTHENTICATED; a valid key without the right
    role gets PERMISSION_DENIED; both with a google.rpc.ErrorInfo (reason
    UNAUTHENTICATED / PERMISSION_DENIED). The refusing handler has the same streaming
    kind as the real one, as grpc requires."""

    OPEN = ("/grpc.health.v1.", "/grpc.reflection.")

    def __init__(self, api_key: str | None = None, admin_api_key: str | None = None):
        if not api_key and not admin_api_key:
            raise ValueError("ApiKeyInterceptor needs an api_key or an admin_api_key")
        if api_key and api_key == admin_api_key:
            raise ValueError("the admin key must differ from the inference key")
        self.api_key = api_key.encode() if api_key else None
        self.admin_api_key = admin_api_key.encode() if admin_api_key else None

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(self.OPEN):
            return handler
        given = _given_key(details.invocation_metadata)
        is_admin = _matches(given, self.admin_api_key)
        if method in ADMIN_METHODS:
            if is_admin:
                return handler
            name = method.rsplit("/", 1)[-1]
            if self.admin_api_key is None:
                return _deny(
                    handler,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{name} is disabled: this server has no admin key "
                    "(the operator starts it with --admin-api-key-file or LORAPOOL_ADMIN_API_KEY)",
                )
            if _matches(given, self.api_key):
                return _deny(
                    handler,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{name} needs the admin API key; the inference key does not grant it",
                )
            return _deny(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                f"{name} needs the admin API key ({KEY_HINT})",
            )
        if self.api_key is None or is_admin or _matches(given, self.api_key):
            return handler
        return _deny(
            handler, grpc.StatusCode.UNAUTHENTICATED, f"missing or wrong API key ({KEY_HINT})"
        )


def _given_key(metadata) -> bytes | None:
    md = dict(metadata or ())
    given = md.get("x-api-key")
    if given is None:
        auth = md.get("authorization")
        if isinstance(auth, str) and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
    if not given:
        return None
    return given if isinstance(given, bytes) else given.encode("utf-8", "surrogateescape")


def _matches(given: bytes | None, key: bytes | None) -> bool:
    return given is not None and key is not None and hmac.compare_digest(given, key)


def _deny(handler, code: grpc.StatusCode, message: str):
    status = convert.error_status(code, message, code.name)

    async def unary(request, context):
        await context.abort(*status)

    async def streaming(request, context):
        await context.abort(*status)
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
