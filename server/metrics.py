"""Prometheus metrics on an HTTP /metrics endpoint.

Request outcomes and latencies are observed by the service as they happen; pool
and scheduler figures are read from engine.stats() at scrape time, so they can
never drift from what GetStats reports.

Names follow Prometheus conventions: base units (seconds, bytes, ratios 0..1) and
counters ending in `_total` (prometheus_client appends it to a Counter's name).
Label values are bounded: an `adapter` label is an id a source knows, "base", or
"unknown" (see LoraPoolService._label); a status is a gRPC status name. The
model's name is on `lorapool_model_info` only; join on it when needed."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# fewer buckets where there is a series per adapter
_ADAPTER_LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


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
        self.adapter_ttft = Histogram(
            "lorapool_adapter_time_to_first_token_seconds",
            "Time from request arrival to its first streamed token, by adapter",
            ["adapter"],
            buckets=_ADAPTER_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "lorapool_inter_token_latency_seconds",
            "Time between consecutive streamed tokens of a request",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "lorapool_e2e_request_latency_seconds",
            "Time from request arrival to its last event, of requests that finished OK",
            buckets=_REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "lorapool_request_queue_time_seconds",
            "Time a finished request waited in the admission queue before it first ran",
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
        self.prompt_tokens = Counter(
            "lorapool_prompt_tokens",
            "Prompt tokens of finished requests",
            ["adapter"],
            registry=self.registry,
        )
        self.admin_calls = Counter(
            "lorapool_adapter_admin_calls",
            "LoadAdapter / UnloadAdapter calls by operation and outcome (OK or gRPC status)",
            ["operation", "outcome"],
            registry=self.registry,
        )
        for operation in ("load", "unload"):  # present at 0 before the first call
            self.admin_calls.labels(operation, "OK")

    def attach(self, engine) -> None:
        """Read pool and scheduler figures from engine at every scrape."""
        self.registry.register(_EngineCollector(engine))
        engine.on_adapter_load(self.load_latency.observe)

    def serve(self, port: int, addr: str = "0.0.0.0"):
        return start_http_server(port, addr=addr, registry=self.registry)


def _adapter_ids(seqs) -> str:
    """Distinct adapter ids of sequences, sorted and comma-joined (base left out)."""
    return ",".join(sorted({s.adapter_id for s in list(seqs) if s.adapter_id}))


class _EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        total = s.total_pages or 1
        info = self.engine.model_info()
        model = GaugeMetricFamily(
            "lorapool_model_info",
            "The served model (value 1)",
            labels=["model_name", "architecture", "dtype", "device"],
        )
        model.add_metric(
            [str(info.get(k, "")) for k in ("model_name", "architecture", "dtype", "device")], 1
        )
        yield model
        pages = GaugeMetricFamily("lorapool_pool_pages", "Pool pages by owner", labels=["owner"])
        for owner in ("free", "kv", "cached", "adapter"):
            pages.add_metric([owner], getattr(s, f"{owner}_pages"))
        yield pages
        yield GaugeMetricFamily("lorapool_pool_page_bytes", "Bytes per page", value=s.page_bytes)
        yield GaugeMetricFamily(
            "lorapool_pool_usage_ratio",
            "Pool pages in use (KV, prefix cache and adapters) over all pages, 0..1",
            value=(s.total_pages - s.free_pages) / total,
        )
        yield GaugeMetricFamily(
            "lorapool_kv_usage_ratio",
            "Pool pages holding the KV of live requests over all pages, 0..1",
            value=s.kv_pages / total,
        )
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
        yield from self._adapters()

    def _adapters(self):
        infos = self.engine.list_adapters()
        resident = GaugeMetricFamily(
            "lorapool_adapter_resident_pages",
            "Pool pages held by each resident adapter",
            labels=["adapter"],
        )
        states: dict[str, int] = {}
        for info in infos:
            states[info.state.name] = states.get(info.state.name, 0) + 1
            if info.pages:
                resident.add_metric([info.adapter_id], info.pages)
        yield resident
        by_state = GaugeMetricFamily(
            "lorapool_adapters",
            "Adapters by state (KNOWN: a source lists it; HOST: in host memory; "
            "DEVICE: resident in pool pages)",
            labels=["state"],
        )
        for state in ("KNOWN", "LOADING", "HOST", "DEVICE"):
            by_state.add_metric([state], states.get(state, 0))
        yield by_state
        # vLLM's vllm:lora_requests_info: one series whose labels name the adapters of
        # running and waiting requests and whose value is the scrape's unix time.
        # Unlike vLLM's configured max_loras, max_lora is the number of adapters
        # resident in the pool now (the pool has no fixed adapter slot count).
        scheduler = getattr(self.engine, "scheduler", None)
        running = _adapter_ids(scheduler.running) if scheduler is not None else ""
        waiting = _adapter_ids(scheduler.waiting) if scheduler is not None else ""
        lora = GaugeMetricFamily(
            "lorapool_lora_requests_info",
            "Adapters of running and waiting requests (value: unix time of the scrape)",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        lora.add_metric([running, waiting, str(states.get("DEVICE", 0))], time.time())
        yield lora
