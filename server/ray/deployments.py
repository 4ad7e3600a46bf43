"""The Serve application behind `lorapool serve-ray`: LoraPoolIngress (server/ray/
ingress.py, one replica, the gRPC servicer) bound to N LoraPoolEngine replicas
(server/ray/engine.py), routed by ReplicaRouter (server/ray/router.py), with the
servicer functions Serve's gRPC proxy registers (server/ray/proxy.py first)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ray import serve
from ray.serve.config import RequestRouterConfig

from lorapool.server.ray.engine import ErrorReply, LoraPoolEngine
from lorapool.server.ray.ingress import LoraPoolIngress
from lorapool.server.ray.router import BOUND, FLOOR, ReplicaRouter
from lorapool.server.transport.auth import ApiKeys

if TYPE_CHECKING:
    from lorapool.server.engine.config import EngineConfig

__all__ = ["ErrorReply", "LoraPoolEngine", "LoraPoolIngress", "build_app"]

APP_NAME = "lorapool"
ENGINE_NAME = "LoraPoolEngine"
INGRESS_NAME = "LoraPoolIngress"
SERVICER_FUNCTIONS = [
    "lorapool.server.ray.proxy.cancel_streams_on_disconnect",  # first: wraps what follows
    "lorapool.v1.lorapool_pb2_grpc.add_LoraPoolServiceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


# -- the application -------------------------------------------------------------------------


def build_app(
    engine_config: EngineConfig,
    replicas: int,
    replica_cpus: float = 1.0,
    replica_gpus: float = 0.0,
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
        ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus},
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
