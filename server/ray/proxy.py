"""What lorapool runs inside Serve's gRPC proxy process: reliable client
cancellation, and the address the proxy listens on.

Serve's proxy (Ray Serve 2.60) streams a server-streaming reply by iterating an
async generator chain (`unary_stream` -> `proxy_request` -> `send_request_to_replica`)
that awaits the replica's response between messages. When a client cancels, grpc.aio
cancels the call's task. If the task is waiting for the next reply, the
CancelledError lands in Serve's ProxyResponseGenerator, which cancels the
downstream request: the replica stops. If the task is instead sending a message
(the chain suspended at a `yield`), the chain is later closed with GeneratorExit,
which `send_request_to_replica` swallows without cancelling anything: the replica
generates to the end for nobody. Both happen, roughly half the time each, so a
cancelled Generate used to keep its pages on its replica until max_new_tokens.

The fix, applied in the proxy's own process: Serve calls every function listed in
gRPCOptions.grpc_servicer_functions with the proxy's gRPC server before the
servicers' handlers are built, and the server builds each handler through its
`service_handler_factory`. `cancel_streams_on_disconnect` (listed first) wraps that
factory so that each server-streaming handler runs Serve's chain in a task of its
own, a pump that only ever waits on the replica, and hands the messages over
through a queue. The gRPC side waits on the queue; when the call ends early (task
cancelled, generator closed, or the call's done callback), the pump task is
cancelled while it waits on the replica, which is the path where Serve cancels the
downstream request, and Serve carries `ray.cancel` on to the engine replica. The
pump sees the call through CallContext, which stops touching the call once it has
ended. The queue is unbounded: a generation's messages are small and bounded by
its max_new_tokens. Unary calls need nothing: their handler never suspends at a
yield.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

log = logging.getLogger("lorapool.ray")

_WRAPPED = "_lorapool_cancels_streams"


def cancel_streams_on_disconnect(servicer: Any, server: Any) -> None:
    """A "servicer function" for gRPCOptions: installs the wrapper on the proxy's
    server (the servicer, Serve's placeholder, is not used). Idempotent."""
    factory = getattr(server, "service_handler_factory", None)
    if factory is None:
        log.warning("Serve's gRPC server has no service_handler_factory: streams not wrapped")
        return
    if getattr(factory, _WRAPPED, False):
        return
    server.service_handler_factory = wrap_factory(factory)


def wrap_factory(factory: Callable) -> Callable:
    """Serve's handler factory, with its server-streaming handlers made cancellable."""

    def service_handler_factory(service_method: str, streaming_type: Any) -> Callable:
        handler = factory(service_method=service_method, streaming_type=streaming_type)
        if getattr(streaming_type, "name", "") == "UNARY_STREAM":
            return cancellable_stream(handler)
        return handler

    setattr(service_handler_factory, _WRAPPED, True)
    return service_handler_factory


_END = object()


def cancellable_stream(handler: Callable[..., AsyncIterator]) -> Callable[..., AsyncIterator]:
    """handler(request, context) run in a pump task; cancelled when the call ends."""

    async def unary_stream(request: Any, context: Any) -> AsyncIterator:
        queue: asyncio.Queue = asyncio.Queue()
        call = CallContext(context)

        async def pump() -> None:
            try:
                async for message in handler(request, call):
                    queue.put_nowait(message)
            finally:
                queue.put_nowait(_END)

        task = asyncio.create_task(pump())

        def ended(*_: Any) -> None:
            call.end()
            task.cancel()  # a no-op once the pump has finished

        add_done_callback = getattr(context, "add_done_callback", None)
        if add_done_callback is not None:  # the call ended: cancelled, deadline, done
            add_done_callback(ended)
        try:
            while (message := await queue.get()) is not _END:
                yield message
            await task  # the pump's own error, if any
        finally:
            ended()

    return unary_stream


class CallContext:
    """The call's grpc.aio context as Serve's chain sees it: the real one while the
    call lives; after it ends, answers that touch nothing of the finished call
    (peer and metadata as they were, None for the rest), because the pump may
    still run Serve's bookkeeping (status, access log) once grpc has freed the call,
    and reading a freed call's peer crashes the proxy process."""

    def __init__(self, context: Any):
        self._context = context
        self._peer = context.peer()
        self._metadata = context.invocation_metadata()
        self._ended = False

    def end(self) -> None:
        self._ended = True

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> Any:
        return self._metadata

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._context, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return None if self._ended else attr(*args, **kwargs)

        return call


# -- the gRPC proxy's address ----------------------------------------------------------------

HOST_ENV = "LORAPOOL_GRPC_HOST"  # set in the Ray job's runtime_env by `serve-ray --host`


def bind_grpc_host() -> None:
    """A Ray worker_process_setup_hook: with LORAPOOL_GRPC_HOST set, Serve's gRPC
    proxy started in this process listens on that address instead of `[::]`.

    Serve 2.60 has no option for the address: its start_grpc_server binds
    `[::]:port` through `ray.serve._private.default_impl.add_grpc_address`, which
    it looks up when the proxy starts; this hook (run in every worker of the job,
    before any actor code) replaces that one function. Without the variable it
    does nothing."""
    host = os.environ.get(HOST_ENV, "")
    if not host or host in WILDCARDS:
        return
    from ray.serve._private import default_impl

    add_address = default_impl.add_grpc_address

    def add_grpc_address(server: Any, address: str) -> Any:
        if address.startswith("[::]:"):
            address = f"{bracketed(host)}:{address.rsplit(':', 1)[1]}"
        return add_address(server, address)

    default_impl.add_grpc_address = add_grpc_address


WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def bracketed(host: str) -> str:
    """An IPv6 literal in brackets, as gRPC addresses want it."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
