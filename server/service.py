"""The request handling behind every RPC of LoraPoolService, free of any transport.

Each method takes the request message, calls the engine and returns the reply
message (or an async iterator of them); failures are raised as typed
`LoraPoolError`s, which a front end maps to its status (`lorapool.convert.
status_for_error` gives the gRPC status with its ErrorInfo). Metrics and the
one-line-per-request log live here too, so every front end (grpc.aio in
`server/transport/`, or another host) reports the same figures.

Cancellation (a client that went away, a deadline) arrives as CancelledError at
the caller's await; `Engine.generate` frees the request's pages in its `finally`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator

from lorapool import convert
from lorapool.errors import InvalidRequest, Loading, LoraPoolError, SourceNotAllowed
from lorapool.types import GenerationRequest, TokenEvent
from lorapool.v1 import lorapool_pb2 as pb

from .metrics import Metrics

log = logging.getLogger("lorapool.service")

# admin RPC -> the `operation` label of lorapool_adapter_admin_calls_total
_ADMIN_OPERATIONS = {"LoadAdapter": "load", "UnloadAdapter": "unload"}


def printable(value: str, limit: int = 80) -> str:
    """A client-supplied value as one safe log token: control characters escaped
    (no forged log lines), long values cut."""
    text = value[:limit].encode("unicode_escape").decode("ascii")
    return text + ("..." if len(value) > limit else "")


class LoraPoolService:
    """One instance per engine. `engine` is None while the model loads: every call
    is then refused with UNAVAILABLE."""

    def __init__(
        self, engine=None, metrics: Metrics | None = None, source_policy: SourcePolicy | None = None
    ):
        self.engine = engine
        self.metrics = metrics or Metrics()
        # LoadAdapter sources allowed; None: the engine's adapter roots and hf://
        self.source_policy = source_policy

    # -- inference ------------------------------------------------------------------------
    async def generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        req = self._request(request, "Generate")
        async for event in self._events(req, "Generate"):
            yield convert.event_to_proto(event, req.request_id)

    async def complete(self, request: pb.CompleteRequest) -> pb.CompleteResponse:
        req = self._request(request, "Complete")
        events = [e async for e in self._events(req, "Complete")]
        return convert.events_to_complete(events, req.request_id)

    async def tokenize(self, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        engine = self._ready("Tokenize")
        with self._rejections("Tokenize"):
            chat = None
            if request.HasField("chat"):  # rendered as Generate renders a chat
                if request.text:
                    raise InvalidRequest("set text or chat, not both", field="chat")
                chat = request.chat.messages
            ids, tokens = await engine.tokenize(request.text, request.return_tokens, chat=chat)
        return pb.TokenizeResponse(token_ids=ids, tokens=tokens)

    # -- adapters ---------------------------------------------------------------------------
    async def load_adapter(self, request: pb.LoadAdapterRequest) -> pb.LoadAdapterResponse:
        engine = self._ready("LoadAdapter")
        with self._rejections("LoadAdapter", request.adapter_id):
            if request.source:  # refused before any source is asked or any adapter replaced
                if self.source_policy is None:
                    self.source_policy = SourcePolicy.default(engine.config.adapter_dirs)
                self.source_policy.check(request.source)
            info = await engine.load_adapter(
                request.adapter_id, request.source or None, request.pin
            )
        self.metrics.admin_calls.labels("load", "OK").inc()
        log.info(
            "adapter_loaded adapter=%s state=%s load_ms=%.1f",
            printable(info.adapter_id),
            info.state.name,
            info.load_ms,
        )
        return pb.LoadAdapterResponse(adapter=convert.adapter_info_to_proto(info))

    async def unload_adapter(self, request: pb.UnloadAdapterRequest) -> pb.UnloadAdapterResponse:
        engine = self._ready("UnloadAdapter")
        with self._rejections("UnloadAdapter", request.adapter_id):
            await engine.unload_adapter(request.adapter_id)
        self.metrics.admin_calls.labels("unload", "OK").inc()
        log.info("adapter_unloaded adapter=%s", printable(request.adapter_id))
        return pb.UnloadAdapterResponse()

    async def list_adapters(self, request: pb.ListAdaptersRequest) -> pb.ListAdaptersResponse:
        infos = self._ready("ListAdapters").list_adapters()
        return pb.ListAdaptersResponse(adapters=[convert.adapter_info_to_proto(i) for i in infos])

    # -- observability ----------------------------------------------------------------------
    async def get_stats(self, request: pb.GetStatsRequest) -> pb.GetStatsResponse:
        return convert.stats_to_proto(self._ready("GetStats").stats())

    async def get_model_info(self, request: pb.GetModelInfoRequest) -> pb.GetModelInfoResponse:
        return convert.model_info_to_proto(self._ready("GetModelInfo").model_info())

    # -- helpers ----------------------------------------------------------------------------
    def _ready(self, method: str):
        if self.engine is None:
            exc = Loading("the model is still loading; retry shortly")
            self._rejected(exc, method)
            raise exc
        return self.engine

    def _request(self, request, method: str) -> GenerationRequest:
        self._ready(method)
        with self._rejections(method, request.adapter_id, request.request_id):
            return convert.request_from_proto(request)

    @contextlib.contextmanager
    def _rejections(self, method: str, adapter_id: str = "", request_id: str = ""):
        """A LoraPoolError raised inside is counted and logged as a refused call,
        then propagates unchanged."""
        try:
            yield
        except LoraPoolError as exc:
            self._rejected(exc, method, adapter_id, request_id)
            raise

    def _label(self, adapter_id: str) -> str:
        """Metric label for an adapter: ids no source knows share one label, so that
        clients sending random ids cannot grow the metric series without bound."""
        if not adapter_id:
            return "base"
        if self.engine is not None and self.engine.knows_adapter(adapter_id):
            return adapter_id
        return "unknown"

    def _rejected(
        self, exc: LoraPoolError, method: str, adapter_id="", request_id="", count=True
    ) -> None:
        """Log a refused call; count it unless the caller counts it itself."""
        if count:
            self.metrics.requests.labels(self._label(adapter_id), method, exc.status).inc()
        if method in _ADMIN_OPERATIONS:
            self.metrics.admin_calls.labels(_ADMIN_OPERATIONS[method], exc.status).inc()
        log.info(
            "rejected request_id=%s method=%s adapter=%s status=%s reason=%s msg=%s",
            printable(request_id),
            method,
            printable(adapter_id),
            exc.status,
            exc.reason,
            printable(str(exc), 300),
        )

    async def _events(self, req: GenerationRequest, method: str) -> AsyncIterator[TokenEvent]:
        """The engine's events for req, observed: TTFT, ITL, tokens, one log line."""
        adapter = self._label(req.adapter_id)
        start = time.monotonic()
        last = None
        status, tokens, usage = "OK", 0, None
        try:
            async for event in self.engine.generate(req):
                now = time.monotonic()
                if event.token_ids:
                    if last is None:
                        self.metrics.ttft.observe(now - start)
                        self.metrics.adapter_ttft.labels(adapter).observe(now - start)
                    else:
                        self.metrics.itl.observe(now - last)
                    last = now
                    tokens += len(event.token_ids)
                usage = event.usage or usage
                yield event
        except LoraPoolError as exc:
            status = exc.status
            self._rejected(exc, method, req.adapter_id, req.request_id, count=False)
            raise
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        finally:
            self.metrics.requests.labels(adapter, method, status).inc()
            self.metrics.tokens.labels(adapter).inc(tokens)
            if status == "OK":
                self.metrics.e2e.observe(time.monotonic() - start)
            if usage is not None:
                self.metrics.prompt_tokens.labels(adapter).inc(usage.prompt_tokens)
                self.metrics.queue_time.observe(usage.queue_ms / 1000)
            log.info(
                "request request_id=%s method=%s adapter=%s status=%s tokens=%d ttft_ms=%.1f "
                "total_ms=%.1f",
                printable(req.request_id),
                method,
                adapter,
                status,
                tokens,
                usage.ttft_ms if usage else -1.0,
                (time.monotonic() - start) * 1000,
            )


