"""The gRPC server end to end on the tiny demo: a real LoraPoolServer on a loopback
port (in-process on its own thread, or `lorapool serve` in a subprocess where a
signal is needed), called through the generated stubs, the lorapool clients, a
generic reflection client that knows nothing of our stubs, and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import pytest
from conftest import free_port
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lorapool.client import AsyncLoraPoolClient, LoraPoolClient, LoraPoolClientError
from lorapool.client.trace import make_trace
from lorapool.convert import bad_request, error_info
from lorapool.demo import write_adapter
from lorapool.types import FinishReason, GenerationRequest, SamplingParams
from lorapool.v1 import lorapool_pb2 as pb
from lorapool.v1 import lorapool_pb2_grpc as pb_grpc

LORAPOOL = str(Path(sys.executable).with_name("lorapool"))
SERVICE = "lorapool.v1.LoraPoolService"
LIMIT = 1500  # max_new_tokens_limit of the main server; tiny context is 2048
LONG = 1500  # a generation that takes seconds on the tiny model
MEDIUM = 400  # long enough to still be running after a few round trips
N_ADAPTERS = 16  # adapters used by the concurrency test (the demo has 20)
FINISHED = (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS, pb.FINISH_REASON_STOP)
WORDS = (
    "river stone light morning garden window letter music winter city road forest number "
    "table story water paper silver market island bridge valley summer engine"
).split()


def prompt_words(i: int, n: int) -> str:
    return " ".join(WORDS[(7 * i + 3 * k) % len(WORDS)] for k in range(n))


# -- servers and stubs -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_adapters(tmp_path_factory, tiny_demo) -> Path:
    """An adapter directory with two adapters the base model cannot serve: one
    written for a wider model, one that asks for DoRA."""
    root = tmp_path_factory.mktemp("bad-adapters")
    config = json.loads((tiny_demo.model_dir / "config.json").read_text())
    wider = dict(config, hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    write_adapter(wider, root / "wrong-shape", rank=8, alpha=16, target_modules=["q_proj"])
    dora = root / "dora"
    shutil.copytree(tiny_demo.adapter_dirs[2], dora)
    dora_config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(dora_config | {"use_dora": True}))
    return root


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def server(start_server, tiny_demo, bad_adapters, metrics_port):
    """The shared server: the demo adapters plus the bad ones, a /metrics endpoint."""
    return start_server(
        engine={
            "adapter_dirs": [str(tiny_demo.adapters_dir), str(bad_adapters)],
            "max_new_tokens_limit": LIMIT,
        },
        metrics_port=metrics_port,
    )


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.LoraPoolServiceStub(channel)


def wait_idle(stub, timeout: float = 5.0) -> pb.GetStatsResponse:
    """GetStats once no request holds KV pages or a scheduler slot."""
    deadline = time.monotonic() + timeout
    while True:
        stats = stub.GetStats(pb.GetStatsRequest(), timeout=5)
        idle = stats.kv_pages == 0 and stats.running_requests == 0
        if idle and stats.waiting_requests == 0:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"the server is not idle after {timeout}s:\n{stats}")
        time.sleep(0.02)


def assert_pages_add_up(stats: pb.GetStatsResponse) -> None:
    owned = stats.free_pages + stats.kv_pages + stats.cached_pages + stats.adapter_pages
    assert owned == stats.total_pages, stats


def health_status(channel, service: str = "") -> str:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_health(channel, want: str, timeout: float = 10.0, proc=None) -> None:
    deadline = time.monotonic() + timeout
    status = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}")
        try:
            status = health_status(channel)
        except grpc.RpcError as err:
            status = err.code().name
        if status == want:
            return
        time.sleep(0.05)
    raise AssertionError(f"health is {status}, not {want}, after {timeout}s")


def collect(stream) -> tuple[list[int], str, list]:
    """(token ids, text, messages) of a finished Generate stream."""
    messages = list(stream)
    return (
        [t for m in messages for t in m.token_ids],
        "".join(m.text for m in messages),
        messages,
    )


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    """The RpcError a unary call, or the iteration of a streaming call, raises."""
    with pytest.raises(grpc.RpcError) as exc:
        result = fn(*args, **kwargs)
        if hasattr(result, "__next__"):  # a stream: the error comes while reading
            list(result)
    return exc.value


# -- generation ------------------------------------------------------------------------------

PARITY_CASES = [
    # (adapter, prompt or input ids, SamplingParams fields)
    ("", "the river and the stone", {"max_new_tokens": 24, "ignore_eos": True}),
    ("adapter-000", "once upon a time in a garden", {"max_new_tokens": 32}),
    ("adapter-003", prompt_words(3, 40), {"max_new_tokens": 20, "ignore_eos": True}),
    ("adapter-007", [101, 202, 303, 404, 55, 66], {"max_new_tokens": 16, "ignore_eos": True}),
    ("adapter-011", "silver market", {"max_new_tokens": 12, "stop": ["e"]}),
    ("adapter-002", "the city", {"max_new_tokens": 6, "logprobs": 3}),
    ("adapter-004", "a gentle", {"max_new_tokens": 10, "temperature": 0.9, "seed": 7}),
]


def grpc_request(message, adapter, prompt, params, request_id=""):
    msg = message(request_id=request_id, adapter_id=adapter, params=pb.SamplingParams(**params))
    if isinstance(prompt, str):
        msg.prompt = prompt
    else:
        msg.input_ids.ids.extend(prompt)
    return msg


async def engine_events(engine, adapter, prompt, params):
    request = GenerationRequest(
        request_id="",
        prompt=prompt if isinstance(prompt, str) else None,
        input_ids=None if isinstance(prompt, str) else list(prompt),
        adapter_id=adapter,
        params=SamplingParams(**params),
    )
    return [e async for e in engine.generate(request)]


def logprob_rows(items) -> list[tuple]:
    """(token, logprob, top) rows of engine TokenLogprobs or proto TokenLogprobs."""
    rows = []
    for lp in items:
        top = getattr(lp, "top", [])
        pairs = [(t.token_id, t.logprob) if hasattr(t, "token_id") else tuple(t) for t in top]
        rows.append((lp.token_id, lp.logprob, pairs))
    return rows


async def test_generate_matches_the_engine_and_complete_matches_the_stream(server, make_engine):
    """Tokens streamed over gRPC (greedy, stop strings, logprobs, seeded sampling)
    equal an Engine's on the same files; the stream's framing follows the proto;
    Complete is the concatenated stream; usage counts the tokens Tokenize sees."""
    engine = await make_engine(max_new_tokens_limit=LIMIT)
    async with grpc.aio.insecure_channel(server.target) as ch:
        stub = pb_grpc.LoraPoolServiceStub(ch)
        for i, (adapter, prompt, params) in enumerate(PARITY_CASES):
            events = await engine_events(engine, adapter, prompt, params)
            want_ids = [t for e in events for t in e.token_ids]
            want_text = "".join(e.text for e in events)
            want_logprobs = logprob_rows(lp for e in events for lp in e.logprobs)
            rid = f"parity-{i}" if i % 2 else ""  # even cases let the server name them
            call = stub.Generate(grpc_request(pb.GenerateRequest, adapter, prompt, params, rid))
            messages = [m async for m in call]
            assert await call.code() == grpc.StatusCode.OK
            ids = [t for m in messages for t in m.token_ids]
            text = "".join(m.text for m in messages)
            logprobs = logprob_rows(lp for m in messages for lp in m.logprobs)
            assert (ids, text) == (want_ids, want_text), (adapter, prompt)
            assert len(logprobs) == (len(ids) if params.get("logprobs") else 0)
            for got, want in zip(logprobs, want_logprobs, strict=True):
                assert got[0] == want[0] and got[1] == pytest.approx(want[1], abs=1e-4)
                assert [t for t, _ in got[2]] == [t for t, _ in want[2]]
                assert len(got[2]) == params["logprobs"]
            *body, last = messages
            assert int(last.finish_reason) == int(events[-1].finish_reason)
            assert last.finish_reason in FINISHED
            for m in body:
                assert m.finish_reason == pb.FINISH_REASON_UNSPECIFIED
                assert not m.HasField("usage") and not m.request_id
                assert len(m.token_ids) >= 1
            assert last.usage.completion_tokens == len(ids)
            assert last.usage.ttft_ms > 0
            assert last.request_id == rid if rid else len(last.request_id) >= 8
            if isinstance(prompt, str):
                tokens = await stub.Tokenize(pb.TokenizeRequest(text=prompt))
                assert last.usage.prompt_tokens == len(tokens.token_ids)
            else:
                assert last.usage.prompt_tokens == len(prompt)
            if params.get("ignore_eos"):
                assert len(ids) == params["max_new_tokens"]
                assert last.finish_reason == pb.FINISH_REASON_LENGTH
            if params.get("stop"):
                assert last.finish_reason == pb.FINISH_REASON_STOP, "pick a stop that matches"
                assert params["stop"][0] not in text

            reply = await stub.Complete(grpc_request(pb.CompleteRequest, adapter, prompt, params))
            assert list(reply.token_ids) == ids and reply.text == text
            assert logprob_rows(reply.logprobs) == logprobs
            assert reply.finish_reason == last.finish_reason
            assert reply.usage.completion_tokens == len(ids)
            assert reply.usage.prompt_tokens == last.usage.prompt_tokens
            assert reply.request_id


async def test_64_concurrent_streams_over_16_adapters_match_single_requests(server, stub):
    requests = [
        {
            "prompt": prompt_words(i, 4 + (5 * i) % 37),  # some prompts span full KV blocks
            "adapter_id": f"adapter-{i % N_ADAPTERS:03d}",
            "max_new_tokens": 6 + (3 * i) % 19,
            "ignore_eos": True,
        }
        for i in range(64)
    ]
    async with AsyncLoraPoolClient(server.target, timeout=60) as client:
        alone = [(await client.complete(**r)).token_ids for r in requests]

        async def stream(r):
            events = [e async for e in client.generate(**r)]
            return [t for e in events for t in e.token_ids], events[-1].finish_reason

        results = await asyncio.gather(*(stream(r) for r in requests))
    for r, want, (got, reason) in zip(requests, alone, results, strict=True):
        assert len(want) == r["max_new_tokens"]
        assert got == want, r
        assert reason == FinishReason.LENGTH
    stats = wait_idle(stub)
    assert_pages_add_up(stats)
    adapters = {a.adapter_id: a for a in stub.ListAdapters(pb.ListAdaptersRequest()).adapters}
    for k in range(N_ADAPTERS):
        info = adapters[f"adapter-{k:03d}"]
        assert info.requests_served >= 8 and info.running_requests == 0


# -- a generic client: reflection and dynamic messages ---------------------------------------


def reflected_files(channel, symbol: str) -> tuple[list[str], dict]:
    """Services and the FileDescriptorProtos defining `symbol` (with their
    dependencies), asked over grpc.reflection.v1alpha."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    def ask(**field):
        (reply,) = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(**field)]), timeout=10
        )
        assert not reply.HasField("error_response"), reply.error_response
        return reply

    services = [s.name for s in ask(list_services="").list_services_response.service]
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    todo = [{"file_containing_symbol": symbol}]
    while todo:
        reply = ask(**todo.pop())
        for raw in reply.file_descriptor_response.file_descriptor_proto:
            proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
            if proto.name not in files:
                files[proto.name] = proto
                todo += [{"file_by_filename": d} for d in proto.dependency if d not in files]
    return services, files


