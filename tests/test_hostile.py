"""No request can hurt another: hostile values, broken adapters and abuse through
gRPC. Each test triggers the fault for real and checks the invariant after: the
other requests finish with their correct tokens, the pool returns to idle (no KV
pages, nothing running or waiting, page counts adding up) and the server answers."""

from __future__ import annotations

import concurrent.futures
import time

import grpc
import pytest
import torch
from helpers import assert_idle

from lorapool.convert import bad_request, error_info
from lorapool.v1 import lorapool_pb2 as pb
from lorapool.v1 import lorapool_pb2_grpc as pb_grpc

GREEDY_IDS = [11, 12, 13, 14, 15]


@pytest.fixture(scope="module")
def bad_sources(tmp_path_factory, tiny_demo):
    """A directory LoadAdapter may read (it is on the allow-list) holding a corrupt
    copy of a demo adapter; other names under it do not exist."""
    import shutil

    root = tmp_path_factory.mktemp("bad-sources")
    corrupt = root / "corrupt"
    shutil.copytree(tiny_demo.adapter_dirs[2], corrupt)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return root


@pytest.fixture(scope="module")
def server(start_server, tiny_demo, bad_sources):
    return start_server(
        engine={"pool_mib": 8, "max_new_tokens_limit": 256},
        adapter_source_allow=[str(tiny_demo.adapters_dir), str(bad_sources)],
    )


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.target)
    yield pb_grpc.LoraPoolServiceStub(channel)
    channel.close()


def greedy_request(adapter: str = "adapter-001", n: int = 40) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        adapter_id=adapter,
        input_ids=pb.TokenIds(ids=GREEDY_IDS),
        params=pb.SamplingParams(max_new_tokens=n, ignore_eos=True),
    )


def stream_tokens(stub, request, timeout: float = 60) -> list[int]:
    return [t for reply in stub.Generate(request, timeout=timeout) for t in reply.token_ids]


@pytest.fixture(scope="module")
def expected(stub) -> list[int]:
    """The greedy stream's tokens when it runs alone."""
    return stream_tokens(stub, greedy_request())


