"""How the clients open their channel: message limits, the metadata that carries
the API key, and the retry policy.

Retries are left to gRPC's own retry policy (service config), limited to calls
that are safe to repeat: the read-only unary calls (GetStats, ListAdapters,
GetModelInfo, Tokenize and grpc.health.v1 Check) and Generate. Only UNAVAILABLE
is retried (a server not up yet, draining, or a connection that dropped), with
exponential backoff: a random wait of up to 0.1 s, 0.2 s, 0.4 s, ... capped at
2 s, at most `retries` + 1 attempts in all (gRPC allows 5). gRPC commits a
streaming call when the first response arrives, so Generate is retried only
while nothing came back yet: no token is ever generated twice for the caller.
Complete, LoadAdapter and UnloadAdapter are never retried: a repeated Complete
would redo the whole generation, and the admin calls change the server.

TLS: `channel_credentials` takes PEM bytes, or a path (str or os.PathLike) to a
PEM file, for the CA bundle and for a client certificate and key (mutual TLS)."""

from __future__ import annotations

import json
import os
from typing import Any

import grpc

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT_S = 120.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVICE = "lorapool.v1.LoraPoolService"
RETRIED_METHODS = ("GetStats", "ListAdapters", "GetModelInfo", "Tokenize", "Generate")
NEVER_RETRIED = ("Complete", "LoadAdapter", "UnloadAdapter")  # not idempotent, or costly to redo

PemSource = bytes | str | os.PathLike[str]
"""PEM content (bytes) or the path of a PEM file (str or os.PathLike)."""


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


def read_pem(source: PemSource | None) -> bytes | None:
    """PEM bytes as given, or read from the file a str / os.PathLike names."""
    if source is None or isinstance(source, bytes):
        return source
    with open(source, "rb") as f:
        return f.read()


def channel_credentials(
    tls: bool,
    root_certificates: PemSource | None,
    tls_cert: PemSource | None = None,
    tls_key: PemSource | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials when asked for (or implied by root certificates or a client
    certificate); None: plaintext. `root_certificates` None trusts the system roots.
    `tls_cert` and `tls_key` (given together) are the client's certificate chain and
    private key, presented to servers that ask for one (mutual TLS)."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("pass both tls_cert and tls_key for a client certificate, or neither")
    if tls or root_certificates is not None or tls_cert is not None:
        return grpc.ssl_channel_credentials(
            root_certificates=read_pem(root_certificates),
            private_key=read_pem(tls_key),
            certificate_chain=read_pem(tls_cert),
        )
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