def test_generic_reflection_client_lists_and_generates(channel, stub):
    services, files = reflected_files(channel, SERVICE)
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(
        services
    )
    pool = descriptor_pool.DescriptorPool()  # nothing from our generated stubs
    added: set[str] = set()

    def add(name: str) -> None:
        if name not in added:
            for dep in files[name].dependency:
                add(dep)
            pool.Add(files[name])
            added.add(name)

    for name in files:
        add(name)
    service = pool.FindServiceByName(SERVICE)
    assert {"Generate", "Complete", "GetStats"} <= set(service.methods_by_name)
    method = service.methods_by_name["Generate"]
    assert method.server_streaming and not method.client_streaming
    request_cls = message_factory.GetMessageClass(method.input_type)
    reply_cls = message_factory.GetMessageClass(method.output_type)
    assert request_cls is not pb.GenerateRequest
    request = json_format.ParseDict(
        {
            "adapterId": "adapter-005",
            "prompt": "a letter by the window",
            "params": {"maxNewTokens": 10, "ignoreEos": True},
        },
        request_cls(),
    )
    generate = channel.unary_stream(
        f"/{service.full_name}/{method.name}",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=reply_cls.FromString,
    )
    replies = [json_format.MessageToDict(r) for r in generate(request, timeout=30)]
    ids = [int(t) for r in replies for t in r.get("tokenIds", [])]
    assert replies[-1]["finishReason"] == "FINISH_REASON_LENGTH"
    assert int(replies[-1]["usage"]["completionTokens"]) == len(ids) == 10
    want = stub.Complete(
        pb.CompleteRequest(
            adapter_id="adapter-005",
            prompt="a letter by the window",
            params=pb.SamplingParams(max_new_tokens=10, ignore_eos=True),
        )
    )
    assert ids == list(want.token_ids)
    assert "".join(r.get("text", "") for r in replies) == want.text


