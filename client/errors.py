"""The one exception the clients raise: a failed call's gRPC status, message and
the server's machine-readable reason, never a bare grpc.RpcError."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from lorapool.convert import bad_request, error_info


class LoraPoolClientError(Exception):
    """A failed call, as plain attributes:

    - `code`: the grpc.StatusCode (an attribute, not a method);
    - `details`: the status message;
    - `reason`: the machine-readable reason from the google.rpc.ErrorInfo detail
      (ADAPTER_NOT_FOUND, INVALID_REQUEST, QUEUE_FULL, ...; "" when the server sent
      none, e.g. a deadline that expired on the client);
    - `metadata`: that ErrorInfo's metadata (e.g. {"adapter_id": ...} or {"field": ...});
    - `field_violations`: (field, description) pairs from a google.rpc.BadRequest
      detail, e.g. [("params.temperature", "...")] on INVALID_ARGUMENT; [] when none.

    It is deliberately not a grpc.RpcError. A grpc.RpcError raised by a call is
    also a grpc.Call whose `code()` and `details()` are methods, so code written
    for one calls `err.code()`; here `code` and `details` have always been
    attributes, and making them callable would break every `err.code ==
    grpc.StatusCode.X` already written. Subclassing grpc.RpcError without those
    methods would instead let `except grpc.RpcError` handlers catch it and then
    fail on `err.code()`. Catch LoraPoolClientError (the clients raise nothing
    else for a failed call)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        reason: str = "",
        metadata: dict[str, str] | None = None,
        field_violations: Sequence[tuple[str, str]] = (),
    ):
        self.code = code
        self.details = details
        self.reason = reason
        self.metadata = metadata or {}
        self.field_violations: list[tuple[str, str]] = list(field_violations)
        super().__init__(str(self))

    def __reduce__(self) -> tuple[Any, ...]:  # picklable, e.g. across processes
        args = (self.code, self.details, self.reason, self.metadata, self.field_violations)
        return type(self), args

    def __str__(self) -> str:
        suffix = f" [{self.reason}]" if self.reason else ""
        return f"{self.code.name}: {self.details}{suffix}"

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> LoraPoolClientError:
        call: Any = err  # RpcError raised by a call is also a grpc.Call
        trailers = call.trailing_metadata()
        info = error_info(trailers)
        violations = [(v.field, v.description) for v in bad_request(trailers).field_violations]
        return cls(call.code(), call.details() or "", info.reason, dict(info.metadata), violations)


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
