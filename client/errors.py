"""The one exception the clients raise: a failed call's gRPC status, message and
the server's machine-readable reason, never a bare grpc.RpcError."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import grpc

from lorapool.convert import error_info


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


@contextlib.contextmanager
def rpc_errors(stream: grpc.Call | None = None) -> Iterator[None]:
    """grpc.RpcError becomes LoraPoolClientError. A stream is cancelled on the way
    out: a no-op once it ended, and it frees the server when the caller stopped early."""
    try:
        yield
    except grpc.RpcError as err:
        raise LoraPoolClientError.from_rpc_error(err) from None
    finally:
        if stream is not None:
            stream.cancel()