# -- cancellation and deadlines --------------------------------------------------------------


def long_request(message=pb.GenerateRequest, adapter="adapter-001", n=LONG):
    return message(
        adapter_id=adapter,
        prompt="the long road through the forest",
        params=pb.SamplingParams(max_new_tokens=n, ignore_eos=True),
    )


def test_cancel_mid_stream_frees_the_request(stub):
    before = wait_idle(stub)
    call = stub.Generate(long_request(), timeout=60)
    first = [next(call) for _ in range(5)]
    assert all(len(m.token_ids) == 1 for m in first)
    busy = stub.GetStats(pb.GetStatsRequest())
    assert busy.kv_pages > 0 and busy.running_requests == 1
    call.cancel()
    with pytest.raises(grpc.RpcError) as exc:
        list(call)
    assert exc.value.code() == grpc.StatusCode.CANCELLED
    after = wait_idle(stub, timeout=2.0)
    assert after.generated_tokens - before.generated_tokens < LONG // 2, "it kept generating"
    assert_pages_add_up(after)
    time.sleep(0.1)  # nothing runs on behind our back
    assert stub.GetStats(pb.GetStatsRequest()).generated_tokens == after.generated_tokens
    # and the server keeps serving
    reply = stub.Complete(long_request(pb.CompleteRequest, "adapter-002", 8), timeout=60)
    assert len(reply.token_ids) == 8 and reply.finish_reason == pb.FINISH_REASON_LENGTH