def beside_a_greedy_stream(stub, expected: list[int], hostile):
    """Run hostile(stub) while a greedy stream runs; the stream's tokens must be the
    ones it produces alone. Returns hostile's result or the RpcError it raised."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        good = pool.submit(stream_tokens, stub, greedy_request())
        time.sleep(0.05)
        bad = pool.submit(hostile, stub)
        assert good.result(60) == expected
        try:
            outcome = bad.result(60)
        except grpc.RpcError as exc:
            outcome = exc
    assert_idle(stub)
    return outcome


# -- 1. sampling values ------------------------------------------------------------------------


def sampled(params: pb.SamplingParams):
    def call(stub):
        request = pb.GenerateRequest(input_ids=pb.TokenIds(ids=[5, 6, 7]), params=params)
        return stream_tokens(stub, request)

    return call


def test_a_vanishing_temperature_is_greedy_and_harms_nobody(stub, expected):
    tokens = beside_a_greedy_stream(
        stub, expected, sampled(pb.SamplingParams(temperature=1e-300, max_new_tokens=40))
    )
    greedy = sampled(pb.SamplingParams(max_new_tokens=40))(stub)
    assert tokens == greedy


@pytest.mark.parametrize("penalty", [1e-300, 1e300], ids=["tiny", "huge"])
def test_an_extreme_repetition_penalty_samples_and_harms_nobody(stub, expected, penalty):
    params = pb.SamplingParams(
        temperature=1.0, repetition_penalty=penalty, max_new_tokens=30, ignore_eos=True
    )
    tokens = beside_a_greedy_stream(stub, expected, sampled(params))
    assert len(tokens) == 30


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", -1.0),
        ("repetition_penalty", float("nan")),
        ("repetition_penalty", float("inf")),
        ("repetition_penalty", 0.0),
        ("top_p", float("nan")),
    ],
)
def test_non_finite_or_out_of_range_floats_are_refused(stub, expected, field, value):
    params = pb.SamplingParams(max_new_tokens=8, **{field: value})
    outcome = beside_a_greedy_stream(stub, expected, sampled(params))
    assert isinstance(outcome, grpc.RpcError)
    assert outcome.code() == grpc.StatusCode.INVALID_ARGUMENT, outcome.details()
    assert field in outcome.details()
    info = error_info(outcome.trailing_metadata())
    assert info.reason == "INVALID_REQUEST" and info.metadata["field"] == f"params.{field}"
    (violation,) = bad_request(outcome.trailing_metadata()).field_violations
    assert violation.field == f"params.{field}" and field in violation.description


def test_a_huge_stop_list_is_refused(stub):
    params = pb.SamplingParams(max_new_tokens=4, stop_token_ids=list(range(200_000)))
    with pytest.raises(grpc.RpcError) as exc:
        sampled(params)(stub)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stop_token_ids" in exc.value.details()
    assert_idle(stub)


def test_sampling_never_raises_on_overflowed_rows():
    """The per-row sampler itself: rows of +inf, -inf and NaN give a token, never an
    error (torch.multinomial raises on such probabilities)."""
    from types import SimpleNamespace

    from lorapool.server.engine.sampling import sample
    from lorapool.types import SamplingParams

    def seq(**params):
        return SimpleNamespace(params=SamplingParams(**params), all_ids=[1, 2], generator=None)

    rows = torch.tensor(
        [
            [float("inf"), 0.0, float("inf"), 1.0],
            [float("-inf")] * 4,
            [float("nan"), 3.0, float("nan"), 1.0],
            [1e38, -1e38, 5.0, 0.0],
        ]
    )
    seqs = [
        seq(temperature=1.0),
        seq(temperature=0.7, top_p=0.5),
        seq(temperature=2.0, top_k=2),
        seq(temperature=1e-4, repetition_penalty=1e-30),
    ]
    tokens, _ = sample(rows, seqs)
    assert tokens[0] in (0, 2)
    assert 0 <= tokens[1] < 4
    assert tokens[2] in (1, 3)  # the NaN entries are never drawn
    assert tokens[3] in (0, 1, 2, 3)


# -- 3. tokenization ---------------------------------------------------------------------------


def test_a_huge_tokenize_is_refused_at_once(stub, expected):
    """A text no context can hold is refused by length before the tokenizer sees it
    (it used to stall every stream for seconds on the event loop)."""

    def tokenize(stub):
        return stub.Tokenize(pb.TokenizeRequest(text="w7 " * 4_000_000), timeout=30)

    outcome = beside_a_greedy_stream(stub, expected, tokenize)
    assert isinstance(outcome, grpc.RpcError)
    assert outcome.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "text of 12000000 characters" in outcome.details()
    ok = stub.Tokenize(pb.TokenizeRequest(text="river stone", return_tokens=True), timeout=10)
    assert len(ok.token_ids) == len(ok.tokens) > 0


@pytest.mark.parametrize(
    "messages, words",
    [
        ([pb.ChatMessage(role="user", content="hi")] * 100_000, "chat has 100000 messages"),
        ([pb.ChatMessage(role="user", content="w7 " * 3_500_000)], "characters"),
    ],
    ids=["1e5-messages", "10MB-content"],
)
def test_a_huge_chat_is_refused_at_once(stub, expected, messages, words):
    """A conversation no context can hold is refused by its size, before the chat
    template or the tokenizer sees it, and harms nobody."""

    def chat(stub):
        request = pb.GenerateRequest(chat=pb.Chat(messages=messages))
        started = time.monotonic()
        try:
            return stream_tokens(stub, request)
        finally:
            chat.seconds = time.monotonic() - started

    outcome = beside_a_greedy_stream(stub, expected, chat)
    assert isinstance(outcome, grpc.RpcError)
    assert outcome.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in outcome.details()
    assert error_info(outcome.trailing_metadata()).metadata["field"] == "chat.messages"
    assert chat.seconds < 5, "refused at once"
    small = pb.Chat(messages=[pb.ChatMessage(role="user", content="river stone")])
    assert stub.Tokenize(pb.TokenizeRequest(chat=small), timeout=30).token_ids


async def test_a_checkpoint_without_tokenizer_serves_token_ids(make_engine, tiny_demo, tmp_path):
    """Token-id requests are served; prompts, stop strings and Tokenize are refused
    with FAILED_PRECONDITION saying why; --tokenizer names another directory's."""
    import shutil

    from lorapool.errors import NoTokenizer
    from lorapool.server.engine.tokenizer import TOKENIZER_FILES, has_tokenizer
    from lorapool.types import GenerationRequest, SamplingParams

    bare = tmp_path / "bare"
    shutil.copytree(tiny_demo.model_dir, bare)
    for path in bare.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            path.unlink()
    assert not has_tokenizer(bare) and has_tokenizer(tiny_demo.model_dir), TOKENIZER_FILES
    engine = await make_engine(model_dir=str(bare))
    assert engine.tokenizer is None

    async def run(stop=(), **fields):
        params = SamplingParams(max_new_tokens=5, ignore_eos=True, stop=list(stop))
        request = GenerationRequest(request_id="", params=params, **fields)
        return [e async for e in engine.generate(request)]

    events = await run(input_ids=[5, 6, 7], adapter_id="adapter-002")
    assert sum(len(e.token_ids) for e in events) == 5
    assert all(e.text == "" for e in events)
    for call in (run(prompt="river stone"), engine.tokenize("river"), run(["x"], input_ids=[5])):
        with pytest.raises(NoTokenizer) as exc:
            await call
        assert exc.value.status == "FAILED_PRECONDITION" and "--tokenizer" in str(exc.value)
    assert engine.stats().kv_pages == 0
    named = await make_engine(model_dir=str(bare), tokenizer_dir=str(tiny_demo.model_dir))
    ids, _ = await named.tokenize("river stone")
    assert ids


