"""The two Serve deployments behind `lorapool serve-ray`.

LoraPoolEngine: each replica builds its own Engine and LoraPoolService (the same
core as `lorapool serve`). A `@serve.multiplexed` loader, keyed by adapter id,
loads the adapter into the replica's engine, so Serve's router learns which
replica holds which adapter and sends the next request for it there. A
LoraPoolError never leaves a replica as an exception: it comes back as an
ErrorReply (status code, details and the trailing metadata with the
google.rpc.ErrorInfo), because Serve keeps only the code and details of a raised
error and drops its trailers.

LoraPoolIngress: the servicer of lorapool.v1.LoraPoolService behind Serve's gRPC
proxy. Generate/Complete with an adapter go to the engine with
`multiplexed_model_id=adapter_id` (affinity); without one, a plain handle call
(the least loaded of two random replicas). LoadAdapter/UnloadAdapter reach every
replica; ListAdapters and GetStats merge every replica's answer. An ErrorReply is
written onto the call's grpc_context, which Serve's proxy copies onto the real
call with the reply it travels with. With API keys set, every LoraPoolService
method first applies the rules of `lorapool serve` (transport.auth.authorize) to
the caller's metadata; a refusal travels the same way as an ErrorReply.

Calls that must reach one given replica (the admin broadcast) carry a `replica`
keyword; ReplicaRouter, the engine deployment's request router, sends such a call
to that replica and every other call the default way."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from lorapool import convert
from lorapool.errors import Draining, LoraPoolError
from lorapool.server.metrics import Metrics
from lorapool.server.ray.fleet import merge_adapters, sum_stats
from lorapool.server.ray.router import BOUND, FLOOR, ReplicaRouter
from lorapool.server.service import LoraPoolService, SourcePolicy
from lorapool.server.transport.auth import ApiKeys, authorize
from lorapool.v1 import lorapool_pb2 as pb

if TYPE_CHECKING:
    from lorapool.server.engine.config import EngineConfig

log = logging.getLogger("lorapool.ray")

APP_NAME = "lorapool"
ENGINE_NAME = "LoraPoolEngine"
INGRESS_NAME = "LoraPoolIngress"
SERVICER_FUNCTIONS = [
    "lorapool.server.ray.proxy.cancel_streams_on_disconnect",  # first: wraps what follows
    "lorapool.v1.lorapool_pb2_grpc.add_LoraPoolServiceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
SERVICE = pb.DESCRIPTOR.services_by_name["LoraPoolService"].full_name
REPLICA_PREFIX = "SERVE_REPLICA::"  # Serve's actor names: SERVE_REPLICA::app#deployment#id
BROADCAST_TIMEOUT_S = 120.0
ROUTINGS = ("affinity", "random")
REFUSED_WHILE_DRAINING = {"Generate", "Complete", "Tokenize", "LoadAdapter", "UnloadAdapter"}
WATCH_PERIOD_S = 1.0


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
                    log.info("replica %s serving", self.replica_id)
        return self.service

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


# -- the ingress -----------------------------------------------------------------------------


class LoraPoolIngress:
    """lorapool.v1.LoraPoolService on Serve's gRPC proxy (methods named as the RPCs)."""

    def __init__(self, engine, api_keys: ApiKeys | None = None, routing: str = "affinity"):
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, not {routing!r}")
        self.engine = engine  # DeploymentHandle of LoraPoolEngine
        self.api_keys = api_keys  # None: every RPC open, as `lorapool serve` without keys
        self.routing = routing
        self.draining = False
        self.inflight = 0  # Generate and Complete calls under way

    def _refused(self, name: str, grpc_context) -> bool:
        """Apply the API-key rules to the call of RPC `name`, then refuse new work
        while draining; a refusal is written onto the grpc_context (status and
        ErrorInfo) and True returned."""
        refusal = None
        if self.api_keys is not None:
            metadata = grpc_context.invocation_metadata()
            refusal = authorize(f"/{SERVICE}/{name}", metadata, self.api_keys)
        if refusal is not None:
            code, details, trailers = refusal.status()
            ErrorReply(code.name, details, tuple(trailers)).set_on(grpc_context)
            return True
        if self.draining and name in REFUSED_WHILE_DRAINING:
            ErrorReply.of(Draining("the server is shutting down")).set_on(grpc_context)
            return True
        return False

    def _route(self, adapter_id: str):
        """affinity: the adapter id as Serve's multiplexed model id; random: by load
        only (the replicas' power of two choices), for comparison."""
        if adapter_id and self.routing == "affinity":
            return self.engine.options(multiplexed_model_id=adapter_id)
        return self.engine

    @contextlib.contextmanager
    def _counted(self):
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    async def drain(self, grace_s: float) -> int:
        """Health NOT_SERVING and new work refused from now; every engine replica
        drains (in-flight requests finish within grace_s, the rest are cancelled),
        then the ingress waits for its own streams to end. Returns the requests
        still under way at the end (0 after a clean drain)."""
        self.draining = True
        log.info("draining for up to %.0fs (%d calls in flight)", grace_s, self.inflight)
        await self._broadcast("drain", grace_s, timeout_s=grace_s + BROADCAST_TIMEOUT_S)
        deadline = asyncio.get_running_loop().time() + 5.0
        while self.inflight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        return self.inflight

    # -- inference ----------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, grpc_context):
        if self._refused("Generate", grpc_context):
            yield pb.GenerateResponse()  # the context travels beside a message (see below)
            return
        stream = self._route(request.adapter_id).options(stream=True).generate.remote(request)
        finished = False
        with self._counted():
            try:
                async for reply in stream:
                    if isinstance(reply, ErrorReply):
                        # Serve carries a context only beside a message: the error
                        # travels with one empty GenerateResponse, then the stream ends.
                        reply.set_on(grpc_context)
                        finished = True
                        yield pb.GenerateResponse()
                        return
                    yield reply
                finished = True
            finally:
                if not finished:  # cancelled or closed early: stop the engine replica too
                    stream.cancel()

    async def Complete(self, request: pb.CompleteRequest, grpc_context):
        if self._refused("Complete", grpc_context):
            return pb.CompleteResponse()
        with self._counted():
            _, reply = await self._route(request.adapter_id).complete.remote(request)
        return _unwrap(reply, grpc_context, pb.CompleteResponse)

    async def Tokenize(self, request: pb.TokenizeRequest, grpc_context):
        if self._refused("Tokenize", grpc_context):
            return pb.TokenizeResponse()
        _, reply = await self.engine.tokenize.remote(request)
        return _unwrap(reply, grpc_context, pb.TokenizeResponse)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, grpc_context):
        if self._refused("GetModelInfo", grpc_context):
            return pb.GetModelInfoResponse()
        _, reply = await self.engine.get_model_info.remote()
        return _unwrap(reply, grpc_context, pb.GetModelInfoResponse)

    # -- grpc.health.v1 (the proxy dispatches by method name: Health/* lands here) --------
    async def _health(self):
        """SERVING once an engine replica answers within 5 s, NOT_SERVING while
        draining or when none does (every service name gets the same answer)."""
        from grpc_health.v1 import health_pb2

        status = health_pb2.HealthCheckResponse.NOT_SERVING
        if not self.draining:
            try:
                async with asyncio.timeout(5.0):
                    await self.engine.whoami.remote()
                if not self.draining:
                    status = health_pb2.HealthCheckResponse.SERVING
            except Exception:
                pass
        return health_pb2.HealthCheckResponse(status=status)

    async def Check(self, request, grpc_context):
        return await self._health()

    async def Watch(self, request, grpc_context):
        """The status now, then each change (checked every WATCH_PERIOD_S and at
        once when a drain starts), until the client leaves."""
        last = None
        while True:
            reply = await self._health()
            if reply.status != last:
                last = reply.status
                yield reply
            for _ in range(int(WATCH_PERIOD_S / 0.05)):
                if self.draining and last != reply.NOT_SERVING:
                    break
                await asyncio.sleep(0.05)

    # -- fleet-wide ---------------------------------------------------------------------
    async def LoadAdapter(self, request: pb.LoadAdapterRequest, grpc_context):
        if self._refused("LoadAdapter", grpc_context):
            return pb.LoadAdapterResponse()
        replies = await self._broadcast("load_adapter", request)
        error = _first_error(replies)
        if error is not None:
            return _unwrap(error, grpc_context, pb.LoadAdapterResponse)
        replica, reply = replies[0]
        reply.adapter.replicas[:] = sorted(r for r, _ in replies)
        return reply

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, grpc_context):
        if self._refused("UnloadAdapter", grpc_context):
            return pb.UnloadAdapterResponse()
        replies = await self._broadcast("unload_adapter", request)
        error = _first_error(replies)
        return _unwrap(error, grpc_context, pb.UnloadAdapterResponse) if error else replies[0][1]

    async def ListAdapters(self, request: pb.ListAdaptersRequest, grpc_context):
        if self._refused("ListAdapters", grpc_context):
            return pb.ListAdaptersResponse()
        replies = await self._broadcast("list_adapters")
        error = _first_error(replies)
        if error is not None:
            return _unwrap(error, grpc_context, pb.ListAdaptersResponse)
        return merge_adapters(replies)

    async def GetStats(self, request: pb.GetStatsRequest, grpc_context):
        if self._refused("GetStats", grpc_context):
            return pb.GetStatsResponse()
        replies = await self._broadcast("get_stats")
        error = _first_error(replies)
        if error is not None:
            return _unwrap(error, grpc_context, pb.GetStatsResponse)
        return sum_stats(replies)

    async def _broadcast(
        self, method: str, *args, timeout_s: float = BROADCAST_TIMEOUT_S
    ) -> list[tuple[str, Any]]:
        """(replica id, reply or ErrorReply) from every engine replica."""
        replicas = engine_replicas()
        if not replicas:
            return [("", ErrorReply.of(Draining("no engine replica is running yet")))]
        calls = [getattr(self.engine, method).remote(*args, replica=r) for r in replicas]
        try:
            async with asyncio.timeout(timeout_s):
                return list(await asyncio.gather(*calls))
        except TimeoutError:
            exc = Draining(f"not every engine replica answered within {timeout_s:.0f}s")
            return [("", ErrorReply.of(exc))]