@pytest.mark.parametrize("method", ["Generate", "Complete"])
def test_expired_deadline_frees_the_request(stub, method):
    before = wait_idle(stub)
    message = pb.GenerateRequest if method == "Generate" else pb.CompleteRequest
    err = rpc_error(getattr(stub, method), long_request(message), timeout=0.3)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    after = wait_idle(stub, timeout=2.0)
    assert 0 < after.generated_tokens - before.generated_tokens < LONG // 2
    assert_pages_add_up(after)
    reply = stub.Complete(
        pb.CompleteRequest(prompt="still here", params=pb.SamplingParams(max_new_tokens=4))
    )
    assert 1 <= len(reply.token_ids) <= 4


# -- the error contract ----------------------------------------------------------------------

ERROR_CASES = {
    # name: (request fields, status, reason, words the message must hold)
    "empty prompt": ({"prompt": ""}, "INVALID_ARGUMENT", "INVALID_REQUEST", ["empty prompt"]),
    "no input": ({}, "INVALID_ARGUMENT", "INVALID_REQUEST", ["prompt or input_ids"]),
    "empty input_ids": (
        {"input_ids": []},
        "INVALID_ARGUMENT",
        "INVALID_REQUEST",
        ["input_ids.ids is empty", "input_ids: {ids: [...]}"],
    ),
    "negative max_new_tokens": (
        {"prompt": "hello", "params": {"max_new_tokens": -5}},
        "INVALID_ARGUMENT",
        "INVALID_REQUEST",
        ["max_new_tokens", "-5"],
    ),
    "top_p zero": (
        {"prompt": "hello", "params": {"top_p": 0.0}},
        "INVALID_ARGUMENT",
        "INVALID_REQUEST",
        ["top_p"],
    ),
    "too many logprobs": (
        {"prompt": "hello", "params": {"logprobs": 50}},
        "INVALID_ARGUMENT",
        "INVALID_REQUEST",
        ["logprobs"],
    ),
    "max_new_tokens over the limit": (
        {"prompt": "hello", "params": {"max_new_tokens": LIMIT + 1}},
        "INVALID_ARGUMENT",
        "INVALID_REQUEST",
        ["max_new_tokens", str(LIMIT)],
    ),
    "prompt too long for the context": (
        {"input_ids": [100] * 2000, "params": {"max_new_tokens": 100}},
        "INVALID_ARGUMENT",
        "INVALID_REQUEST",
        ["context", "2048"],
    ),
    "negative temperature": (
        {"prompt": "hello", "params": {"temperature": -1.0}},
        "INVALID_ARGUMENT",
        "INVALID_REQUEST",
        ["temperature"],
    ),
    "token id outside the vocabulary": (
        {"input_ids": [5, 99999]},
        "INVALID_ARGUMENT",
        "INVALID_REQUEST",
        ["99999", "vocabulary"],
    ),
    "unknown adapter": (
        {"prompt": "hello", "adapter_id": "no-such-adapter"},
        "NOT_FOUND",
        "ADAPTER_NOT_FOUND",
        ["no-such-adapter"],
    ),
    "adapter for another shape": (
        {"prompt": "hello", "adapter_id": "wrong-shape"},
        "FAILED_PRECONDITION",
        "ADAPTER_INCOMPATIBLE",
        ["wrong-shape", "do not fit the base model"],
    ),
    "DoRA adapter": (
        {"prompt": "hello", "adapter_id": "dora"},
        "FAILED_PRECONDITION",
        "ADAPTER_INCOMPATIBLE",
        ["DoRA"],
    ),
}


def error_request(message, fields: dict):
    fields = dict(fields)
    params = pb.SamplingParams(**fields.pop("params", {"max_new_tokens": 4}))
    ids = fields.pop("input_ids", None)
    msg = message(params=params, **fields)
    if ids is not None:
        msg.input_ids.SetInParent()  # selects input_ids even when the list is empty
        msg.input_ids.ids.extend(ids)
    return msg


@pytest.mark.parametrize("method", ["Generate", "Complete"])
@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_error_contract(stub, case, method):
    fields, code, reason, words = ERROR_CASES[case]
    before = wait_idle(stub)
    message = pb.GenerateRequest if method == "Generate" else pb.CompleteRequest
    for _ in range(2):  # the same answer again: nothing cached a half-made state
        err = rpc_error(getattr(stub, method), error_request(message, fields), timeout=10)
        assert err.code().name == code, err.details()
        info = error_info(err.trailing_metadata())
        assert (info.reason, info.domain) == (reason, "lorapool")
        assert all(w in err.details() for w in words), err.details()
    after = wait_idle(stub)
    assert after.adapter_pages == before.adapter_pages, "a refused adapter took pages"
    assert after.generated_tokens == before.generated_tokens
    assert_pages_add_up(after)


# What @grpc/proto-loader writes for {input_ids: [5, 6]}, a bare array where the TokenIds
# wrapper goes: field 11 (input_ids) present and empty, the array dropped.
BARE_ARRAY_INPUT_IDS = b"\x5a\x00"


