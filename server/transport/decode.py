"""Request bytes that are not a valid protobuf for their method.

grpc.aio deserializes a request with the handler's `request_deserializer` before
the servicer runs; an exception there becomes UNKNOWN and a full traceback in the
log for every such call, so a client could flood the log. DecodeGuardInterceptor
wraps the deserializer of every registered handler: a message that does not decode
becomes an `Undecodable` marker, and the wrapped behaviour answers it with
INVALID_ARGUMENT (ErrorInfo reason UNDECODABLE_REQUEST) and one log line, at most
one per `log_interval_s` with a count of those suppressed meanwhile."""

from __future__ import annotations

import inspect
import logging
import time

import grpc

from lorapool import convert

log = logging.getLogger("lorapool.server")
REASON = "UNDECODABLE_REQUEST"


class Undecodable:
    """Stands in for a request whose bytes did not decode."""

    __slots__ = ("size", "error", "message_name")

    def __init__(self, size: int, error: BaseException, message_name: str):
        self.size = size
        self.error = error
        self.message_name = message_name


class ThrottledLog:
    """At most one line per interval; the next line says how many were dropped."""

    def __init__(self, interval_s: float = 10.0, clock=time.monotonic):
        self.interval_s = interval_s
        self.clock = clock
        self.next_at = float("-inf")
        self.suppressed = 0

    def warning(self, msg: str, *args) -> bool:
        now = self.clock()
        if now < self.next_at:
            self.suppressed += 1
            return False
        if self.suppressed:
            msg += f" ({self.suppressed} more in the last {self.interval_s:g}s not logged)"
        log.warning(msg, *args)
        self.suppressed = 0
        self.next_at = now + self.interval_s
        return True


def _message_name(deserializer) -> str:
    owner = getattr(deserializer, "__self__", None)  # Message.FromString is bound to its class
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", "") or "protobuf"


def _guard_deserializer(deserializer):
    name = _message_name(deserializer)

    def guarded(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError and whatever a parser raises on bad bytes
            return Undecodable(len(data), exc, name)

    return guarded


class DecodeGuardInterceptor(grpc.aio.ServerInterceptor):
    """Undecodable requests get INVALID_ARGUMENT and a throttled log line instead of
    UNKNOWN and a traceback. Handlers whose behaviour is a plain (sync) function are
    passed through unchanged."""

    def __init__(self, log_interval_s: float = 10.0):
        self.log = ThrottledLog(log_interval_s)
        self._cache: dict[str, tuple] = {}  # method -> (handler, guarded handler)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        cached = self._cache.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        guarded = self._guard(handler, details.method)
        self._cache[details.method] = (handler, guarded)  # only registered methods get here
        return guarded

    async def refuse(self, context, request: Undecodable, method: str) -> None:
        self.log.warning(
            "undecodable request method=%s peer=%s bytes=%d error=%s",
            method,
            context.peer(),
            request.size,
            type(request.error).__name__,
        )
        message = f"the request bytes are not a valid {request.message_name} message"
        await context.abort(
            *convert.error_status(grpc.StatusCode.INVALID_ARGUMENT, message, REASON)
        )

    def _guard(self, handler, method: str):
        if handler.request_streaming:
            inner = handler.stream_stream if handler.response_streaming else handler.stream_unary
        else:
            inner = handler.unary_stream if handler.response_streaming else handler.unary_unary
        if inspect.isasyncgenfunction(inner):
            behavior = self._async_gen(inner, method, handler.request_streaming)
        elif inspect.iscoroutinefunction(inner):
            behavior = self._coroutine(inner, method, handler.request_streaming)
        else:
            return handler
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        return make(
            behavior,
            request_deserializer=_guard_deserializer(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _checked(self, requests, context, method: str):
        async def checked():
            async for request in requests:
                if isinstance(request, Undecodable):
                    await self.refuse(context, request, method)
                yield request

        return checked()

    def _coroutine(self, inner, method: str, request_streaming: bool):
        async def behavior(request, context):
            if request_streaming:
                return await inner(self._checked(request, context, method), context)
            if isinstance(request, Undecodable):
                await self.refuse(context, request, method)
            return await inner(request, context)

        return behavior

    def _async_gen(self, inner, method: str, request_streaming: bool):
        async def behavior(request, context):
            if request_streaming:
                request = self._checked(request, context, method)
            elif isinstance(request, Undecodable):
                await self.refuse(context, request, method)
            replies = inner(request, context)
            try:
                async for reply in replies:
                    yield reply
            finally:
                await replies.aclose()

        return behavior
