"""End-to-end behaviour of the engine on the tiny demo model: what a user of
Engine.generate / load_adapter / stats can observe."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import shutil
import time
from pathlib import Path

import pytest
import torch

from lorapool.errors import (
    AdapterIncompatible,
    AdapterNotFound,
    AdapterTooLarge,
    Draining,
    InvalidRequest,
    LoraPoolError,
    QueueFull,
)
from lorapool.types import (
    AdapterState,
    FinishReason,
    GenerationRequest,
    SamplingParams,
)

ADAPTER = "adapter-{:03d}".format


def make_request(rid, ids, adapter="", **params) -> GenerationRequest:
    params.setdefault("ignore_eos", True)
    return GenerationRequest(
        request_id=rid, input_ids=list(ids), adapter_id=adapter, params=SamplingParams(**params)
    )


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 512) for _ in range(n)]


class Result:
    def __init__(self):
        self.tokens: list[int] = []
        self.text = ""
        self.events = []
        self.times: list[float] = []

    @property
    def last(self):
        return self.events[-1]

    @property
    def finish(self) -> FinishReason:
        return self.last.finish_reason


async def collect(engine, request) -> Result:
    out = Result()
    async for ev in engine.generate(request):
        out.tokens += ev.token_ids
        out.text += ev.text
        out.events.append(ev)
        out.times.append(time.monotonic())
    assert out.finish != FinishReason.NONE
    return out


def assert_pages_balance(stats) -> None:
    assert (
        stats.free_pages + stats.kv_pages + stats.cached_pages + stats.adapter_pages
        == stats.total_pages
    ), stats


async def wait_steps(engine, n: int, timeout: float = 10.0) -> None:
    target = engine.steps + n
    deadline = time.monotonic() + timeout
    while engine.steps < target:
        assert time.monotonic() < deadline, "the engine stopped stepping"
        await asyncio.sleep(0.001)


async def wait_for(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.001)


# --------------------------------------------------------------------- memory pressure


def pressure_requests() -> list[GenerationRequest]:
    """50 requests over the 20 demo adapters (1 to 55 pages each); every fifth one
    samples with a seed, the others are greedy."""
    out = []
    for i in range(50):
        sampled = dict(temperature=0.8, top_p=0.9, top_k=50, seed=i) if i % 5 == 4 else {}
        out.append(
            make_request(
                f"r{i}",
                prompt(i, 12 + i % 19),
                ADAPTER(i % 20),
                max_new_tokens=14 + i % 9,
                **sampled,
            )
        )
    return out


PRESSURE_POOL_PAGES = 72  # the largest adapter alone takes 55


async def test_pressure_evicts_and_preempts_yet_outputs_match_alone(make_engine):
    roomy = await make_engine(pool_mib=64)
    alone = {r.request_id: (await collect(roomy, r)).tokens for r in pressure_requests()}

    small = await make_engine(pool_pages=PRESSURE_POOL_PAGES)
    specs = pressure_requests()
    results = await asyncio.gather(*(collect(small, r) for r in specs))
    stats = small.stats()
    assert stats.adapter_evictions > 0, stats
    assert stats.preemptions > 0, stats
    for request, res in zip(specs, results, strict=True):
        assert res.finish == FinishReason.LENGTH
        assert res.tokens == alone[request.request_id], request.request_id
    assert stats.kv_pages == 0
    assert stats.running_requests == stats.waiting_requests == 0
    assert_pages_balance(stats)

    for info in small.list_adapters():
        if info.state != AdapterState.KNOWN:
            await small.unload_adapter(info.adapter_id)
    small.clear_prefix_cache()
    stats = small.stats()
    assert stats.adapter_pages == stats.cached_pages == 0, stats
    assert stats.free_pages == stats.total_pages, stats


async def test_adapter_evicted_from_both_tiers_mid_schedule_reloads(make_engine):
    """Admitting one adapter evicts another idle one whose host copy is already gone;
    a request for the evicted one in the same step waits for a reload instead of
    breaking the schedule (which used to stop the engine loop for good)."""
    a, b = ADAPTER(3), ADAPTER(4)  # 23 and 20 pages; host copies 184 and 164 KB
    engine = await make_engine(pool_pages=30, host_cache_mib=0.19, watermark=0.0)
    req_a = make_request("a", prompt(1, 10), a, max_new_tokens=4)
    req_b = make_request("b", prompt(2, 10), b, max_new_tokens=4)
    alone_a = (await collect(engine, req_a)).tokens  # a stays resident, idle
    alone_b = (await collect(engine, req_b)).tokens  # evicts a, keeps b
    await collect(engine, dataclasses.replace(req_a, request_id="a2"))  # a back, b idle
    await engine.load_adapter(b)  # b's copy pushes a's out of the one-copy host cache
    states = {i.adapter_id: i.state for i in engine.list_adapters()}
    assert (states[a], states[b]) == (AdapterState.DEVICE, AdapterState.HOST)
    assert engine.adapters.entries[a].content_hash not in engine.adapters.host
    both = await asyncio.wait_for(
        asyncio.gather(
            collect(engine, dataclasses.replace(req_a, request_id="a3")),
            collect(engine, dataclasses.replace(req_b, request_id="b3")),
        ),
        timeout=30,
    )
    assert [r.tokens for r in both] == [alone_a, alone_b]
    await wait_for(lambda: engine.stats().kv_pages == 0)
    assert_pages_balance(engine.stats())


async def test_pages_balance_at_every_moment_under_pressure(make_engine):
    engine = await make_engine(pool_pages=PRESSURE_POOL_PAGES)
    seen = []
    done = False

    async def watch():
        while not done:
            s = engine.stats()
            seen.append(
                s.free_pages + s.kv_pages + s.cached_pages + s.adapter_pages - s.total_pages
            )
            await asyncio.sleep(0.001)  # a busy loop would starve the step thread of the GIL

    watcher = asyncio.create_task(watch())
    await asyncio.gather(*(collect(engine, r) for r in pressure_requests()))
    done = True
    await watcher
    assert len(seen) > 50
    assert [d for d in seen if d] == []


# --------------------------------------------------------------------------- cancelling


@pytest.mark.parametrize("how", ["aclose", "abort", "drop"])
async def test_cancel_mid_stream_frees_pages_and_spares_others(make_engine, how):
    engine = await make_engine(pool_mib=4)
    others = [
        make_request(f"o{i}", prompt(100 + i, 20), ADAPTER(i), max_new_tokens=40) for i in range(3)
    ]
    alone = [(await collect(engine, r)).tokens for r in others]
    others = [
        make_request(f"p{i}", prompt(100 + i, 20), ADAPTER(i), max_new_tokens=40) for i in range(3)
    ]

    victim = make_request("victim", prompt(7, 40), ADAPTER(5), max_new_tokens=400)
    tasks = [asyncio.create_task(collect(engine, r)) for r in others]

    async def read_some(stream):
        got = 0
        async for ev in stream:
            got += len(ev.token_ids)
            if got >= 5:
                break
        seq = engine._requests["victim"].seq
        assert seq.block_table, "the victim should hold pages while streaming"
        return seq, list(seq.block_table), engine.stats()

    if how == "drop":
        # A client that breaks out of the loop and forgets the iterator.
        seq, pages, before = await read_some(engine.generate(victim))
    else:
        stream = engine.generate(victim)
        seq, pages, before = await read_some(stream)
        if how == "aclose":
            await stream.aclose()
        else:
            assert engine.abort("victim")
    # The step in flight (if any) completes; the next one runs without the victim.
    await wait_for(lambda: not seq.block_table and "victim" not in engine._requests, 5.0)
    freed_after_steps = engine.steps - before.steps
    assert not engine.abort("victim")  # nothing left to abort
    assert freed_after_steps <= 2, freed_after_steps
    after = engine.stats()
    live = {p for r in engine._requests.values() for p in r.seq.block_table}
    allocator = engine.pool.allocator
    for page in pages:  # free, an idle prefix-cache block, or already reused by another
        assert (
            allocator.refcount(page) == 0
            or (page in engine.blocks.idle and allocator.refcount(page) == 1)
            or page in live
        ), page
    assert_pages_balance(after)
    if how == "abort":
        await stream.aclose()

    results = await asyncio.gather(*tasks)
    assert [r.tokens for r in results] == alone
    assert all(r.finish == FinishReason.LENGTH for r in results)
    stats = engine.stats()
    assert stats.kv_pages == 0
    assert_pages_balance(stats)


# --------------------------------------------------------------------------- fairness


@pytest.mark.parametrize(
    "limit",
    [
        pytest.param({"pool_mib": 8, "max_running": 2}, id="max_running"),
        pytest.param({"pool_pages": 20}, id="pool"),
    ],
)
async def test_cold_adapter_starts_within_the_starvation_bound(make_engine, limit):
    starvation = 4
    engine = await make_engine(starvation_steps=starvation, **limit)
    hot, cold = ADAPTER(0), ADAPTER(1)
    await engine.load_adapter(hot)
    await engine.load_adapter(cold)
    stop = asyncio.Event()
    counter = iter(range(10**6))

    async def hot_client(slot: int):
        # Each client keeps one long hot request in flight at all times: 6 clients
        # fill the batch (2 slots, or a 20-page pool) and the queue never empties.
        while not stop.is_set():
            rid = f"hot{slot}-{next(counter)}"
            await collect(engine, make_request(rid, prompt(slot, 16), hot, max_new_tokens=60))

    clients = [asyncio.create_task(hot_client(s)) for s in range(6)]
    await wait_for(lambda: engine.steps > 20)

    waited = []
    for k in range(3):
        stream = engine.generate(make_request(f"cold{k}", prompt(50 + k, 16), cold))
        submitted = engine.steps
        first = await stream.__anext__()
        assert first.token_ids
        waited.append(engine.steps - submitted)
        await stream.aclose()
        await wait_steps(engine, 7)
    stop.set()
    for task in clients:
        task.cancel()
    await asyncio.gather(*clients, return_exceptions=True)
    # The bound in the scheduler's docstring: starvation_steps + 1 steps once its
    # adapter is in host memory, plus the step that may be in flight at submit.
    assert max(waited) <= starvation + 2, waited


# ------------------------------------------------------------------------- prefix cache


async def test_prefix_cache_shares_only_same_adapter_content(make_engine, tiny_demo, tmp_path):
    engine = await make_engine(pool_mib=4)
    ids = prompt(3, 40)  # two full blocks of 16 can be shared

    async def run(adapter, rid):
        free_before = engine.stats().free_pages
        stream = engine.generate(make_request(rid, ids, adapter, max_new_tokens=12))
        out = Result()
        used = None
        async for ev in stream:
            if used is None:
                used = free_before - engine.stats().free_pages
            out.tokens += ev.token_ids
            out.events.append(ev)
        return out, used

    first, used1 = await run(ADAPTER(0), "a")
    assert first.last.usage.cached_prompt_tokens == 0
    hits = engine.stats().prefix_cache_hit_tokens
    second, used2 = await run(ADAPTER(0), "b")
    assert second.tokens == first.tokens
    assert second.last.usage.cached_prompt_tokens == 32
    assert engine.stats().prefix_cache_hit_tokens == hits + 32
    assert used2 < used1, (used1, used2)

    other, _ = await run(ADAPTER(1), "c")
    assert other.last.usage.cached_prompt_tokens == 0
    assert other.tokens != first.tokens
    base, _ = await run("", "d")
    assert base.last.usage.cached_prompt_tokens == 0

    # Same name, different weights: never the old KV.
    old_dir, new_dir = tiny_demo.adapter_dirs[2], tiny_demo.adapter_dirs[3]
    await engine.load_adapter("swap", source=str(old_dir))
    old, _ = await run("swap", "e")
    old_again, _ = await run("swap", "f")
    assert old_again.last.usage.cached_prompt_tokens == 32
    await engine.unload_adapter("swap")
    await engine.load_adapter("swap", source=str(new_dir))
    new, _ = await run("swap", "g")
    assert new.last.usage.cached_prompt_tokens == 0

    fresh = await make_engine(pool_mib=4)
    await fresh.load_adapter("swap", source=str(new_dir))
    want = await collect(fresh, make_request("h", ids, "swap", max_new_tokens=12))
    assert new.tokens == want.tokens
    assert new.tokens != old.tokens

    # Reloading without an explicit unload, from a copy with the old weights under
    # a new path: the name follows the new source.
    copy = tmp_path / "copy"
    shutil.copytree(old_dir, copy)
    await engine.load_adapter("swap", source=str(copy))
    back, _ = await run("swap", "i")
    assert back.tokens == old.tokens
    assert_pages_balance(engine.stats())


# --------------------------------------------------------------------------- unloading


async def test_unload_frees_device_pages_and_host_copy(make_engine):
    engine = await make_engine(pool_mib=4)
    name = ADAPTER(2)
    await collect(engine, make_request("warm", prompt(1, 10), name, max_new_tokens=4))
    info = next(i for i in engine.list_adapters() if i.adapter_id == name)
    assert info.state == AdapterState.DEVICE and info.pages > 0
    before = engine.stats()
    assert before.adapter_pages == info.pages
    assert before.host_cache_bytes > 0

    await engine.unload_adapter(name)
    after = engine.stats()
    assert after.adapter_pages == 0
    assert after.host_cache_bytes == 0
    assert after.free_pages == before.free_pages + info.pages
    assert_pages_balance(after)
    info = next(i for i in engine.list_adapters() if i.adapter_id == name)
    assert info.state == AdapterState.KNOWN  # still on disk, nothing in memory

    # Unloading while a request runs: it finishes, then the pages come back.
    stream = engine.generate(make_request("busy", prompt(2, 10), name, max_new_tokens=30))
    await stream.__anext__()
    await engine.unload_adapter(name)
    tokens = 1
    async for ev in stream:
        tokens += len(ev.token_ids)
    assert ev.finish_reason == FinishReason.LENGTH and tokens == 30
    engine.clear_prefix_cache()
    stats = engine.stats()
    assert stats.adapter_pages == 0 and stats.host_cache_bytes == 0
    assert stats.free_pages == stats.total_pages


async def test_two_names_for_one_adapter_share_pages_until_both_unload(make_engine, tiny_demo):
    engine = await make_engine(pool_mib=4)
    ids = prompt(8, 20)
    first = await collect(engine, make_request("a", ids, ADAPTER(3), max_new_tokens=10))
    pages = engine.stats().adapter_pages
    info = await engine.load_adapter("alias", source=str(tiny_demo.adapter_dirs[3]))
    assert info.state == AdapterState.DEVICE  # same content, already resident
    second = await collect(engine, make_request("b", ids, "alias", max_new_tokens=10))
    assert second.tokens == first.tokens
    assert engine.stats().adapter_pages == pages

    await engine.unload_adapter(ADAPTER(3))
    assert engine.stats().adapter_pages == pages  # "alias" still holds them
    third = await collect(engine, make_request("c", ids, "alias", max_new_tokens=10))
    assert third.tokens == first.tokens
    await engine.unload_adapter("alias")
    stats = engine.stats()
    assert stats.adapter_pages == 0 and stats.host_cache_bytes == 0
    with pytest.raises(AdapterNotFound):
        await collect(engine, make_request("d", ids, "alias"))
    with pytest.raises(AdapterNotFound):
        await engine.unload_adapter("alias")


async def test_adapter_larger_than_the_pool_is_refused_as_too_large(make_engine):
    engine = await make_engine(pool_pages=40)  # adapter-016 needs 55 pages
    with pytest.raises(AdapterTooLarge) as exc:
        await collect(engine, make_request("x", prompt(1, 10), ADAPTER(16), max_new_tokens=5))
    assert exc.value.status == "FAILED_PRECONDITION"
    with pytest.raises(AdapterTooLarge):
        await engine.load_adapter(ADAPTER(16), pin=True)


# ----------------------------------------------------------------------- adapter loading


class SlowSource:
    def __init__(self, root: Path, delay: float):
        self.root = root
        self.delay = delay

    def fetch(self, uri: str) -> Path:
        time.sleep(self.delay)
        return self.root / uri.split("://", 1)[1]


class MissingSource:
    def fetch(self, uri: str) -> Path:
        time.sleep(0.3)
        raise AdapterNotFound(f"{uri}: no such adapter")


async def test_slow_load_does_not_pause_decoding(make_engine, tiny_demo):
    engine = await make_engine(pool_mib=8)
    engine.registry.register("slow", SlowSource(tiny_demo.adapters_dir, 1.5))
    runner = engine.generate(make_request("run", prompt(4, 16), ADAPTER(0), max_new_tokens=1500))
    await runner.__anext__()
    load_started = time.monotonic()
    load = asyncio.create_task(engine.load_adapter("x", source=f"slow://{ADAPTER(5)}"))
    waiter = asyncio.create_task(
        collect(engine, make_request("x1", prompt(5, 16), "x", max_new_tokens=8))
    )
    stamps = []
    async for _ in runner:
        stamps.append(time.monotonic())
        if load.done():
            break
    await runner.aclose()
    info = await load
    assert info.state in (AdapterState.HOST, AdapterState.DEVICE)
    assert info.load_ms >= 1000
    # Tokens kept streaming for the whole load, never a gap close to its length.
    assert len(stamps) > 50
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    assert max(gaps) < 0.5, max(gaps)
    res = await waiter
    assert res.finish == FinishReason.LENGTH and len(res.tokens) == 8
    assert res.times[0] - load_started >= 1.4  # it waited for its adapter, alone


async def test_missing_adapter_fails_only_its_own_requests(make_engine):
    engine = await make_engine(pool_mib=8)
    engine.registry.register("missing", MissingSource())
    good = [
        make_request(f"g{i}", prompt(60 + i, 12), ADAPTER(i), max_new_tokens=20) for i in (0, 1)
    ]
    alone = [(await collect(engine, r)).tokens for r in good]
    good = [
        make_request(f"h{i}", prompt(60 + i, 12), ADAPTER(i), max_new_tokens=20) for i in (0, 1)
    ]
    tasks = [asyncio.create_task(collect(engine, r)) for r in good]

    with pytest.raises(AdapterNotFound) as exc:
        await collect(engine, make_request("n1", prompt(1, 8), "no-such-adapter"))
    assert exc.value.status == "NOT_FOUND"
    with pytest.raises(AdapterNotFound):
        await engine.load_adapter("ghost", source="/nonexistent/adapter")

    load = asyncio.create_task(engine.load_adapter("ghost2", source="missing://ghost2"))
    await asyncio.sleep(0.05)
    with pytest.raises(AdapterNotFound):
        await collect(engine, make_request("n2", prompt(2, 8), "ghost2"))
    with pytest.raises(AdapterNotFound):
        await load

    results = await asyncio.gather(*tasks)
    assert [r.tokens for r in results] == alone
    stats = engine.stats()
    assert stats.kv_pages == 0
    assert_pages_balance(stats)


async def test_corrupt_adapter_is_incompatible_and_costs_no_pages(make_engine, tiny_demo, tmp_path):
    engine = await make_engine(pool_mib=8)
    bad = tmp_path / "bad"
    shutil.copytree(tiny_demo.adapter_dirs[2], bad)
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    free = engine.stats().free_pages

    with pytest.raises(AdapterIncompatible) as exc:
        await engine.load_adapter("bad", source=str(bad))
    assert exc.value.status == "FAILED_PRECONDITION"
    assert "safetensors" in str(exc.value)
    # The failed load left no trace: the name is unknown, not remembered as broken.
    assert "bad" not in {a.adapter_id for a in engine.list_adapters()}
    with pytest.raises(AdapterNotFound):
        await collect(engine, make_request("b", prompt(1, 8), "bad"))
    ok = await collect(engine, make_request("ok", prompt(1, 8), ADAPTER(1), max_new_tokens=5))
    assert ok.finish == FinishReason.LENGTH
    engine.clear_prefix_cache()
    stats = engine.stats()
    assert stats.free_pages + stats.adapter_pages == free
    await engine.unload_adapter(ADAPTER(1))
    assert engine.stats().free_pages == free


@pytest.mark.parametrize(
    "owner, method, after",
    [
        ("runner", "step", False),  # the forward step fails: its batch fails
        ("scheduler", "schedule", True),  # scheduling breaks after taking pages
    ],
    ids=["step", "schedule"],
)
async def test_internal_failure_fails_requests_in_flight_and_returns_every_page(
    make_engine, owner, method, after
):
    """An internal error fails the requests it touched; the engine goes on serving."""
    engine = await make_engine(pool_mib=4)
    target = getattr(engine, owner)
    real = getattr(target, method)
    calls = 0

    def flaky(*args):
        nonlocal calls
        calls += 1
        result = real(*args) if after else None  # state changed, then it breaks
        # A failing step fails its own batch: break the first step that holds all
        # three requests (they may join over several steps as their adapters load).
        if calls == 3 if after else len(args[0]) == 3:
            raise RuntimeError("injected failure")
        return result if after else real(*args)

    setattr(target, method, flaky)
    requests = [
        make_request(f"f{i}", prompt(i, 12), ADAPTER(i), max_new_tokens=10) for i in range(3)
    ]
    results = await asyncio.gather(*(collect(engine, r) for r in requests), return_exceptions=True)
    assert all(isinstance(r, LoraPoolError) and "injected" in str(r) for r in results), results
    ok = await collect(engine, make_request("after", prompt(9, 12), ADAPTER(1), max_new_tokens=10))
    assert ok.finish == FinishReason.LENGTH and len(ok.tokens) == 10
    for i in range(3):
        await engine.unload_adapter(ADAPTER(i))
    engine.clear_prefix_cache()
    stats = engine.stats()
    assert stats.free_pages == stats.total_pages, stats


async def test_bfloat16_engine_serves_base_and_adapters(make_engine):
    """--dtype bfloat16: pool, weights and adapter pages in bf16, same engine paths."""
    engine = await make_engine(pool_mib=4, dtype="bfloat16")
    assert engine.pool.tensor.dtype == torch.bfloat16
    assert engine.model_info()["dtype"] == "bfloat16"
    requests = [
        make_request(f"h{i}", prompt(7, 20), ADAPTER(i) if i else "", max_new_tokens=12)
        for i in range(4)
    ]
    results = await asyncio.gather(*(collect(engine, r) for r in requests))
    assert all(r.finish == FinishReason.LENGTH and len(r.tokens) == 12 for r in results)
    assert len({tuple(r.tokens) for r in results}) == 4  # one prompt: adapters change it
    await wait_for(lambda: engine.stats().kv_pages == 0)
    assert_pages_balance(engine.stats())


# --------------------------------------------------------------------------- sampling


async def test_seeded_sampling_is_batch_independent(make_engine):
    engine = await make_engine(pool_mib=8)

    def seeded(rid, seed):
        return make_request(
            rid,
            prompt(9, 20),
            ADAPTER(3),
            max_new_tokens=40,
            temperature=0.8,
            top_p=0.9,
            top_k=50,
            seed=seed,
        )

    alone = (await collect(engine, seeded("s0", 1234))).tokens
    assert (await collect(engine, seeded("s1", 1234))).tokens == alone

    crowd = [
        make_request(
            f"c{i}",
            prompt(200 + i, 10 + 3 * i),
            ADAPTER(i % 5) if i % 4 else "",
            max_new_tokens=30 + i,
            temperature=1.0 if i % 2 else 0.0,
            seed=i if i % 3 == 0 else None,
        )
        for i in range(10)
    ]
    results = await asyncio.gather(
        *(collect(engine, r) for r in crowd[:5]),
        collect(engine, seeded("s2", 1234)),
        *(collect(engine, r) for r in crowd[5:]),
    )
    assert results[5].tokens == alone
    other = (await collect(engine, seeded("s3", 4321))).tokens
    assert other != alone
    greedy = (
        await collect(engine, make_request("g", prompt(9, 20), ADAPTER(3), max_new_tokens=40))
    ).tokens
    assert greedy != alone


# ------------------------------------------------------------------------- validation


async def test_invalid_requests_are_refused_by_name(make_engine):
    engine = await make_engine(pool_mib=4, max_new_tokens_limit=64, max_model_len=128)

    def params(**kw):
        return make_request("v", prompt(1, 10), **kw)

    bad = [
        (GenerationRequest("v1", prompt="", params=SamplingParams()), "empty prompt"),
        (GenerationRequest("v2", input_ids=[], params=SamplingParams()), "input_ids: {ids"),
        (params(max_new_tokens=0), "max_new_tokens"),
        (params(max_new_tokens=65), "max_new_tokens"),
        (make_request("v", prompt(1, 100), max_new_tokens=29), "context"),
        (params(temperature=-0.5), "temperature"),
        (params(logprobs=21), "logprobs"),
        (make_request("v", [5, 600, 7]), "vocabulary"),
        # refused by length alone, before a per-token scan or the tokenizer runs
        (make_request("v", [600] * 129), "the context holds 128"),
        (GenerationRequest("v3", prompt="x" * 10**7, params=SamplingParams()), "characters"),
    ]
    for request, words in bad:
        with pytest.raises(InvalidRequest) as exc:
            await collect(engine, request)
        assert exc.value.status == "INVALID_ARGUMENT"
        assert words in str(exc.value)
    ok = await collect(engine, make_request("v", prompt(1, 100), max_new_tokens=28))
    assert ok.finish == FinishReason.LENGTH and len(ok.tokens) == 28
    text = await collect(
        engine,
        GenerationRequest("t", prompt="Once upon a time", params=SamplingParams(max_new_tokens=3)),
    )
    assert text.last.usage.prompt_tokens > 0
    stats = engine.stats()
    assert stats.kv_pages == 0
    assert_pages_balance(stats)


async def test_queue_full_and_draining(make_engine, tiny_demo):
    engine = await make_engine(pool_mib=4, max_waiting=2)
    engine.registry.register("slow", SlowSource(tiny_demo.adapters_dir, 1.0))
    load = asyncio.create_task(engine.load_adapter("s", source=f"slow://{ADAPTER(1)}"))
    await asyncio.sleep(0.05)
    # Requests for an adapter still loading wait in the bounded queue.
    queued = [
        asyncio.create_task(
            collect(engine, make_request(f"q{i}", prompt(i, 8), "s", max_new_tokens=4))
        )
        for i in range(2)
    ]
    await wait_for(lambda: len(engine.scheduler.waiting) == 2)
    with pytest.raises(QueueFull) as exc:
        await collect(engine, make_request("q2", prompt(3, 8), max_new_tokens=4))
    assert exc.value.status == "RESOURCE_EXHAUSTED"
    await load
    assert all(r.finish == FinishReason.LENGTH for r in await asyncio.gather(*queued))
    assert (await collect(engine, make_request("q3", prompt(3, 8), max_new_tokens=4))).tokens

    inflight = asyncio.create_task(
        collect(engine, make_request("d", prompt(4, 8), max_new_tokens=30))
    )
    await wait_for(lambda: engine.stats().running_requests == 1)
    drain = asyncio.create_task(engine.drain(grace_s=10))
    await asyncio.sleep(0.01)
    with pytest.raises(Draining) as exc:
        await collect(engine, make_request("late", prompt(5, 8)))
    assert exc.value.status == "UNAVAILABLE"
    res = await inflight  # in-flight work finishes inside the grace period
    assert res.finish == FinishReason.LENGTH and len(res.tokens) == 30
    await drain
    # Past the grace period, what is still running is cancelled and freed.
    engine.draining = False
    long = asyncio.create_task(
        collect(engine, make_request("g", prompt(6, 8), max_new_tokens=1000))
    )
    await wait_for(lambda: engine.stats().running_requests == 1)
    await engine.drain(grace_s=0.05)
    res = await long
    assert res.finish == FinishReason.CANCELLED and len(res.tokens) < 1000
    stats = engine.stats()
    assert stats.kv_pages == 0
    assert_pages_balance(stats)


# ------------------------------------------------------------------- stops and logprobs


async def test_stop_strings_stop_tokens_ignore_eos_and_logprobs(make_engine):
    engine = await make_engine(pool_mib=4)
    ids = prompt(11, 12)
    ref = await collect(engine, make_request("ref", ids, ADAPTER(4), max_new_tokens=60))
    assert ref.text
    # A stop string that starts somewhere in the middle of the text.
    start = next(
        i
        for i in range(len(ref.text) // 3, len(ref.text) - 4)
        if "\ufffd" not in ref.text[i : i + 3] and ref.text.find(ref.text[i : i + 3]) == i
    )
    stop = ref.text[start : start + 3]
    got = await collect(engine, make_request("s", ids, ADAPTER(4), max_new_tokens=60, stop=[stop]))
    assert got.finish == FinishReason.STOP
    assert got.text == ref.text[:start]
    assert stop not in got.text
    assert got.tokens == ref.tokens[: len(got.tokens)]
    assert len(got.tokens) < len(ref.tokens)

    stop_id = ref.tokens[10]
    at = ref.tokens.index(stop_id)
    got = await collect(
        engine, make_request("t", ids, ADAPTER(4), max_new_tokens=60, stop_token_ids=[stop_id])
    )
    assert got.finish == FinishReason.STOP
    assert got.tokens == ref.tokens[: at + 1]

    # ignore_eos: a seeded high-temperature run that ends on EOS, then the same with
    # ignore_eos runs on past it.
    eos = engine.tokenizer.eos_token_id
    for seed in range(20):
        kw = dict(max_new_tokens=600, temperature=5.0, seed=seed)
        ended = await collect(engine, make_request(f"e{seed}", ids, ignore_eos=False, **kw))
        if ended.finish == FinishReason.EOS:
            break
    else:
        pytest.fail("no seeded run reached EOS")
    assert ended.tokens[-1] == eos
    assert len(ended.tokens) < 600
    on = await collect(engine, make_request("f", ids, ignore_eos=True, **kw))
    assert on.finish == FinishReason.LENGTH and len(on.tokens) == 600
    assert on.tokens[: len(ended.tokens)] == ended.tokens

    lp = await collect(engine, make_request("l", ids, ADAPTER(4), max_new_tokens=8, logprobs=3))
    assert lp.tokens == ref.tokens[:8]
    for ev in lp.events:
        assert len(ev.logprobs) == len(ev.token_ids) == 1
        entry = ev.logprobs[0]
        assert entry.token_id == ev.token_ids[0]
        assert len(entry.top) == 3
        assert entry.top[0][0] == entry.token_id  # greedy picks the most likely
        assert entry.logprob == pytest.approx(entry.top[0][1])
        values = [v for _, v in entry.top]
        assert values == sorted(values, reverse=True) and values[0] <= 0
    assert all(not ev.logprobs for ev in ref.events)
