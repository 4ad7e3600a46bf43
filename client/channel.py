"""How the clients open their channel: message limits, the metadata that carries
the API key, and the retry policy.

Retries are left to gRPC's own retry policy (service config), limited to calls
that are safe to repeat: the read-only unary calls and Generate. gRPC commits a
streaming call when the first response arrives, so Generate is retried only
while nothing came back yet. Complete, LoadAdapter and UnloadAdapter are never
retried: a repeated Complete would redo the whole generation."""

from __future__ import annotations

import json
from typing import Any

import grpc

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT_S = 120.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVICE = "lorapool.v1.LoraPoolService"
RETRIED_METHODS = ("GetStats", "ListAdapters", "GetModelInfo", "Tokenize", "Generate")


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


def channel_credentials(
    tls: bool, root_certificates: bytes | None
) -> grpc.ChannelCredentials | None:
    """TLS credentials when asked for (or implied by root certificates); None: plaintext."""
    if tls or root_certificates is not None:
        return grpc.ssl_channel_credentials(root_certificates)
    return None


def open_channel(
    channels: Any,
    target: str,
    credentials: grpc.ChannelCredentials | None,
    options: list[tuple[str, Any]],
) -> Any:
    """A channel from `channels`, the module that opens them: grpc or grpc.aio."""
    if credentials is None:
        return channels.insecure_channel(target, options=options)
    return channels.secure_channel(target, credentials, options=options)
