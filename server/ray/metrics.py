"""The fleet's Prometheus endpoint for `lorapool serve-ray`: one /metrics port for
every engine replica, each sample labelled with its replica's id.

Each engine replica keeps the metrics of `lorapool serve` (server/metrics.py) in
its own registry and opens no port: several replicas on one node would all ask for
the same one. At every scrape the endpoint asks the ingress, which asks every
engine replica for its registry's exposition (the calls pinned to each replica,
as GetStats's are), adds `replica="<id>"` to every sample and serves the union.
So a scrape sees every replica the router can reach at that moment, by the same
ids as GetStats and ListAdapters, with the metric names of `lorapool serve`
(dashboards sum or split by `replica`). `lorapool_replicas_scraped` says how
many replicas answered; a replica that did not answer within the timeout is
missing from that scrape, the others are still served."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from prometheus_client import start_http_server
from prometheus_client.core import GaugeMetricFamily

from lorapool.server.ray.fleet import label_replicas

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger("lorapool.ray")

SCRAPE_TIMEOUT_S = 10.0


class FleetCollector:
    """A prometheus_client collector over `fetch()`: (replica id, exposition text)
    of every replica that answered."""

    def __init__(self, fetch: Callable[[], list[tuple[str, bytes]]]):
        self.fetch = fetch

    def collect(self):
        try:
            replies = self.fetch()
        except Exception as exc:  # the application not (or no longer) running
            log.warning("metrics scrape: no answer from the replicas (%s)", exc)
            replies = []
        yield GaugeMetricFamily(
            "lorapool_replicas_scraped",
            "Engine replicas whose metrics this scrape holds",
            value=len(replies),
        )
        yield from label_replicas(replies)


def fetch_from_app(app_name: str, timeout_s: float = SCRAPE_TIMEOUT_S):
    """fetch() for FleetCollector: the ingress of Serve application app_name
    gathers every engine replica's exposition."""

    def fetch() -> list[tuple[str, bytes]]:
        from ray import serve

        handle = serve.get_app_handle(app_name)
        return handle.metrics.remote(timeout_s).result(timeout_s=timeout_s + 5.0)

    return fetch


def serve_fleet_metrics(port: int, host: str, app_name: str):
    """Start the /metrics endpoint on host:port (a thread of this process);
    returns (server, thread). Raises OSError when the port cannot be bound."""
    return start_http_server(port, addr=host, registry=FleetCollector(fetch_from_app(app_name)))


def main(argv: list[str] | None = None) -> int:
    """`python -m lorapool.server.ray.metrics --address auto --port 9464`: the same
    endpoint for a Serve application that no `serve-ray` process started (a
    KubeRay RayService), run on a node of its cluster."""
    import argparse
    import threading

    parser = argparse.ArgumentParser(prog="python -m lorapool.server.ray.metrics")
    parser.add_argument("--address", default="auto", help="the Ray cluster (default: auto)")
    parser.add_argument("--port", type=int, default=9464, help="/metrics port")
    parser.add_argument("--host", default="0.0.0.0", help="/metrics address")
    parser.add_argument("--app", default="lorapool", help="the Serve application's name")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s %(message)s")
    import ray

    ray.init(address=args.address, namespace="serve", log_to_driver=False)
    serve_fleet_metrics(args.port, args.host, args.app)
    log.info("fleet metrics of %r on http://%s:%d/metrics", args.app, args.host, args.port)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
