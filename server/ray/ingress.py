"""The ingress behind `lorapool serve-ray`: the servicer of
lorapool.v1.LoraPoolService (and grpc.health.v1) on Serve's gRPC proxy.

Generate/Complete go to the engine deployment with
`multiplexed_model_id=adapter_id` (ReplicaRouter: affinity with bounded loads);
without an adapter, or with routing "random", a plain handle call (the less
loaded of two random replicas). The request travels whole: the ingress reads only
`adapter_id`. LoadAdapter/UnloadAdapter reach every replica; ListAdapters and
GetStats merge every replica's answer. An ErrorReply is written onto the call's
grpc_context, which Serve's proxy copies onto the real call with the reply it
travels with. With API keys set, every LoraPoolService method first applies the
rules of `lorapool serve` (transport.auth.authorize) to the caller's metadata; a
refusal travels the same way as an ErrorReply. `drain` (what SIGTERM calls) turns
health NOT_SERVING, refuses new work and lets every replica finish its requests."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from lorapool.errors import Draining
from lorapool.server.ray.engine import ErrorReply
from lorapool.server.ray.fleet import merge_adapters, sum_stats
from lorapool.server.ray.router import routable_replicas
from lorapool.server.transport.auth import ApiKeys, authorize
from lorapool.v1 import lorapool_pb2 as pb

log = logging.getLogger("lorapool.ray")

SERVICE = pb.DESCRIPTOR.services_by_name["LoraPoolService"].full_name
BROADCAST_TIMEOUT_S = 120.0
ROUTINGS = ("affinity", "random")
REFUSED_WHILE_DRAINING = {"Generate", "Complete", "Tokenize", "LoadAdapter", "UnloadAdapter"}
WATCH_PERIOD_S = 1.0


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
        unloaded = [r for _, r in replies if not isinstance(r, ErrorReply)]
        if unloaded:  # a replica that did not hold it answers NOT_FOUND: not an error here
            replies = [(i, r) for i, r in replies if getattr(r, "code", "") != "NOT_FOUND"]
        error = _first_error(replies)
        return _unwrap(error, grpc_context, pb.UnloadAdapterResponse) if error else unloaded[0]

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

    async def metrics(self, timeout_s: float = BROADCAST_TIMEOUT_S) -> list[tuple[str, bytes]]:
        """(replica id, Prometheus exposition) of every engine replica that answers
        within timeout_s (server/ray/metrics.py labels and serves them)."""
        replicas = await self._replicas()

        async def one(replica: str):
            try:
                async with asyncio.timeout(timeout_s):
                    return await self.engine.metrics_text.remote(replica=replica)
            except Exception as exc:  # left out of this scrape, the others still served
                log.warning("metrics of replica %s: %s", replica, exc)
                return None

        replies = await asyncio.gather(*(one(r) for r in replicas))
        return [reply for reply in replies if reply is not None]

    async def _replicas(self) -> list[str]:
        """The engine replicas the router can reach now. Its view, not the actors
        Ray lists: a call pinned to a replica the router does not know yet (or
        any more) would wait for it. Before the router exists, one call creates it
        and waits for a first replica."""
        deployment = self.engine.deployment_id
        replicas = routable_replicas(deployment.app_name, deployment.name)
        if replicas is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(BROADCAST_TIMEOUT_S):
                    await self.engine.whoami.remote()
            replicas = routable_replicas(deployment.app_name, deployment.name)
        return list(replicas or ())

    async def _broadcast(
        self, method: str, *args, timeout_s: float = BROADCAST_TIMEOUT_S
    ) -> list[tuple[str, Any]]:
        """(replica id, reply or ErrorReply) from every engine replica."""
        replicas = await self._replicas()
        if not replicas:
            return [("", ErrorReply.of(Draining("no engine replica is running yet")))]
        calls = [getattr(self.engine, method).remote(*args, replica=r) for r in replicas]
        try:
            async with asyncio.timeout(timeout_s):
                return list(await asyncio.gather(*calls))
        except TimeoutError:
            exc = Draining(f"not every engine replica answered within {timeout_s:.0f}s")
            return [("", ErrorReply.of(exc))]


def _unwrap(reply, grpc_context, empty):
    if isinstance(reply, ErrorReply):
        reply.set_on(grpc_context)
        return empty()
    return reply


def _first_error(replies) -> ErrorReply | None:
    return next((r for _, r in replies if isinstance(r, ErrorReply)), None)
