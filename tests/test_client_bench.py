"""Client, conversions, CLI and bench against an in-process fake LoraPoolService.

The fake echoes prompt words back as tokens, so every expectation is exact and no
engine (or torch) is needed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from lorapool.client import AsyncLoraPoolClient, LoraPoolClient, LoraPoolClientError, cli
from lorapool.client.bench import BenchConfig, parse_duration, run_bench
from lorapool.client.report import BenchReport
from lorapool.client.stats import CallResult, histogram, percentile
from lorapool.client.trace import make_trace, prompt_ids, prompt_text
from lorapool.convert import (
    adapter_info_from_proto,
    adapter_info_to_proto,
    error_info,
    event_from_proto,
    event_to_proto,
    events_to_complete,
    model_info_to_proto,
    params_from_proto,
    params_to_proto,
    request_from_proto,
    stats_from_proto,
    stats_to_proto,
    status_for_error,
)
from lorapool.errors import AdapterNotFound, InvalidRequest, LoraPoolError, QueueFull
from lorapool.types import (
    AdapterInfo,
    AdapterState,
    EngineStats,
    FinishReason,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
    Usage,
)
from lorapool.v1 import lorapool_pb2 as pb
from lorapool.v1 import lorapool_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]

# -- the fake server -------------------------------------------------------------------------


class EchoService(pb_grpc.LoraPoolServiceServicer):
    """Generates the prompt's words (or ids) again, cycling when ignore_eos asks for
    more. Prompts starting with "slow" wait 0.2 s per token; adapters named
    missing* do not exist; "unavailable-once" fails once with UNAVAILABLE before
    any token; "unavailable-midway" fails after the first token."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.adapters: Counter[str] = Counter()
        self.metadata: dict[str, str] = {}
        self.cancelled = 0
        self.stats_failures = 0
        self.failed_once: set[str] = set()

    async def _events(self, request, context) -> AsyncIterator[TokenEvent]:
        self.metadata = dict(context.invocation_metadata())
        try:
            req = request_from_proto(request, "srv-id")
            if not (req.prompt or req.input_ids):
                raise InvalidRequest("the prompt is empty")
            if req.adapter_id.startswith("missing"):
                raise AdapterNotFound(f"adapter {req.adapter_id!r}: no source knows it")
        except LoraPoolError as exc:
            await context.abort(*status_for_error(exc))
        self.adapters[req.adapter_id] += 1
        prompt = req.prompt or ""
        if prompt == "unavailable-once" and prompt not in self.failed_once:
            self.failed_once.add(prompt)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        words = prompt.split() if req.prompt is not None else [str(i) for i in req.input_ids]
        p = req.params
        n = p.max_new_tokens if p.ignore_eos else min(p.max_new_tokens, len(words))
        for k in range(n):
            if prompt.startswith("slow"):
                await asyncio.sleep(0.2)
            if k == 1 and prompt == "unavailable-midway":
                await context.abort(grpc.StatusCode.UNAVAILABLE, "lost the engine")
            word = words[k % len(words)]
            logprobs = [TokenLogprob(k, -0.5, [(k, -0.5)] * p.logprobs)] if p.logprobs else []
            yield TokenEvent([k], (" " if k else "") + word, logprobs)
        reason = FinishReason.LENGTH if n == p.max_new_tokens else FinishReason.EOS
        yield TokenEvent([], "", [], reason, Usage(len(words), n, 0, 0.5, 1.5))

    async def Generate(self, request, context):
        self.calls["Generate"] += 1
        try:
            async for event in self._events(request, context):
                yield event_to_proto(event, request.request_id or "srv-id")
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def Complete(self, request, context):
        self.calls["Complete"] += 1
        events = [e async for e in self._events(request, context)]
        return events_to_complete(events, request.request_id or "srv-id")

    async def Tokenize(self, request, context):
        words = request.text.split()
        return pb.TokenizeResponse(
            token_ids=range(len(words)), tokens=words if request.return_tokens else []
        )

    async def LoadAdapter(self, request, context):
        self.calls["LoadAdapter"] += 1
        if request.adapter_id == "flaky":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "source unreachable")
        info = AdapterInfo(request.adapter_id, AdapterState.DEVICE, request.source, rank=8)
        info.pinned = request.pin
        return pb.LoadAdapterResponse(adapter=adapter_info_to_proto(info))

    async def UnloadAdapter(self, request, context):
        if request.adapter_id.startswith("missing"):
            exc = AdapterNotFound(f"adapter {request.adapter_id!r} is not loaded")
            await context.abort(*status_for_error(exc))
        return pb.UnloadAdapterResponse()

    async def ListAdapters(self, request, context):
        infos = [
            AdapterInfo("adapter-000", AdapterState.DEVICE, "/a/0", 8, 16.0, ["q_proj"], 4, 4096),
            AdapterInfo("adapter-001", AdapterState.KNOWN, "/a/1"),
        ]
        return pb.ListAdaptersResponse(adapters=[adapter_info_to_proto(i) for i in infos])

    async def GetStats(self, request, context):
        self.calls["GetStats"] += 1
        if self.stats_failures:
            self.stats_failures -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "draining")
        return stats_to_proto(EngineStats(total_pages=100, free_pages=90, adapter_pages=10))

    async def GetModelInfo(self, request, context):
        return model_info_to_proto({"model_path": "/m", "vocab_size": 1000, "extra": 1})