# -- 4, 7. adapter loads and ids ---------------------------------------------------------------


def load(stub, adapter_id: str, source: str = ""):
    return stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id=adapter_id, source=source), timeout=30)


def listed(stub) -> dict[str, pb.AdapterInfo]:
    return {a.adapter_id: a for a in stub.ListAdapters(pb.ListAdaptersRequest()).adapters}


def test_a_failed_reload_keeps_the_old_adapter_serving(stub, expected, bad_sources):
    """LoadAdapter of a served name from a broken source fails, and the name keeps
    serving its old weights for every caller (it failed them all before)."""
    before = listed(stub)["adapter-001"]
    with pytest.raises(grpc.RpcError) as exc:
        load(stub, "adapter-001", str(bad_sources / "corrupt"))
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert str(bad_sources) not in exc.value.details(), "no server path in client messages"
    assert "corrupt" in exc.value.details()
    with pytest.raises(grpc.RpcError) as exc:
        load(stub, "adapter-001", str(bad_sources / "nonexistent"))
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    assert stream_tokens(stub, greedy_request()) == expected
    after = listed(stub)["adapter-001"]
    assert (after.source, after.content_hash) == (before.source, before.content_hash)
    assert_idle(stub)


def test_failed_loads_of_new_names_leave_no_entry_and_no_label(server, stub, bad_sources):
    for i in range(5):
        with pytest.raises(grpc.RpcError):
            load(stub, f"ghost-{i}", str(bad_sources / f"missing-{i}"))
        with pytest.raises(grpc.RpcError) as exc:
            load(stub, f"broken-{i}", str(bad_sources / "corrupt"))
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    names = set(listed(stub))
    assert not any(n.startswith(("ghost-", "broken-")) for n in names), names
    labels = {
        sample.labels.get("adapter")
        for metric in server.server.metrics.registry.collect()
        for sample in metric.samples
    }
    assert not any(str(n).startswith(("ghost-", "broken-")) for n in labels), labels
    with pytest.raises(grpc.RpcError) as exc:
        stream_tokens(stub, greedy_request(adapter="broken-0"))
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(exc.value.trailing_metadata()).metadata["adapter_id"] == "broken-0"
    assert_idle(stub)


