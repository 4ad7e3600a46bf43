"""Prometheus metrics on an HTTP /metrics endpoint.

Request outcomes and latencies are observed by the service as they happen; pool
and scheduler figures are read from engine.stats() at scrape time, so they can
never drift from what GetStats reports."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lorapool_requests",
            "Finished requests by adapter, RPC and gRPC status",
            ["adapter", "method", "status"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "lorapool_time_to_first_token_seconds",
            "Time from request arrival to its first streamed token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "lorapool_inter_token_latency_seconds",
            "Time between consecutive streamed tokens of a request",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.load_latency = Histogram(
            "lorapool_adapter_load_seconds",
            "Time to fetch, validate and pack an adapter into host memory",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "lorapool_generated_tokens",
            "Tokens streamed to clients",
            ["adapter"],
            registry=self.registry,
        )

    def attach(self, engine) -> None:
        """Read pool and scheduler figures from engine at every scrape."""
        self.registry.register(_EngineCollector(engine))
        engine.on_adapter_load(self.load_latency.observe)

    def serve(self, port: int, addr: str = "0.0.0.0"):
        return start_http_server(port, addr=addr, registry=self.registry)


class _EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        pages = GaugeMetricFamily("lorapool_pool_pages", "Pool pages by owner", labels=["owner"])
        for owner in ("free", "kv", "cached", "adapter"):
            pages.add_metric([owner], getattr(s, f"{owner}_pages"))
        yield pages
        yield GaugeMetricFamily("lorapool_pool_page_bytes", "Bytes per page", value=s.page_bytes)
        yield GaugeMetricFamily(
            "lorapool_running_requests", "Running sequences", value=s.running_requests
        )
        yield GaugeMetricFamily(
            "lorapool_waiting_requests", "Queued sequences", value=s.waiting_requests
        )
        yield GaugeMetricFamily(
            "lorapool_tokens_per_second", "Recent generation rate", value=s.tokens_per_second
        )
        yield GaugeMetricFamily(
            "lorapool_host_cache_bytes", "Adapter bytes in host memory", value=s.host_cache_bytes
        )
        for name, value, doc in (
            ("adapter_loads", s.adapter_loads, "Adapter loads from a source"),
            ("adapter_evictions", s.adapter_evictions, "Adapters evicted from pool pages"),
            ("preemptions", s.preemptions, "Running sequences preempted for memory"),
            ("steps", s.steps, "Forward steps"),
            (
                "prefix_cache_hit_tokens",
                s.prefix_cache_hit_tokens,
                "Prompt tokens served from the prefix cache",
            ),
        ):
            yield CounterMetricFamily(f"lorapool_{name}", doc, value=value)
        resident = GaugeMetricFamily(
            "lorapool_adapter_resident_pages",
            "Pool pages held by each resident adapter",
            labels=["adapter"],
        )
        for info in self.engine.list_adapters():
            if info.pages:
                resident.add_metric([info.adapter_id], info.pages)
        yield resident
