"""API-key authentication and the admin role: `authorize` decides (no transport);
ApiKeyInterceptor applies it on the grpc.aio front end, the Ray ingress in
lorapool.server.ray.deployments."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import NamedTuple

import grpc

from lorapool import convert
from lorapool.v1 import lorapool_pb2 as pb

_SERVICE = pb.DESCRIPTOR.services_by_name["LoraPoolService"].full_name
# RPCs that change what every caller is served: loading (replacing, pinning) and
# unloading adapters.
ADMIN_METHODS = frozenset(f"/{_SERVICE}/{name}" for name in ("LoadAdapter", "UnloadAdapter"))
KEY_HINT = "x-api-key metadata or authorization: Bearer <key>"
OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")  # open without a key


class Refusal(NamedTuple):
    """Why a call is refused: the status code, the ErrorInfo reason and the message."""

    code: grpc.StatusCode
    reason: str
    message: str

    def status(self) -> tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...]]:
        """(code, details, trailing metadata with the google.rpc.ErrorInfo)."""
        return convert.error_status(self.code, self.message, self.reason)


@dataclass(frozen=True, repr=False)
class ApiKeys:
    """The inference key and the admin key (bytes; either may be absent, not both)."""

    api_key: bytes | None
    admin_api_key: bytes | None

    @classmethod
    def of(cls, api_key: str | None = None, admin_api_key: str | None = None) -> ApiKeys:
        if not api_key and not admin_api_key:
            raise ValueError("API-key checking needs an api_key or an admin_api_key")
        if api_key and api_key == admin_api_key:
            raise ValueError("the admin key must differ from the inference key")
        return cls(
            api_key.encode() if api_key else None,
            admin_api_key.encode() if admin_api_key else None,
        )

    def __repr__(self) -> str:  # never print a key
        return (
            f"ApiKeys(api_key={self.api_key is not None}, admin={self.admin_api_key is not None})"
        )


def authorize(method: str, metadata, keys: ApiKeys) -> Refusal | None:
    """None when a call of `method` ("/package.Service/Name") carrying `metadata`
    ((key, value) pairs) may go ahead under `keys`, else why it is refused.

    The inference key opens every RPC but the admin ones; the admin key opens
    everything. With no inference key inference is open; with no admin key the
    admin RPCs are refused to every caller (PERMISSION_DENIED). Health checks and
    reflection stay open. No valid key: UNAUTHENTICATED; a valid key without the
    right role: PERMISSION_DENIED."""
    if method.startswith(OPEN_PREFIXES):
        return None
    given = _given_key(metadata)
    is_admin = _matches(given, keys.admin_api_key)
    if method in ADMIN_METHODS:
        if is_admin:
            return None
        name = method.rsplit("/", 1)[-1]
        if keys.admin_api_key is None:
            return _refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{name} is disabled: this server has no admin key "
                "(the operator starts it with --admin-api-key-file or LORAPOOL_ADMIN_API_KEY)",
            )
        if _matches(given, keys.api_key):
            return _refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{name} needs the admin API key; the inference key does not grant it",
            )
        return _refusal(
            grpc.StatusCode.UNAUTHENTICATED, f"{name} needs the admin API key ({KEY_HINT})"
        )
    if keys.api_key is None or is_admin or _matches(given, keys.api_key):
        return None
    return _refusal(grpc.StatusCode.UNAUTHENTICATED, f"missing or wrong API key ({KEY_HINT})")


def _refusal(code: grpc.StatusCode, message: str) -> Refusal:
    return Refusal(code, code.name, message)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """`authorize` in front of every RPC of a grpc.aio server: a refused call gets
    its status with a google.rpc.ErrorInfo (reason UNAUTHENTICATED /
    PERMISSION_DENIED), from a refusing handler of the same streaming kind as the
    real one, as grpc requires."""

    OPEN = OPEN_PREFIXES

    def __init__(self, api_key: str | None = None, admin_api_key: str | None = None):
        self.keys = ApiKeys.of(api_key, admin_api_key)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return handler
        refusal = authorize(details.method, details.invocation_metadata, self.keys)
        return handler if refusal is None else _deny(handler, refusal)


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


def _deny(handler, refusal: Refusal):
    status = refusal.status()

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
