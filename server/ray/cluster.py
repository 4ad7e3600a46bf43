"""Start and stop the Serve application: a local Ray instance (or a cluster joined
by address), Serve's gRPC proxy on one port, the ingress and N engine replicas."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from lorapool.server.ray.deployments import APP_NAME, SERVICER_FUNCTIONS, build_app
from lorapool.server.ray.metrics import serve_fleet_metrics
from lorapool.server.ray.proxy import HOST_ENV, WILDCARDS
from lorapool.server.ray.router import BOUND, FLOOR

if TYPE_CHECKING:
    from lorapool.server.engine.config import EngineConfig

log = logging.getLogger("lorapool.ray")

ROUTE_PREFIX = f"/{APP_NAME}"  # with one application, gRPC calls need no `application` key
INGRESS_CPUS = 0.1
DELIVERY_S = 0.5
_metrics_http = None  # (server, thread) of the fleet's /metrics endpoint, when open


def local_cpus(replicas: int, replica_cpus: float) -> int:
    """Logical CPUs for a local Ray instance: the machine's, or more when the
    replicas ask for more (Ray counts CPUs as scheduling slots, not cores)."""
    needed = replicas * replica_cpus + INGRESS_CPUS
    return max(os.cpu_count() or 1, int(needed + 0.999))


def deploy(
    engine_config: EngineConfig,
    *,
    replicas: int,
    port: int,
    replica_cpus: float = 1.0,
    replica_gpus: float = 0.0,
    http_port: int = 8000,
    address: str | None = None,
    source_allow: list[str] | None = None,
    num_cpus: int | None = None,
    api_key: str | None = None,
    admin_api_key: str | None = None,
    routing: str = "affinity",
    load_bound: float = BOUND,
    load_floor: int = FLOOR,
    host: str = "0.0.0.0",
    http_host: str = "127.0.0.1",
    metrics_port: int = 0,
    metrics_host: str | None = None,
) -> None:
    """Start (or join) Ray, start Serve with the gRPC proxy on host:port and run
    the application; returns once every replica is ready. Serve has no option for
    the gRPC proxy's address: a host other than every interface travels to the
    proxy's process in the job's runtime_env (proxy.bind_grpc_host), so it holds
    for proxies this job starts, not for a Serve instance already running on a
    joined cluster. http_host is where Serve's HTTP proxy listens. A metrics_port
    opens the fleet's /metrics endpoint in this process (server/ray/metrics.py) on
    metrics_host (default: host), before anything starts, so that a busy port fails
    at once (OSError)."""
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    global _metrics_http
    if metrics_port and _metrics_http is None:
        _metrics_http = serve_fleet_metrics(metrics_port, metrics_host or host, APP_NAME)
        log.info("fleet metrics on http://%s:%d/metrics", metrics_host or host, metrics_port)
    if not ray.is_initialized():
        runtime_env = {}
        if host not in WILDCARDS:
            runtime_env = {
                "env_vars": {HOST_ENV: host},
                "worker_process_setup_hook": "lorapool.server.ray.proxy.bind_grpc_host",
            }
        if address:
            ray.init(address=address, log_to_driver=False, runtime_env=runtime_env or None)
        else:
            ray.init(
                num_cpus=num_cpus or local_cpus(replicas, replica_cpus),
                include_dashboard=False,
                log_to_driver=False,
                runtime_env=runtime_env or None,
            )
    serve.start(
        http_options=HTTPOptions(host=http_host, port=http_port),
        grpc_options=gRPCOptions(port=port, grpc_servicer_functions=SERVICER_FUNCTIONS),
    )
    app = build_app(
        engine_config,
        replicas,
        replica_cpus=replica_cpus,
        replica_gpus=replica_gpus,
        ingress_cpus=INGRESS_CPUS,
        source_allow=source_allow,
        api_key=api_key,
        admin_api_key=admin_api_key,
        routing=routing,
        load_bound=load_bound,
        load_floor=load_floor,
    )
    serve.run(app, name=APP_NAME, route_prefix=ROUTE_PREFIX)
    log.info("serving %d engine replicas on gRPC %s:%d", replicas, host, port)


def drain(grace_s: float) -> int:
    """Health NOT_SERVING, new work refused, in-flight requests given up to
    grace_s to finish (then cancelled); returns the calls still under way after
    it (0: clean). What SIGTERM does before `shutdown`."""
    from ray import serve

    handle = serve.get_app_handle(APP_NAME)
    left = handle.drain.remote(grace_s).result(timeout_s=grace_s + 60.0)
    time.sleep(DELIVERY_S)  # the last messages on their way through the proxy
    return left


def shutdown() -> None:
    """Stop the application, Serve and (when this process started it) Ray."""
    import ray
    from ray import serve

    global _metrics_http
    if _metrics_http is not None:
        server, _ = _metrics_http
        server.shutdown()
        server.server_close()
        _metrics_http = None
    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
