"""The engine deployment behind `lorapool serve-ray`: each replica builds its own
Engine and LoraPoolService (the same core as `lorapool serve`). A
`@serve.multiplexed` loader, keyed by adapter id, loads the adapter into the
replica's engine, so Serve's router learns which replica holds which adapter. A
LoraPoolError never leaves a replica as an exception: it comes back as an
ErrorReply (status code, details and the trailing metadata with the
google.rpc.ErrorInfo), because Serve keeps only the code and details of a raised
error and drops its trailers. Admin calls carry a `replica` keyword that
ReplicaRouter uses to pin them to one replica."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import generate_latest
from ray import serve

from lorapool import convert
from lorapool.errors import LoraPoolError
from lorapool.server.metrics import Metrics
from lorapool.server.service import LoraPoolService, SourcePolicy
from lorapool.types import AdapterState
from lorapool.v1 import lorapool_pb2 as pb

if TYPE_CHECKING:
    from lorapool.server.engine.config import EngineConfig

log = logging.getLogger("lorapool.ray")


# -- errors across the actor boundary --------------------------------------------------------


@dataclass(frozen=True)
class ErrorReply:
    """A LoraPoolError as plain data: what `convert.status_for_error` gives."""

    code: str  # grpc.StatusCode name
    details: str
    metadata: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, exc: LoraPoolError) -> ErrorReply:
        code, details, metadata = convert.status_for_error(exc)
        return cls(code.name, details, tuple(metadata))

    def set_on(self, grpc_context) -> None:
        """Write the status onto Serve's gRPC context (kept beside its own
        request_id trailer)."""
        grpc_context.set_code(grpc.StatusCode[self.code])
        grpc_context.set_details(self.details)
        kept = [(k, v) for k, v in grpc_context.trailing_metadata() if k != "request_id"]
        grpc_context.set_trailing_metadata(kept + list(self.metadata))


# -- the engine deployment -------------------------------------------------------------------


# -- what the replica advertises to Serve's router ---------------------------------------------

MULTIPLEX_ATTR = "__serve_multiplex_wrapper"  # where @serve.multiplexed keeps its cache
RESIDENCY_PERIOD_S = 0.5
HELD_STATES = (AdapterState.LOADING, AdapterState.HOST, AdapterState.DEVICE)


def engine_holdings(engine) -> set[str]:
    """Adapters the engine holds or will hold: weights loading, in host memory or in
    pool pages, and every adapter of a running or waiting request (the engine
    reloads an evicted adapter for its waiting requests)."""
    held = {i.adapter_id for i in engine.list_adapters() if i.state in HELD_STATES}
    scheduler = getattr(engine, "scheduler", None)
    if scheduler is not None:
        seqs = [*list(scheduler.running), *list(scheduler.waiting)]
        held |= {s.adapter_id for s in seqs if s.adapter_id}
    return held


def prune_advertised(multiplexer, held: set[str]) -> list[str]:
    """Drop from Serve's multiplex cache (what the replica advertises to the router)
    the adapters the engine no longer holds, and have the cache report its new set;
    returns the ids dropped. Ids the cache is loading stay. The entries are only
    forgotten: the engine is not touched, and a later request for such an adapter
    runs the loader again."""
    loading = getattr(multiplexer, "_model_load_tasks", set())
    dropped = [a for a in list(multiplexer.models) if a not in held and a not in loading]
    for adapter in dropped:
        multiplexer.models.pop(adapter, None)
    if dropped:
        multiplexer._push_multiplexed_replica_info = True  # reported at its next push
    return dropped


class AdapterHandle:
    """What the multiplexed loader returns: the adapter is in the engine."""

    def __init__(self, adapter_id: str):
        self.adapter_id = adapter_id


class LoraPoolEngine:
    """One engine per replica; every method answers replies or ErrorReplies."""

    def __init__(self, engine_config: EngineConfig, source_allow: list[str] | None = None):
        from lorapool.server.engine.engine import Engine

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.engine = Engine(engine_config)
        self.metrics = Metrics()
        policy = SourcePolicy(source_allow) if source_allow is not None else None
        self.service = LoraPoolService(None, self.metrics, policy)
        self._start_lock = asyncio.Lock()

    async def _ready(self) -> LoraPoolService:
        """The service, the engine started on first use (Serve builds the replica
        outside its event loop)."""
        if self.service.engine is None:
            async with self._start_lock:
                if self.service.engine is None:
                    await self.engine.start()
                    self.metrics.attach(self.engine)
                    self.service.engine = self.engine
                    self._follower = asyncio.get_running_loop().create_task(
                        self._follow_residency()
                    )
                    log.info("replica %s serving", self.replica_id)
        return self.service

    async def _follow_residency(self) -> None:
        """Keep what this replica advertises to Serve's router (the multiplex
        cache's ids) equal to what its engine holds: the engine's tiers evict and
        reload adapters on their own, which Serve's cache never hears of."""
        while True:
            await asyncio.sleep(RESIDENCY_PERIOD_S)
            self.follow_residency()

    def follow_residency(self) -> list[str]:
        """One pass of _follow_residency; returns the ids no longer advertised."""
        multiplexer = getattr(self, MULTIPLEX_ATTR, None)
        if multiplexer is None or self.service.engine is None:
            return []
        try:
            dropped = prune_advertised(multiplexer, engine_holdings(self.engine))
        except Exception:  # the next pass tries again
            log.exception("replica %s: following the engine's adapters failed", self.replica_id)
            return []
        if dropped:
            log.debug("replica %s no longer advertises %s", self.replica_id, dropped)
        return dropped

    async def advertised(self, replica: str = "") -> tuple[str, list[str]]:
        """The adapter ids this replica advertises to Serve's router now."""
        multiplexer = getattr(self, MULTIPLEX_ATTR, None)
        return self.replica_id, sorted(multiplexer.models) if multiplexer is not None else []

    async def check_health(self) -> None:
        await self._ready()

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None and self.service.engine is not None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            loop.create_task(engine.stop())

    @serve.multiplexed(max_num_models_per_replica=-1)
    async def adapter(self, adapter_id: str) -> AdapterHandle:
        """Load the adapter into this replica's engine (host memory; pages on use).
        Raises the LoraPoolError of a failed load."""
        service = await self._ready()
        await service.load_adapter(pb.LoadAdapterRequest(adapter_id=adapter_id))
        return AdapterHandle(adapter_id)

    async def _with_adapter(self, adapter_id: str) -> LoraPoolService:
        service = await self._ready()
        if adapter_id:
            await self.adapter(adapter_id)
        return service

    # -- inference ----------------------------------------------------------------------
    async def generate(self, request: pb.GenerateRequest):
        try:
            service = await self._with_adapter(request.adapter_id)
            # closed here, whether the stream ends, fails or is cancelled: the
            # engine aborts the request and frees its pages at once
            async with contextlib.aclosing(service.generate(request)) as replies:
                async for reply in replies:
                    yield reply
        except LoraPoolError as exc:
            yield ErrorReply.of(exc)

    async def complete(self, request: pb.CompleteRequest):
        return await self._call(self._complete(request))

    async def _complete(self, request: pb.CompleteRequest):
        service = await self._with_adapter(request.adapter_id)
        return await service.complete(request)

    async def tokenize(self, request: pb.TokenizeRequest):
        return await self._call(self._service_call("tokenize", request))

    # -- admin and observability: `replica` pins the call to this replica ----------------
    async def load_adapter(self, request: pb.LoadAdapterRequest, replica: str = ""):
        return await self._call(self._service_call("load_adapter", request))

    async def unload_adapter(self, request: pb.UnloadAdapterRequest, replica: str = ""):
        return await self._call(self._service_call("unload_adapter", request))

    async def list_adapters(self, replica: str = ""):
        return await self._call(self._service_call("list_adapters", pb.ListAdaptersRequest()))

    async def get_stats(self, replica: str = ""):
        return await self._call(self._service_call("get_stats", pb.GetStatsRequest()))

    async def get_model_info(self):
        return await self._call(self._service_call("get_model_info", pb.GetModelInfoRequest()))

    async def metrics_text(self, replica: str = "") -> tuple[str, bytes]:
        """This replica's metrics (those of `lorapool serve`) in Prometheus text."""
        await self._ready()
        return self.replica_id, generate_latest(self.metrics.registry)

    async def whoami(self, replica: str = "") -> str:
        return self.replica_id

    async def drain(self, grace_s: float, replica: str = ""):
        """Refuse new requests, let in-flight ones finish within grace_s, cancel the rest."""
        service = await self._ready()
        await service.engine.drain(grace_s)
        return self.replica_id, None

    async def _service_call(self, method: str, request):
        service = await self._ready()
        return await getattr(service, method)(request)

    async def _call(self, coro):
        """(replica id, reply) or (replica id, ErrorReply)."""
        try:
            return self.replica_id, await coro
        except LoraPoolError as exc:
            return self.replica_id, ErrorReply.of(exc)