@pytest.mark.parametrize(
    "adapter_id",
    ["a" * 300, "x\nINFO forged line", "../adapters", "has space", "-dash-first", "é"],
    ids=["too-long", "newline", "dot-dot", "space", "dash-first", "non-ascii"],
)
def test_malformed_adapter_ids_are_invalid_argument(stub, caplog, tiny_demo, adapter_id):
    for call in (
        lambda: stream_tokens(stub, greedy_request(adapter=adapter_id)),
        lambda: load(stub, adapter_id, ""),
        lambda: stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id=adapter_id), timeout=10),
    ):
        with pytest.raises(grpc.RpcError) as exc:
            call()
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.value.details()
        assert "adapter_id" in exc.value.details()
        assert str(tiny_demo.adapters_dir) not in exc.value.details()
    assert not any("\nINFO forged" in r.getMessage() for r in caplog.records)
    assert_idle(stub)


# -- 5. pinned adapters, 12. queue time --------------------------------------------------------


@pytest.fixture(scope="module")
def pinned_server(start_server, tiny_demo):
    """A pool only 12 pages larger than its pinned adapter (adapter-002, rank 16 on
    all seven modules)."""
    from lorapool.memory.adapter_layout import pack_adapter
    from lorapool.memory.peft_adapter import read_adapter
    from lorapool.memory.pool import PageLayout
    from lorapool.server.model.checkpoint import load_spec

    spec = load_spec(tiny_demo.model_dir)
    layout = PageLayout(spec.num_layers, 16, spec.num_kv_heads, spec.head_dim)
    w = read_adapter(tiny_demo.adapter_dirs[2], spec)
    packed = pack_adapter(spec, w, torch.float32, layout.page_elems)
    pinned = packed.num_pages(layout.page_elems)
    pages = pinned + 12
    return (
        start_server(
            engine={
                "pool_mib": pages * layout.page_elems * 4 / 2**20,
                "pinned": ["adapter-002"],
                "max_new_tokens_limit": 1024,
            }
        ),
        pinned,
        pages,
    )


def test_a_request_that_cannot_fit_beside_the_pins_is_refused_at_once(pinned_server):
    server, pinned, pages = pinned_server
    channel = grpc.insecure_channel(server.target)
    stub = pb_grpc.LoraPoolServiceStub(channel)
    try:
        stats = stub.GetStats(pb.GetStatsRequest(), timeout=10)
        assert (stats.total_pages, stats.adapter_pages) == (pages, pinned)
        # 13 blocks of KV: fits the pool, not the 12 pages the pin leaves.
        big = pb.GenerateRequest(
            input_ids=pb.TokenIds(ids=[5] * 16),
            params=pb.SamplingParams(max_new_tokens=12 * 16, ignore_eos=True),
        )
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as exc:
            stream_tokens(stub, big, timeout=30)
        assert time.monotonic() - started < 5, "refused at once, not at the deadline"
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"pinned adapters hold {pinned}" in exc.value.details()
        assert error_info(exc.value.trailing_metadata()).reason == "POOL_PINNED"
        # Requests for the pinned adapter itself fit: its pages are theirs to share.
        ok = pb.GenerateRequest(
            adapter_id="adapter-002",
            input_ids=pb.TokenIds(ids=[5] * 16),
            params=pb.SamplingParams(max_new_tokens=11 * 16, ignore_eos=True),
        )
        assert len(stream_tokens(stub, ok)) == 11 * 16
        assert_idle(stub)
    finally:
        channel.close()


def test_queue_time_ends_at_admission_not_at_the_first_token(stub):
    reply = stub.Complete(
        pb.CompleteRequest(
            input_ids=pb.TokenIds(ids=list(range(5, 400))),
            params=pb.SamplingParams(max_new_tokens=2, ignore_eos=True),
        ),
        timeout=30,
    )
    usage = reply.usage
    assert 0 <= usage.queue_ms < usage.ttft_ms, usage