def engine_replicas(app: str = APP_NAME) -> list[str]:
    """The unique ids of the engine deployment's live replicas (Serve names each
    replica actor SERVE_REPLICA::app#deployment#id)."""
    prefix = f"{REPLICA_PREFIX}{app}#{ENGINE_NAME}#"
    names = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"][len(prefix) :] for a in names if a["name"].startswith(prefix))


def _unwrap(reply, grpc_context, empty):
    if isinstance(reply, ErrorReply):
        reply.set_on(grpc_context)
        return empty()
    return reply


def _first_error(replies) -> ErrorReply | None:
    return next((r for _, r in replies if isinstance(r, ErrorReply)), None)


# -- the application -------------------------------------------------------------------------


def build_app(
    engine_config: EngineConfig,
    replicas: int,
    replica_cpus: float = 1.0,
    ingress_cpus: float = 0.1,
    source_allow: list[str] | None = None,
    api_key: str | None = None,
    admin_api_key: str | None = None,
    routing: str = "affinity",
    load_bound: float = BOUND,
    load_floor: int = FLOOR,
):
    """The Serve application: the ingress bound to `replicas` engine replicas; with
    an inference or an admin key, the ingress checks them as `lorapool serve` does
    (the keys travel in the ingress's init arguments, held by Serve's controller).
    routing "random" ignores adapters when choosing a replica (for comparison);
    load_bound and load_floor set ReplicaRouter's cap on a holder's in-flight."""
    keys = ApiKeys.of(api_key, admin_api_key) if api_key or admin_api_key else None
    engine = serve.deployment(
        LoraPoolEngine,
        name=ENGINE_NAME,
        num_replicas=replicas,
        ray_actor_options={"num_cpus": replica_cpus},
        max_ongoing_requests=max(engine_config.max_running, 1) + 64,
        request_router_config=RequestRouterConfig(
            request_router_class=ReplicaRouter,
            request_router_kwargs={"bound": load_bound, "floor": load_floor},
        ),
        health_check_period_s=5,
    )
    ingress = serve.deployment(
        LoraPoolIngress,
        name=INGRESS_NAME,
        num_replicas=1,
        ray_actor_options={"num_cpus": ingress_cpus},
        max_ongoing_requests=100_000,
    )
    return ingress.bind(engine.bind(engine_config, source_allow), keys, routing)