class FakeServer:
    """The fake on its own event loop in a thread, so blocking clients, asyncio
    clients and subprocesses can all reach it."""

    def __init__(self) -> None:
        self.service = EchoService()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, port = self._run(self._start())
        self.target = f"127.0.0.1:{port}"

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _start(self):
        server = grpc.aio.server()
        pb_grpc.add_LoraPoolServiceServicer_to_server(self.service, server)
        checker = health.aio.HealthServicer()
        await checker.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(checker, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    def close(self) -> None:
        self._run(self.server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def fake():
    server = FakeServer()
    yield server
    server.close()


@pytest.fixture
def client(fake):
    with LoraPoolClient(fake.target, timeout=10) as c:
        yield c


# -- trace -----------------------------------------------------------------------------------


def test_trace_is_seeded_and_a_prefix_does_not_depend_on_length():
    a = make_trace(500, 8, 1.0, 20.0, (4, 9), (2, 3), seed=3)
    assert a == make_trace(500, 8, 1.0, 20.0, (4, 9), (2, 3), seed=3)
    assert a[:50] == make_trace(50, 8, 1.0, 20.0, (4, 9), (2, 3), seed=3)
    assert a != make_trace(500, 8, 1.0, 20.0, (4, 9), (2, 3), seed=4)
    assert all(4 <= t.prompt_tokens <= 9 and 2 <= t.max_new_tokens <= 3 for t in a)
    assert {t.prompt_tokens for t in a} == set(range(4, 10))


def test_trace_popularity_follows_zipf():
    trace = make_trace(20_000, 10, zipf=1.2, seed=1)
    counts = Counter(t.adapter_id for t in trace)
    ranked = [counts[f"adapter-{k:03d}"] for k in range(10)]
    assert set(counts) == {f"adapter-{k:03d}" for k in range(10)}
    assert ranked[0] == max(ranked)
    assert ranked[0] > 2 * ranked[1] * 0.9  # 2 ** 1.2 = 2.3 expected
    assert ranked[0] > 10 * ranked[9]  # 10 ** 1.2 = 15.8 expected
    uniform = Counter(t.adapter_id for t in make_trace(20_000, 10, zipf=0.0, seed=1))
    assert max(uniform.values()) < 1.15 * min(uniform.values())


def test_trace_arrivals_are_poisson_at_the_requested_rate():
    trace = make_trace(10_000, 4, rps=50.0, seed=2)
    arrivals = [t.arrival_s for t in trace]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0
    rate = len(arrivals) / arrivals[-1]
    assert rate == pytest.approx(50.0, rel=0.05)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    mean = sum(gaps) / len(gaps)
    cv = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean
    assert cv == pytest.approx(1.0, abs=0.08)  # exponential gaps: std == mean
    assert all(t.arrival_s == 0.0 for t in make_trace(10, 4, rps=None))


def test_trace_base_fraction_and_prompts():
    trace = make_trace(4000, 4, base_fraction=0.25, seed=5)
    share = sum(t.adapter_id == "" for t in trace) / len(trace)
    assert share == pytest.approx(0.25, abs=0.03)
    assert all(t.adapter_id == "" for t in make_trace(20, 0))
    item = trace[0]
    assert len(prompt_text(item).split()) == item.prompt_tokens
    ids = prompt_ids(item, 500)
    assert len(ids) == item.prompt_tokens and all(100 <= i < 500 for i in ids)
    assert prompt_ids(item, 500) == ids


def test_trace_module_does_not_import_torch():
    modules = "lorapool.client.trace, lorapool.client.bench"
    code = f"import sys, {modules}; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- report ----------------------------------------------------------------------------------


def test_percentile_and_histogram_follow_ghz():
    values = [float(v) for v in range(1, 11)]
    assert [percentile(values, p) for p in (10, 50, 90, 99)] == [1.0, 5.0, 9.0, 10.0]
    assert percentile([], 50) is None
    buckets = histogram(values)
    assert len(buckets) == 11 and buckets[0][0] == 1.0 and buckets[-1][0] == 10.0
    assert sum(c for _, c, _ in buckets) == 10
    assert sum(f for _, _, f in buckets) == pytest.approx(1.0)


def _report() -> BenchReport:
    results = [
        CallResult(1.7e9 + i, 0.1 * (i + 1), "OK", tokens=4, ttft_s=0.01, itl_s=[0.002] * 3)
        for i in range(8)
    ]
    results.append(CallResult(1.7e9, 0.05, "NotFound", "rpc error: code = NotFound desc = x"))
    results.append(CallResult(1.7e9, 0.06, "NotFound", "rpc error: code = NotFound desc = x"))
    return BenchReport.build("h:1", BenchConfig(total=10), results, total_s=2.0)


def test_report_json_has_ghz_schema():
    data = json.loads(json.dumps(_report().to_json()))
    for key in (
        "date", "count", "total", "average", "fastest", "slowest", "rps", "histogram",
        "latencyDistribution", "statusCodeDistribution", "errorDistribution", "details",
        "options", "endReason", "tokens",
    ):  # fmt: skip
        assert key in data, key
    assert data["count"] == 10 and data["rps"] == pytest.approx(5.0)
    assert data["total"] == 2_000_000_000  # nanoseconds, like ghz
    assert data["fastest"] == 100_000_000 and data["slowest"] == 800_000_000
    assert data["date"].endswith("Z")
    assert data["statusCodeDistribution"] == {"OK": 8, "NotFound": 2}
    assert data["errorDistribution"] == {"rpc error: code = NotFound desc = x": 2}
    assert [d["percentage"] for d in data["latencyDistribution"]] == [10, 25, 50, 75, 90, 95, 99]
    assert all(isinstance(d["latency"], int) for d in data["latencyDistribution"])
    assert sum(b["count"] for b in data["histogram"]) == 8
    assert set(data["histogram"][0]) == {"mark", "count", "frequency"}
    assert data["histogram"][0]["mark"] == pytest.approx(0.1)  # seconds, like ghz
    assert len(data["details"]) == 10
    assert set(data["details"][0]) == {"timestamp", "latency", "error", "status"}
    tokens = data["tokens"]
    assert tokens["total"] == 32 and tokens["tokens_per_second"] == pytest.approx(16.0)
    assert tokens["ttft"] == {"p50": 10_000_000, "p90": 10_000_000, "p99": 10_000_000}
    assert tokens["itl"] == {"p50": 2_000_000, "p99": 2_000_000}


def test_report_text_has_ghz_sections():
    text = _report().text()
    for heading in (
        "Summary:", "Count:", "Total:", "Slowest:", "Fastest:", "Average:", "Requests/sec:",
        "Response time histogram:", "Latency distribution:", "Status code distribution:",
        "Error distribution:", "Tokens:", "TTFT:", "ITL:",
    ):  # fmt: skip
        assert heading in text, heading
    assert "  [OK]        8 responses" in text and "99 % in 800.00 ms" in text


# -- conversions -----------------------------------------------------------------------------


def test_params_round_trip_keeps_meaningful_zeros():
    params = SamplingParams(7, 0.0, 0.9, 5, 0, ["\n"], [2], True, 1.1, 3)
    msg = params_to_proto(params)
    assert msg.HasField("seed") and msg.seed == 0 and msg.HasField("temperature")
    assert params_from_proto(msg) == params
    defaults = params_from_proto(pb.SamplingParams())
    assert defaults == SamplingParams()
    assert defaults.seed is None and defaults.top_p == 1.0


def test_request_from_proto_reads_either_input():
    ids = request_from_proto(pb.GenerateRequest(input_ids=pb.TokenIds(ids=[1, 2])), "gen")
    assert ids.input_ids == [1, 2] and ids.prompt is None and ids.request_id == "gen"
    text = request_from_proto(pb.CompleteRequest(prompt="hi", adapter_id="a", request_id="r"))
    assert (text.prompt, text.adapter_id, text.request_id) == ("hi", "a", "r")
    with pytest.raises(InvalidRequest):
        request_from_proto(pb.GenerateRequest())


def test_complete_request_shares_generate_request_wire_format():
    gen = pb.GenerateRequest(adapter_id="a", prompt="p", params=pb.SamplingParams(seed=0))
    done = pb.CompleteRequest.FromString(gen.SerializeToString())
    assert done.adapter_id == "a" and done.prompt == "p" and done.params.HasField("seed")


def test_events_round_trip_and_join():
    events = [
        TokenEvent([5], "he", [TokenLogprob(5, -0.1, [(5, -0.1), (6, -2.0)])]),
        TokenEvent([6, 7], "llo"),
        TokenEvent([], "", [], FinishReason.STOP, Usage(3, 3, 1, 0.5, 2.0)),
    ]
    assert [event_from_proto(event_to_proto(e, "r")) for e in events] == events
    assert event_to_proto(events[0], "r").request_id == ""  # only on the last message
    assert event_to_proto(events[-1], "r").request_id == "r"
    joined = events_to_complete(events, "r")
    assert (joined.text, list(joined.token_ids)) == ("hello", [5, 6, 7])
    assert joined.finish_reason == pb.FINISH_REASON_STOP and joined.usage.cached_prompt_tokens == 1
    assert joined.logprobs[0].top[1].token_id == 6


def test_enums_match_engine_values():
    for reason in FinishReason:
        name = "UNSPECIFIED" if reason is FinishReason.NONE else reason.name
        assert pb.FinishReason.Value(f"FINISH_REASON_{name}") == reason.value
    for state in AdapterState:
        name = "UNSPECIFIED" if state is AdapterState.UNKNOWN else state.name
        assert pb.AdapterState.Value(f"ADAPTER_STATE_{name}") == state.value


def test_adapter_stats_and_model_info_conversions():
    info = AdapterInfo("a", AdapterState.HOST, "hf://o/r", 16, 32.0, ["q_proj", "v_proj"])
    info.last_used, info.load_ms, info.content_hash = 1.7e9, 12.5, "abc"
    assert adapter_info_from_proto(adapter_info_to_proto(info)) == info
    stats = EngineStats(*range(1, 17))
    stats.tokens_per_second = 12.5
    assert stats_from_proto(stats_to_proto(stats)) == stats
    msg = model_info_to_proto({"vocab_size": 32, "eos_token_id": 2, "not_on_the_wire": 1})
    assert msg.vocab_size == 32 and msg.eos_token_id == 2


def test_typed_errors_become_status_with_error_info():
    code, details, trailers = status_for_error(QueueFull("admission queue is full (1024)"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "1024" in details
    assert error_info(trailers).reason == "QUEUE_FULL"
    assert error_info(trailers).domain == "lorapool"
    assert error_info(()).reason == ""


# -- blocking client -------------------------------------------------------------------------


def test_generate_streams_events(client):
    events = list(client.generate("one two three", max_new_tokens=5, ignore_eos=True))
    assert [e.token_ids for e in events[:-1]] == [[0], [1], [2], [3], [4]]
    assert "".join(e.text for e in events) == "one two three one two"
    last = events[-1]
    assert last.finish_reason == FinishReason.LENGTH and last.usage.completion_tokens == 5
    eos = list(client.generate(input_ids=[7, 8], max_new_tokens=5, logprobs=2))
    assert eos[-1].finish_reason == FinishReason.EOS and eos[0].logprobs[0].top == [(0, -0.5)] * 2


def test_generate_stopped_early_cancels_the_call(client, fake):
    before = fake.service.cancelled
    stream = client.generate("slow a b c d e f", max_new_tokens=6)
    assert next(stream).text == "slow"
    stream.close()
    deadline = time.time() + 5
    while fake.service.cancelled == before and time.time() < deadline:
        time.sleep(0.02)
    assert fake.service.cancelled == before + 1


def test_complete_tokenize_model_info_health(client):
    result = client.complete("a b c", max_new_tokens=2, request_id="mine")
    assert (result.text, result.token_ids, result.request_id) == ("a b", [0, 1], "mine")
    assert result.finish_reason == FinishReason.LENGTH and result.usage.prompt_tokens == 3
    tokens = client.tokenize("x y", return_tokens=True)
    assert tokens.token_ids == [0, 1] and tokens.tokens == ["x", "y"]
    assert client.model_info().vocab_size == 1000
    assert client.health() == "SERVING"


def test_adapter_admin(client):
    info = client.load_adapter("a1", "hf://org/repo@v2", pin=True)
    assert info.state == AdapterState.DEVICE and info.pinned and info.source == "hf://org/repo@v2"
    assert [a.adapter_id for a in client.list_adapters()] == ["adapter-000", "adapter-001"]
    client.unload_adapter("a1")
    with pytest.raises(LoraPoolClientError) as err:
        client.unload_adapter("missing-1")
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert err.value.reason == "ADAPTER_NOT_FOUND" and "missing-1" in err.value.details


def test_errors_carry_code_details_and_reason(client):
    with pytest.raises(LoraPoolClientError) as err:
        list(client.generate("x", adapter_id="missing-7"))
    assert err.value.code == grpc.StatusCode.NOT_FOUND and err.value.reason == "ADAPTER_NOT_FOUND"
    assert str(err.value).startswith("NOT_FOUND: ") and "[ADAPTER_NOT_FOUND]" in str(err.value)
    with pytest.raises(LoraPoolClientError) as err:
        client.complete(input_ids=[])  # an empty oneof member still counts as set
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.reason, err.value.details) == ("INVALID_REQUEST", "the prompt is empty")
    with pytest.raises(ValueError):
        client.complete()
    with pytest.raises(TypeError):
        client.complete("x", temprature=0.5)


def test_timeout_becomes_deadline_exceeded(client):
    with pytest.raises(LoraPoolClientError) as err:
        list(client.generate("slow a b c", max_new_tokens=3, timeout=0.3))
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and err.value.reason == ""


def test_api_key_travels_as_metadata(fake):
    with LoraPoolClient(fake.target, api_key="s3cret") as c:
        c.complete("a", max_new_tokens=1)
    assert fake.service.metadata["x-api-key"] == "s3cret"
    assert fake.service.metadata["authorization"] == "Bearer s3cret"


def test_retries_only_where_safe(client, fake):
    calls = fake.service.calls
    fake.service.stats_failures = 2
    before = calls["GetStats"]
    assert client.stats().free_pages == 90  # UNAVAILABLE twice, then served
    assert calls["GetStats"] == before + 3

    before = calls["LoadAdapter"]
    with pytest.raises(LoraPoolClientError) as err:
        client.load_adapter("flaky")
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and calls["LoadAdapter"] == before + 1

    before = calls["Generate"]
    events = list(client.generate("unavailable-once", max_new_tokens=1))
    assert events[-1].finish_reason == FinishReason.LENGTH and calls["Generate"] == before + 2

    before = calls["Generate"]
    with pytest.raises(LoraPoolClientError) as err:
        list(client.generate("unavailable-midway", max_new_tokens=3, ignore_eos=True))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and calls["Generate"] == before + 1

    fake.service.stats_failures = 1
    with LoraPoolClient(fake.target, retries=0) as plain:
        with pytest.raises(LoraPoolClientError):
            plain.stats()


# -- asyncio client --------------------------------------------------------------------------


async def test_async_client(fake):
    async with AsyncLoraPoolClient(fake.target, api_key="k", timeout=10) as c:
        events = [e async for e in c.generate("p q", max_new_tokens=2)]
        assert "".join(e.text for e in events) == "p q"
        assert events[-1].finish_reason == FinishReason.LENGTH
        assert fake.service.metadata["x-api-key"] == "k"
        assert (await c.complete(input_ids=[4, 5, 6], max_new_tokens=9)).text == "4 5 6"
        assert (await c.stats()).total_pages == 100
        assert len(await c.list_adapters()) == 2
        assert (await c.load_adapter("z")).adapter_id == "z"
        assert await c.health() == "SERVING"
        with pytest.raises(LoraPoolClientError) as err:
            await c.complete("x", adapter_id="missing-a")
        assert err.value.reason == "ADAPTER_NOT_FOUND"
        with pytest.raises(LoraPoolClientError) as err:
            async for _ in c.generate("slow x y z", max_new_tokens=3, timeout=0.3):
                pass
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


# -- bench -----------------------------------------------------------------------------------


def _bench_json(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert cli.main(["bench", *argv, "--json", "-"]) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_counts_exactly_what_it_sent(fake, capsys):
    service = fake.service
    before, seen_before = service.calls["Generate"], Counter(service.adapters)
    argv = ["--target", fake.target, "-n", "40", "-c", "6", "--adapters", "3", "--zipf", "1.5"]
    data = _bench_json(capsys, *argv, "--max-new-tokens", "2:5", "--prompt-tokens", "3:6")
    assert data["count"] == 40 and data["statusCodeDistribution"] == {"OK": 40}
    assert data["errorDistribution"] == {} and len(data["details"]) == 40
    assert service.calls["Generate"] - before == 40
    trace = make_trace(40, 3, 1.5, None, (3, 6), (2, 5), seed=0)
    assert data["tokens"]["total"] == sum(t.max_new_tokens for t in trace)  # ignore_eos: exact
    seen = Counter(service.adapters)
    seen.subtract(seen_before)
    assert +seen == Counter(t.adapter_id for t in trace)
    assert data["tokens"]["ttft"]["p50"] > 0 and data["tokens"]["itl"]["p99"] is not None
    assert data["options"]["call"] == "lorapool.v1.LoraPoolService.Generate"
    assert data["endReason"] == "normal"


def test_bench_open_loop_and_complete(fake):
    before = fake.service.calls["Complete"]
    config = BenchConfig(call="complete", total=30, rps=300.0, adapters=2, input_ids=True)
    config.prompt_tokens, config.max_new_tokens = (2, 4), (1, 3)
    report = run_bench(fake.target, config)
    assert report.count == 30 and report.status_codes == {"OK": 30}
    assert fake.service.calls["Complete"] - before == 30
    assert report.ttft_source == "server" and report.ttft["p50"] == pytest.approx(1.5e-3)
    assert report.generated_tokens == sum(
        t.max_new_tokens for t in make_trace(30, 2, 1.0, 300.0, (2, 4), (1, 3))
    )


def test_bench_duration_stops_sending(fake):
    config = BenchConfig(duration=0.5, concurrency=2, max_new_tokens=(1, 1), prompt_tokens=(1, 1))
    report = run_bench(fake.target, config)
    assert report.count > 0 and report.end_reason == "timeout"
    assert report.total_s < 2.0


def test_bench_reports_errors_like_ghz(fake, capsys):
    argv = ["bench", "--target", fake.target, "-n", "5", "--adapter-prefix", "missing-"]
    assert cli.main([*argv, "--json", "-"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["statusCodeDistribution"] == {"NotFound": 5}
    prefix = "rpc error: code = NotFound desc = adapter 'missing-"
    assert all(d["error"].startswith(prefix) for d in data["details"])
    assert sum(data["errorDistribution"].values()) == 5
    assert data["latencyDistribution"] == [] and data["histogram"] == []


def test_bench_text_report(fake, capsys, tmp_path):
    out = tmp_path / "report.json"
    argv = ["bench", "--target", fake.target, "-n", "8", "--max-new-tokens", "2", "--json"]
    assert cli.main([*argv, str(out)]) == 0
    text = capsys.readouterr().out
    assert "Summary:" in text and "Count:        8" in text and "[OK]  8 responses" in text
    assert json.loads(out.read_text())["count"] == 8


# -- command line ----------------------------------------------------------------------------


def test_cli_generate_streams_text(fake, capsys):
    argv = ["generate", "--target", fake.target, "alpha beta gamma", "--max-new-tokens", "5"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == "alpha beta gamma\n"
    assert cli.main([*argv, "--ignore-eos", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 6 and lines[0]["text"] == "alpha" and lines[0]["token_ids"] == [0]
    assert lines[-1]["finish_reason"] == "LENGTH" and lines[-1]["usage"]["completion_tokens"] == 5


def test_cli_complete_and_errors(fake, capsys):
    assert cli.main(["complete", "--target", fake.target, "--input-ids", "3,4"]) == 0
    assert capsys.readouterr().out == "3 4\n"
    argv = ["complete", "--target", fake.target, "x", "--adapter", "missing-q", "--json"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorapool complete: NOT_FOUND: ") and err.endswith("[ADAPTER_NOT_FOUND]")
    assert len(err.splitlines()) == 1


def test_cli_adapters_and_stats(fake, capsys):
    base = ["--target", fake.target]
    assert cli.main(["adapters", *base, "list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["ADAPTER", "STATE", "RANK"]
    assert table[1].split()[:3] == ["adapter-000", "DEVICE", "8"]
    assert cli.main(["adapters", *base, "list", "--json"]) == 0
    assert [a["state"] for a in json.loads(capsys.readouterr().out)] == ["DEVICE", "KNOWN"]
    assert cli.main(["adapters", *base, "--json", "load", "x", "/tmp/x", "--pin"]) == 0
    loaded = json.loads(capsys.readouterr().out)
    assert loaded["state"] == "DEVICE" and loaded["pinned"] is True
    assert cli.main(["adapters", *base, "unload", "missing-z"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert cli.main(["stats", *base, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["free_pages"] == 90
    assert cli.main(["stats", *base]) == 0
    assert "free_pages" in capsys.readouterr().out


def test_cli_generate_flushes_each_chunk(fake):
    """The first word reaches a pipe while later ones are still being generated."""
    env = {**os.environ, "LORAPOOL_TARGET": fake.target}
    script = "from lorapool.client.cli import main; raise SystemExit(main())"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "generate", "slow one two three four"],
        stdout=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    try:
        first = os.read(proc.stdout.fileno(), 100)
        assert first.startswith(b"slow") and proc.poll() is None
        rest = proc.stdout.read()
        assert (first + rest).decode() == "slow one two three four\n"
        assert proc.wait(10) == 0
    finally:
        proc.kill()


# -- ghz configs -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((ROOT / "docs" / "ghz").glob("*.json")), ids=str)
def test_ghz_configs_match_the_proto(path):
    from google.protobuf import json_format

    config = json.loads(path.read_text())
    service, _, method = config["call"].partition("/")
    assert service == "lorapool.v1.LoraPoolService"
    descriptor = pb.DESCRIPTOR.services_by_name["LoraPoolService"].methods_by_name[method]
    assert "proto" not in config and "protoset" not in config  # served by reflection
    assert parse_duration(config["timeout"]) >= 60  # a whole generation must fit
    data = json.loads(re.sub(r"\{\{.*?\}\}", "0", json.dumps(config["data"])))
    message = getattr(pb, descriptor.input_type.name)()
    json_format.ParseDict(data, message)  # raises on a field the proto does not have
    assert message.WhichOneof("input") is not None and message.params.ignore_eos
