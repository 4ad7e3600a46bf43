"""Prometheus metrics: what the service observes per request, what the engine
collector reads at scrape time, naming and label bounds, and the Grafana dashboard
in docs/grafana/ against a running server's /metrics."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port

from lorapool.errors import AdapterNotFound
from lorapool.server.metrics import Metrics
from lorapool.server.service import LoraPoolService
from lorapool.v1 import lorapool_pb2 as pb

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana" / "lorapool.json"
METRIC_NAME = re.compile(r"\blorapool_[A-Za-z0-9_:]+")
PROMPT = [5, 6, 7, 8]


def generate_request(adapter_id: str = "", max_new_tokens: int = 4, **fields):
    return pb.GenerateRequest(
        adapter_id=adapter_id,
        input_ids=pb.TokenIds(ids=PROMPT),
        params=pb.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True),
        **fields,
    )


def value(metrics: Metrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def families(metrics: Metrics) -> dict:
    return {f.name: f for f in metrics.registry.collect()}


async def test_a_request_is_observed_end_to_end(make_engine, tiny_demo):
    engine = await make_engine()
    metrics = Metrics()
    metrics.attach(engine)
    service = LoraPoolService(engine, metrics)
    adapter = tiny_demo.adapter_dirs[1].name
    replies = [r async for r in service.generate(generate_request(adapter))]
    assert sum(len(r.token_ids) for r in replies) == 4
    assert value(metrics, "lorapool_e2e_request_latency_seconds_count") == 1
    assert value(metrics, "lorapool_request_queue_time_seconds_count") == 1
    assert value(metrics, "lorapool_time_to_first_token_seconds_count") == 1
    assert (
        value(metrics, "lorapool_adapter_time_to_first_token_seconds_count", adapter=adapter) == 1
    )
    assert value(metrics, "lorapool_prompt_tokens_total", adapter=adapter) == len(PROMPT)
    assert value(metrics, "lorapool_generated_tokens_total", adapter=adapter) == 4
    e2e = value(metrics, "lorapool_e2e_request_latency_seconds_sum")
    ttft = value(metrics, "lorapool_time_to_first_token_seconds_sum")
    assert 0 < ttft <= e2e
    # a refused request is counted, but has no latency, queue time or prompt tokens
    with pytest.raises(AdapterNotFound):
        async for _ in service.generate(generate_request("no-such-adapter")):
            pass
    assert value(metrics, "lorapool_e2e_request_latency_seconds_count") == 1
    assert value(metrics, "lorapool_prompt_tokens_total", adapter="unknown") in (None, 0)
    assert (
        value(metrics, "lorapool_adapter_time_to_first_token_seconds_count", adapter="unknown")
        is None
    )


async def test_scrape_time_gauges_follow_the_engine(make_engine, tiny_demo):
    engine = await make_engine()
    metrics = Metrics()
    metrics.attach(engine)
    service = LoraPoolService(engine, metrics)
    info = engine.model_info()
    model = {k: str(info[k]) for k in ("model_name", "architecture", "dtype", "device")}
    assert value(metrics, "lorapool_model_info", **model) == 1
    adapter = tiny_demo.adapter_dirs[2].name
    stream = service.generate(generate_request(adapter, max_new_tokens=64))
    await anext(stream)  # running now, holding KV pages
    stats = engine.stats()
    assert stats.kv_pages > 0
    assert value(metrics, "lorapool_kv_usage_ratio") == pytest.approx(
        stats.kv_pages / stats.total_pages
    )
    used = stats.total_pages - stats.free_pages
    assert value(metrics, "lorapool_pool_usage_ratio") == pytest.approx(used / stats.total_pages)
    (lora,) = families(metrics)["lorapool_lora_requests_info"].samples
    resident = [a.adapter_id for a in engine.list_adapters() if a.state.name == "DEVICE"]
    assert lora.labels == {
        "running_lora_adapters": adapter,
        "waiting_lora_adapters": "",
        "max_lora": str(len(resident)),
    }
    assert adapter in resident
    assert lora.value == pytest.approx(time.time(), abs=60)
    assert value(metrics, "lorapool_adapters", state="DEVICE") == len(resident)
    await stream.aclose()
    for _ in range(500):  # the step loop drops the cancelled sequence between steps
        if not engine.stats().running_requests:
            break
        await asyncio.sleep(0.01)
    (lora,) = families(metrics)["lorapool_lora_requests_info"].samples
    assert lora.labels["running_lora_adapters"] == ""


async def test_admin_calls_are_counted_by_outcome(make_engine, tiny_demo):
    engine = await make_engine()
    metrics = Metrics()
    service = LoraPoolService(engine, metrics)
    admin = "lorapool_adapter_admin_calls_total"
    assert value(metrics, admin, operation="load", outcome="OK") == 0
    adapter = tiny_demo.adapter_dirs[3].name
    await service.load_adapter(pb.LoadAdapterRequest(adapter_id=adapter))
    await service.unload_adapter(pb.UnloadAdapterRequest(adapter_id=adapter))
    with pytest.raises(AdapterNotFound):
        await service.unload_adapter(pb.UnloadAdapterRequest(adapter_id="no-such-adapter"))
    assert value(metrics, admin, operation="load", outcome="OK") == 1
    assert value(metrics, admin, operation="unload", outcome="OK") == 1
    assert value(metrics, admin, operation="unload", outcome="NOT_FOUND") == 1


async def test_names_follow_prometheus_conventions_and_labels_stay_bounded(make_engine):
    engine = await make_engine()
    metrics = Metrics()
    metrics.attach(engine)
    service = LoraPoolService(engine, metrics)
    for i in range(5):  # random ids share the "unknown" label
        with pytest.raises(AdapterNotFound):
            await service.complete(generate_request(f"random-{i}"))
    [r async for r in service.generate(generate_request())]
    known = {a.adapter_id for a in engine.list_adapters()} | {"base", "unknown"}
    for family in metrics.registry.collect():
        assert family.name.startswith("lorapool_"), family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        for sample in family.samples:
            assert sample.labels.get("adapter", "base") in known, sample
            if family.name != "lorapool_model_info":
                assert "model_name" not in sample.labels, sample


# -- the Grafana dashboard ---------------------------------------------------------------------


def dashboard_queries(dashboard: dict) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and variable queries."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var["type"] == "query" and query:
            exprs.append(query)
    return exprs


def test_the_dashboard_has_the_panels_an_operator_expects():
    dashboard = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for wanted in (
        "requests / s by status",
        "time to first token",
        "inter-token latency",
        "end-to-end",
        "tokens / s",
        "pool and kv usage",
        "loads and evictions",
        "resident adapters",
    ):
        assert wanted in titles, wanted
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel
    quantiles = " ".join(dashboard_queries(dashboard))
    for histogram in ("time_to_first_token", "inter_token_latency", "e2e_request_latency"):
        for q in ("0.5", "0.99"):
            assert f"histogram_quantile({q}, sum by (le) (rate(lorapool_{histogram}" in quantiles


def test_every_metric_the_dashboard_queries_is_exported(start_server, tiny_demo):
    from prometheus_client.parser import text_string_to_metric_families

    from lorapool.client.client import LoraPoolClient

    port = free_port()
    server = start_server(metrics_port=port)
    adapter = tiny_demo.adapter_dirs[4].name
    with LoraPoolClient(server.target, timeout=60) as client:  # a series for every label set
        client.complete(prompt="metrics", adapter_id=adapter, max_new_tokens=3)
        client.load_adapter(tiny_demo.adapter_dirs[5].name)
        client.unload_adapter(tiny_demo.adapter_dirs[5].name)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    queried = {
        name
        for expr in dashboard_queries(json.loads(DASHBOARD.read_text()))
        for name in METRIC_NAME.findall(expr)
    }
    assert len(queried) >= 15
    assert not queried - exported, f"the dashboard queries unexported {queried - exported}"