@pytest.mark.parametrize("method", ["Generate", "Complete"])
def test_an_empty_input_names_the_input_that_was_empty(channel, method):
    """An input_ids wrapper without ids is refused naming input_ids.ids and showing the
    wrapper; an empty prompt keeps naming the prompt."""
    message = pb.GenerateRequest if method == "Generate" else pb.CompleteRequest
    assert message.FromString(BARE_ARRAY_INPUT_IDS).WhichOneof("input") == "input_ids"
    raw = channel.unary_stream if method == "Generate" else channel.unary_unary
    call = raw(f"/{SERVICE}/{method}")  # bytes in, bytes out: the request as sent
    cases = [
        (BARE_ARRAY_INPUT_IDS, "input_ids.ids", "input_ids: {ids: [...]}"),
        (message(prompt="").SerializeToString(), "prompt", "empty prompt"),
    ]
    for request, field, words in cases:
        err = rpc_error(call, request, timeout=10)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert words in err.details()
        info = error_info(err.trailing_metadata())
        assert (info.reason, info.metadata["field"]) == ("INVALID_REQUEST", field)
        (violation,) = bad_request(err.trailing_metadata()).field_violations
        assert violation.field == field and words in violation.description


def test_bad_request_does_not_harm_one_in_flight(stub):
    want = stub.Complete(long_request(pb.CompleteRequest, "adapter-004", MEDIUM), timeout=60)
    call = stub.Generate(long_request(adapter="adapter-004", n=MEDIUM), timeout=60)
    head = [next(call) for _ in range(3)]
    for fields, code, _reason, _words in ERROR_CASES.values():
        err = rpc_error(stub.Generate, error_request(pb.GenerateRequest, fields), timeout=10)
        assert err.code().name == code
    ids, _text, messages = collect(call)
    assert [t for m in head for t in m.token_ids] + ids == list(want.token_ids)
    assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH


def test_request_id_already_in_flight_is_invalid(stub):
    params = pb.SamplingParams(max_new_tokens=LONG, ignore_eos=True)
    call = stub.Generate(pb.GenerateRequest(request_id="twin", prompt="a", params=params))
    next(call)
    err = rpc_error(stub.Complete, pb.CompleteRequest(request_id="twin", prompt="b"), timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "twin" in err.details()
    call.cancel()
    wait_idle(stub)
    reply = stub.Complete(
        pb.CompleteRequest(
            request_id="twin", prompt="b", params=pb.SamplingParams(max_new_tokens=2)
        )
    )
    assert reply.request_id == "twin"


def test_model_info_reports_the_limits(stub):
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    stats = stub.GetStats(pb.GetStatsRequest())
    assert info.max_new_tokens_limit == LIMIT and info.max_model_len == 2048
    assert (info.vocab_size, info.num_layers, info.hidden_size) == (512, 2, 64)
    assert info.architecture == "LlamaForCausalLM" and info.dtype == "float32"
    assert (info.total_pages, info.page_bytes) == (stats.total_pages, stats.page_bytes)
    assert info.block_size == 16 and info.eos_token_id >= 0 and info.model_path


def test_model_info_names_the_model(stub, tiny_demo):
    assert stub.GetModelInfo(pb.GetModelInfoRequest()).model_name == tiny_demo.model_dir.name


def test_adapter_admin_errors_and_round_trip(stub, bad_adapters, tiny_demo):
    cases = [
        (pb.LoadAdapterRequest(adapter_id=""), "INVALID_ARGUMENT", "INVALID_REQUEST"),
        (
            pb.LoadAdapterRequest(adapter_id="ghost", source=str(bad_adapters / "nowhere")),
            "NOT_FOUND",
            "ADAPTER_NOT_FOUND",
        ),
        (
            pb.LoadAdapterRequest(adapter_id="dora-2", source=str(bad_adapters / "dora")),
            "FAILED_PRECONDITION",
            "ADAPTER_INCOMPATIBLE",
        ),
    ]
    for request, code, reason in cases:
        err = rpc_error(stub.LoadAdapter, request, timeout=10)
        assert (err.code().name, error_info(err.trailing_metadata()).reason) == (code, reason)
    err = rpc_error(stub.UnloadAdapter, pb.UnloadAdapterRequest(adapter_id="never-loaded"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    # a good adapter under a new name: load (pinned), serve, unload, gone
    source = str(tiny_demo.adapter_dirs[9])
    info = stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id="renamed", source=source, pin=True))
    assert info.adapter.state == pb.ADAPTER_STATE_DEVICE and info.adapter.pages > 0
    assert info.adapter.pinned and info.adapter.rank > 0
    req = {"prompt": "the bridge", "params": pb.SamplingParams(max_new_tokens=8)}
    same = stub.Complete(pb.CompleteRequest(adapter_id="adapter-009", **req))
    assert stub.Complete(pb.CompleteRequest(adapter_id="renamed", **req)).token_ids == (
        same.token_ids
    )
    stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id="renamed"))
    err = rpc_error(stub.Complete, pb.CompleteRequest(adapter_id="renamed", **req))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert_pages_add_up(wait_idle(stub))