# -- LoadAdapter sources -----------------------------------------------------------------------


def _scheme(uri: str) -> str:
    """The scheme SourceRegistry.fetch picks for uri ("file" for a plain path)."""
    return uri.split("://", 1)[0] if "://" in uri else "file"


def _local_path(uri: str) -> str:
    """The absolute, lexically normalised path LocalSource would read for uri; no
    filesystem access, so nothing is read before the check."""
    return os.path.normpath(os.path.abspath(os.path.expanduser(uri.removeprefix("file://"))))


class SourcePolicy:
    """Which LoadAdapter sources may be read. A rule is a path prefix (a directory:
    it allows itself and everything below it, after `..` and `~` are resolved), a
    URI scheme (`hf://` allows every hub repo) or a scheme with a prefix (`hf://org/`
    allows one org, `hf://org/repo` one repo at any revision). `file://` as a rule
    allows every local path. No rules: every explicit source is refused.

    `check` raises SourceNotAllowed before any source is asked; its message names
    the flag and the kinds of rules, never a server path."""

    FLAG = "--adapter-source-allow"

    def __init__(self, rules: list[str] | tuple[str, ...] = ()):
        self.paths: list[str] = []
        self.uris: list[str] = []
        for rule in rules:
            rule = rule.strip()
            if not rule:
                raise ValueError(f"{self.FLAG}: empty rule")
            if "://" in rule and _scheme(rule) != "file":
                scheme, _, rest = rule.partition("://")
                if not scheme or any(p in (".", "..") for p in rest.split("/")):
                    raise ValueError(f"{self.FLAG}: bad rule {rule!r}")
                self.uris.append(rule)
            elif rule == "file://":
                self.paths.append(os.path.sep)
            else:
                self.paths.append(_local_path(rule))

    @classmethod
    def default(cls, roots: list[str | os.PathLike] | tuple = ()) -> SourcePolicy:
        """The adapter root directories and the Hugging Face Hub."""
        return cls([*(str(r) for r in roots), "hf://"])

    def allows(self, source: str) -> bool:
        scheme = _scheme(source)
        if scheme == "file":
            path = _local_path(source)
            return any(
                path == p or path.startswith(p.rstrip(os.path.sep) + os.path.sep)
                for p in self.paths
            )
        rest = source[len(scheme) + 3 :]
        if any(part in (".", "..") for part in rest.replace("@", "/").split("/")):
            return False  # no rule may be escaped by a relative segment
        for rule in self.uris:
            if rule.endswith("/") and source.startswith(rule):
                return True
            if source == rule or (source.startswith(rule) and source[len(rule)] in "/@"):
                return True
        return False

    def describe(self) -> str:
        """The rules as a client may see them: schemes verbatim, paths counted."""
        parts = list(self.uris)
        if self.paths:
            n = len(self.paths)
            parts.append(f"{n} local director{'y' if n == 1 else 'ies'}")
        return ", ".join(parts) or "none"

    def check(self, source: str) -> None:
        if not self.allows(source):
            shown = source if len(source) <= 200 else source[:200] + "..."
            raise SourceNotAllowed(
                f"source {shown!r} is not allowed by this server's {self.FLAG} rules "
                f"(allowed: {self.describe()}); ask the operator to allow it",
                field="source",
            )
