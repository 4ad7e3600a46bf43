"""Python clients for lorapool: blocking and asyncio, typed, with errors that carry
the gRPC status and the server's machine-readable reason."""

from lorapool.client.client import (
    AsyncLoraPoolClient,
    LoraPoolClient,
    SamplingKwargs,
    SamplingParams,
)
from lorapool.client.errors import LoraPoolClientError
from lorapool.convert import Completion, ModelInfo, Tokenized

__all__ = [
    "AsyncLoraPoolClient",
    "Completion",
    "LoraPoolClient",
    "LoraPoolClientError",
    "ModelInfo",
    "SamplingKwargs",
    "SamplingParams",
    "Tokenized",
]