@pytest.fixture(scope="module")
def small_server(start_server):
    """One request runs, one waits, the next is refused."""
    return start_server(engine={"max_running": 1, "max_waiting": 1})


def test_full_admission_queue_is_resource_exhausted(small_server):
    small = small_server

    async def flood():
        async with grpc.aio.insecure_channel(small.target) as ch:
            stub = pb_grpc.LoraPoolServiceStub(ch)

            async def one(i):
                request = pb.GenerateRequest(
                    prompt=prompt_words(i, 6),
                    adapter_id=f"adapter-{i:03d}",
                    params=pb.SamplingParams(max_new_tokens=200, ignore_eos=True),
                )
                try:
                    messages = [m async for m in stub.Generate(request, timeout=60)]
                    return "OK", messages[-1].finish_reason, sum(len(m.token_ids) for m in messages)
                except grpc.aio.AioRpcError as err:
                    return err.code().name, error_info(err.trailing_metadata()).reason, 0

            results = await asyncio.gather(*(one(i) for i in range(8)))
            stats = await stub.GetStats(pb.GetStatsRequest())
            return results, stats

    results, stats = asyncio.run(flood())
    outcomes = Counter(r[0] for r in results)
    assert set(outcomes) == {"OK", "RESOURCE_EXHAUSTED"}, results
    assert outcomes["OK"] >= 1 and outcomes["RESOURCE_EXHAUSTED"] >= 5, results
    for status, detail, tokens in results:
        if status == "OK":
            assert (detail, tokens) == (pb.FINISH_REASON_LENGTH, 200)
        else:
            assert detail == "QUEUE_FULL"
    assert stats.kv_pages == 0 and stats.running_requests == stats.waiting_requests == 0


def test_cancel_while_waiting_leaves_the_queue(small_server):
    with grpc.insecure_channel(small_server.target) as ch:
        stub = pb_grpc.LoraPoolServiceStub(ch)
        running = stub.Generate(long_request(adapter="adapter-001"), timeout=60)
        next(running)
        waiting = stub.Generate(long_request(adapter="adapter-002"), timeout=60)
        deadline = time.monotonic() + 5
        while stub.GetStats(pb.GetStatsRequest()).waiting_requests != 1:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.01)
        waiting.cancel()
        deadline = time.monotonic() + 2
        while (stats := stub.GetStats(pb.GetStatsRequest())).waiting_requests:
            assert time.monotonic() < deadline, "the cancelled request stayed queued"
            time.sleep(0.01)
        assert stats.running_requests == 1 and stats.kv_pages > 0
        err = rpc_error(list, waiting)
        assert err.code() == grpc.StatusCode.CANCELLED
        running.cancel()
        assert_pages_add_up(wait_idle(stub))


# -- health, drain, shutdown -----------------------------------------------------------------


