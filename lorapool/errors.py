"""Typed errors of the engine. Each carries the gRPC status it maps to, so the
service layer has one place to translate them and messages say what to fix."""

from __future__ import annotations


class LoraPoolError(Exception):
    """Base class. `status` names a grpc.StatusCode member; `reason` is a stable
    machine-readable string sent in the rich error details (google.rpc.ErrorInfo),
    with `metadata` (e.g. the adapter id or the limit) beside it. `field` names the
    request field at fault (sent as a google.rpc.BadRequest field violation)."""

    status = "INTERNAL"
    reason = "INTERNAL"

    def __init__(self, message: str = "", *, field: str = "", **metadata: object):
        super().__init__(message)
        self.field = field
        self.metadata = {k: str(v) for k, v in metadata.items()}
        if field:
            self.metadata.setdefault("field", field)


class InvalidRequest(LoraPoolError):
    status = "INVALID_ARGUMENT"
    reason = "INVALID_REQUEST"


class AdapterNotFound(LoraPoolError):
    status = "NOT_FOUND"
    reason = "ADAPTER_NOT_FOUND"


class AdapterIncompatible(LoraPoolError):
    """The adapter exists but cannot be served on this base model (shape, target
    module, unsupported PEFT feature, unsafe file format)."""

    status = "FAILED_PRECONDITION"
    reason = "ADAPTER_INCOMPATIBLE"


class AdapterTooLarge(AdapterIncompatible):
    """The adapter needs more pages than the pool can ever give it."""

    reason = "ADAPTER_TOO_LARGE"


class SourceUnavailable(LoraPoolError):
    """An adapter source (hub, registry) could not be reached."""

    status = "UNAVAILABLE"
    reason = "SOURCE_UNAVAILABLE"


class QueueFull(LoraPoolError):
    status = "RESOURCE_EXHAUSTED"
    reason = "QUEUE_FULL"


class Loading(LoraPoolError):
    """The server is up but its model is still loading."""

    status = "UNAVAILABLE"
    reason = "LOADING"


class Draining(LoraPoolError):
    status = "UNAVAILABLE"
    reason = "DRAINING"


class NoTokenizer(LoraPoolError):
    """The server runs a checkpoint without a tokenizer: only token ids work."""

    status = "FAILED_PRECONDITION"
    reason = "NO_TOKENIZER"


class NoChatTemplate(LoraPoolError):
    """A chat request to a tokenizer without a chat template: nothing says how the
    model's turns are written, so the conversation cannot be rendered."""

    status = "INVALID_ARGUMENT"
    reason = "NO_CHAT_TEMPLATE"


class SourceNotAllowed(LoraPoolError):
    """A LoadAdapter source outside the server's allow-list."""

    status = "PERMISSION_DENIED"
    reason = "SOURCE_NOT_ALLOWED"


class PoolTooSmall(LoraPoolError):
    """The request fits the pool, but not the part pinned adapters leave free."""

    status = "RESOURCE_EXHAUSTED"
    reason = "POOL_PINNED"