def test_health_serving_after_start(channel):
    assert health_status(channel) == "SERVING"
    assert health_status(channel, SERVICE) == "SERVING"
    err = rpc_error(
        health_pb2_grpc.HealthStub(channel).Check,
        health_pb2.HealthCheckRequest(service="no.such.Service"),
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_drain_turns_health_not_serving_refuses_new_work_and_finishes_streams(start_server):
    srv = start_server(grace_s=30.0)
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LoraPoolServiceStub(ch)
        assert health_status(ch) == "SERVING"
        calls = [
            stub.Generate(long_request(adapter=f"adapter-00{i}", n=MEDIUM), timeout=60)
            for i in (1, 2)
        ]
        heads = [next(c) for c in calls]
        stopping = srv.submit(srv.server.stop())
        wait_health(ch, "NOT_SERVING")
        assert health_status(ch, SERVICE) == "NOT_SERVING"
        for method in ("Generate", "Complete"):
            message = pb.GenerateRequest if method == "Generate" else pb.CompleteRequest
            err = rpc_error(getattr(stub, method), message(prompt="hi"), timeout=10)
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(err.trailing_metadata()).reason == "DRAINING"
            assert "draining" in err.details()
        for head, call in zip(heads, calls, strict=True):
            ids, _text, messages = collect(call)
            assert len(head.token_ids) + len(ids) == MEDIUM
            assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
        stopping.result(30)
    assert srv.stopped


def test_drain_past_the_grace_period_cancels_what_is_left(start_server):
    srv = start_server(grace_s=0.3)
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LoraPoolServiceStub(ch)
        call = stub.Generate(long_request(), timeout=60)
        head = next(call)
        stopping = srv.submit(srv.server.stop())
        ids, _text, messages = collect(call)
        # the stream ends normally, saying why it is short
        assert messages[-1].finish_reason == pb.FINISH_REASON_CANCELLED
        assert messages[-1].usage.completion_tokens == len(head.token_ids) + len(ids) < LONG
        stopping.result(10)
    assert srv.stopped


def wait_port_serving(target: str, proc, timeout: float = 120.0) -> None:
    with grpc.insecure_channel(target) as ch:
        wait_health(ch, "SERVING", timeout, proc)


@contextlib.contextmanager
def serve_process(tiny_demo, tmp_path, grace: int):
    """`lorapool serve` in a subprocess on the tiny demo, SERVING when this yields
    (process, target, log path); killed at the end if it is still running."""
    port = free_port()
    target = f"127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    cmd = [
        LORAPOOL, "serve", "--model", str(tiny_demo.model_dir),
        "--adapters", str(tiny_demo.adapters_dir), "--port", str(port),
        "--metrics-port", "0", "--grace", str(grace), "--log-level", "INFO", "--pool-mib", "32",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port_serving(target, proc)
        yield proc, target, log_path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_lets_streams_in_flight_finish_then_exits_0(tiny_demo, tmp_path):
    with serve_process(tiny_demo, tmp_path, grace=30) as (proc, target, log_path):
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.LoraPoolServiceStub(ch)
            n = MEDIUM
            calls = [
                stub.Generate(
                    pb.GenerateRequest(
                        adapter_id=f"adapter-00{i}",
                        prompt=prompt_words(i, 8),
                        params=pb.SamplingParams(max_new_tokens=n, ignore_eos=True),
                    ),
                    timeout=60,
                )
                for i in range(3)
            ]
            heads = [next(c) for c in calls]  # every stream is in flight
            proc.send_signal(signal.SIGTERM)
            wait_health(ch, "NOT_SERVING")
            err = rpc_error(stub.Complete, pb.CompleteRequest(prompt="late"), timeout=10)
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            for head, call in zip(heads, calls, strict=True):
                ids, _text, messages = collect(call)
                assert len(head.token_ids) + len(ids) == n
                assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert proc.wait(30) == 0, log_path.read_text()
    log = log_path.read_text()
    assert "draining" in log and "stopped" in log


def test_a_second_sigterm_cuts_the_grace_period(tiny_demo, tmp_path):
    with serve_process(tiny_demo, tmp_path, grace=600) as (proc, target, log_path):
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.LoraPoolServiceStub(ch)
            call = stub.Generate(long_request(n=LIMIT), timeout=120)
            head = next(call)
            proc.send_signal(signal.SIGTERM)
            wait_health(ch, "NOT_SERVING")
            proc.send_signal(signal.SIGTERM)  # the operator will not wait 600 s
            ids, _text, messages = collect(call)
            assert messages[-1].finish_reason == pb.FINISH_REASON_CANCELLED
            assert len(head.token_ids) + len(ids) < LIMIT
        assert proc.wait(30) == 0, log_path.read_text()
    assert "second signal" in log_path.read_text()


# -- API key ---------------------------------------------------------------------------------


def test_api_key_guards_every_rpc_but_health_and_reflection(start_server):
    key = "k3y-for-tests"
    srv = start_server(api_key=key)
    request = {"prompt": "the city", "params": pb.SamplingParams(max_new_tokens=5)}
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LoraPoolServiceStub(ch)
        for metadata in [(), (("x-api-key", "wrong"),), (("authorization", "Bearer nope"),)]:
            for fn, msg in [
                (stub.Complete, pb.CompleteRequest(**request)),
                (stub.Generate, pb.GenerateRequest(**request)),
                (stub.GetStats, pb.GetStatsRequest()),
                (stub.ListAdapters, pb.ListAdaptersRequest()),
            ]:
                err = rpc_error(fn, msg, metadata=metadata, timeout=10)
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (fn, metadata)
                assert "API key" in err.details()
        assert health_status(ch) == "SERVING"
        services, _files = reflected_files(ch, SERVICE)
        assert SERVICE in services

        reply = stub.Complete(pb.CompleteRequest(**request), metadata=(("x-api-key", key),))
        bearer = (("authorization", f"Bearer {key}"),)
        ids, _text, _messages = collect(
            stub.Generate(pb.GenerateRequest(**request), metadata=bearer)
        )
        assert ids == list(reply.token_ids) and len(ids) >= 1
    with LoraPoolClient(srv.target, api_key=key, timeout=30) as client:
        assert client.complete("the city", max_new_tokens=5).token_ids == ids
        assert client.stats().total_pages > 0
    with LoraPoolClient(srv.target, timeout=30) as client, pytest.raises(LoraPoolClientError) as e:
        client.stats()
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED


# -- the command line ------------------------------------------------------------------------


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([LORAPOOL, *args], capture_output=True, timeout=timeout)


def test_cli_generate_streams_to_stdout(server, stub):
    prompt, adapter = "a quiet morning in the valley", "adapter-006"
    want = stub.Complete(
        pb.CompleteRequest(
            prompt=prompt, adapter_id=adapter, params=pb.SamplingParams(max_new_tokens=12)
        )
    )
    common = ["--target", server.target, "--adapter", adapter, "--max-new-tokens", "12"]
    out = run_cli("generate", *common, prompt)
    assert out.returncode == 0, out.stderr.decode()
    text = out.stdout.decode()
    assert text == want.text + ("" if want.text.endswith("\n") else "\n")

    out = run_cli("generate", *common, "--json", prompt)
    assert out.returncode == 0, out.stderr.decode()
    lines = [json.loads(line) for line in out.stdout.decode().splitlines()]
    assert [t for line in lines for t in line["token_ids"]] == list(want.token_ids)
    assert lines[-1]["finish_reason"] == FinishReason(want.finish_reason).name
    assert lines[-1]["usage"]["completion_tokens"] == len(want.token_ids)
    assert all(line["finish_reason"] == "NONE" for line in lines[:-1])

    out = run_cli("generate", "--target", server.target, "--adapter", "no-such-adapter", "hi")
    assert out.returncode == 1 and b"NOT_FOUND" in out.stderr


def test_cli_bench_json_counts_what_it_sent(server, stub):
    total, adapters, seed = 12, 5, 3
    flags = ["--adapters", str(adapters), "--prompt-tokens", "4:12", "--max-new-tokens", "3:9"]
    before = wait_idle(stub)
    served = {
        a.adapter_id: a.requests_served
        for a in stub.ListAdapters(pb.ListAdaptersRequest()).adapters
    }
    out = run_cli(
        "bench", "--target", server.target, "-n", str(total), "-c", "4",
        "--seed", str(seed), *flags, "--json", "-",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr.decode()
    report = json.loads(out.stdout.decode().strip().splitlines()[-1])
    trace = make_trace(total, adapters, prompt_tokens=(4, 12), max_new_tokens=(3, 9), seed=seed)
    assert report["count"] == total and len(report["details"]) == total
    assert report["statusCodeDistribution"] == {"OK": total}
    assert report["tokens"]["total"] == sum(item.max_new_tokens for item in trace)
    assert report["tokens"]["finish_reasons"] == {"LENGTH": total}
    assert report["tokens"]["ttft"]["p50"] > 0 and report["tokens"]["itl"]["p50"] > 0
    after = wait_idle(stub)
    assert after.generated_tokens - before.generated_tokens == report["tokens"]["total"]
    sent = Counter(item.adapter_id for item in trace)
    now = {
        a.adapter_id: a.requests_served
        for a in stub.ListAdapters(pb.ListAdaptersRequest()).adapters
    }
    assert {k: now[k] - served.get(k, 0) for k in sent} == dict(sent)


# -- metrics ---------------------------------------------------------------------------------


def test_metrics_endpoint(server, stub, metrics_port):
    from prometheus_client.parser import text_string_to_metric_families

    stub.Complete(pb.CompleteRequest(prompt="metrics", params=pb.SamplingParams(max_new_tokens=3)))
    rpc_error(stub.Complete, pb.CompleteRequest(prompt="x", adapter_id="no-such-adapter"))
    stats = wait_idle(stub)
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    ok = samples[
        ("lorapool_requests_total", (("adapter", "base"), ("method", "Complete"), ("status", "OK")))
    ]
    assert ok >= 1
    refused = [
        value
        for (name, labels), value in samples.items()
        if name == "lorapool_requests_total"
        and {("method", "Complete"), ("status", "NOT_FOUND")} <= set(labels)
    ]
    assert sum(refused) >= 1
    # ids that no source knows share one series, so random ids cannot grow /metrics
    adapters = {
        dict(labels).get("adapter")
        for name, labels in samples
        if name.startswith("lorapool_requests")
    }
    assert "no-such-adapter" not in adapters and "unknown" in adapters
    for owner in ("free", "kv", "cached", "adapter"):
        got = samples[("lorapool_pool_pages", (("owner", owner),))]
        assert got == getattr(stats, f"{owner}_pages"), owner
    assert samples[("lorapool_time_to_first_token_seconds_count", ())] >= 1


def test_a_thread_per_blocking_stream_also_works(server):
    """Blocking streams from several threads on one LoraPoolClient."""
    results: dict[int, list[int]] = {}
    with LoraPoolClient(server.target, timeout=60) as client:

        def worker(i):
            events = list(client.generate(prompt_words(i, 5), max_new_tokens=8, ignore_eos=True))
            results[i] = [t for e in events for t in e.token_ids]

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for i in range(6):
            assert (
                results[i]
                == client.complete(prompt_words(i, 5), max_new_tokens=8, ignore_eos=True).token_ids
            )


def test_metrics_port_is_free_again_after_stop(start_server):
    port = free_port()
    first = start_server(metrics_port=port)
    first.close()
    second = start_server(metrics_port=port)  # raised EADDRINUSE while stop() left it open
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert b"lorapool_pool_pages" in reply.read()
    second.close()


def test_a_huge_prompt_does_not_stall_other_streams(stub):
    call = stub.Generate(long_request(n=MEDIUM), timeout=60)
    arrivals = [time.perf_counter()]
    next(call)
    reader = threading.Thread(
        target=lambda: arrivals.extend(time.perf_counter() for _ in call), daemon=True
    )
    reader.start()
    huge = "silver market " * 200_000  # 2.8 MB of text, far more than 2048 tokens
    err = rpc_error(stub.Complete, pb.CompleteRequest(prompt=huge), timeout=60)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    reader.join(60)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert max(gaps) < 0.5, f"another stream stalled for {max(gaps):.1f}s"
