"""The scheduler on its own: a small pool, a BlockManager and an AdapterManager on
the tiny demo, no model. Steps are driven as the engine drives them (schedule,
place the planned adapters, Scheduler.postprocess with fake sampled tokens, finish
what reached max_new_tokens, after_step), and every assertion is exact: which
sequences a step computes and how many tokens each, who is preempted in which
order, and how many pages are free."""

from __future__ import annotations

import itertools

import pytest
import torch

from lorapool.memory.adapters import AdapterManager, AdapterState
from lorapool.memory.block_manager import BlockManager
from lorapool.memory.pool import PageLayout, PagePool
from lorapool.memory.sources import SourceRegistry
from lorapool.server.engine.scheduler import Scheduler, SchedulerConfig, StepPlan
from lorapool.server.engine.sequence import Sequence, Status
from lorapool.server.model.checkpoint import load_spec
from lorapool.types import GenerationRequest, SamplingParams

BLOCK = 16
TOKEN = 7  # every fake sampled token


@pytest.fixture(scope="module")
def spec(tiny_demo):
    return load_spec(tiny_demo.model_dir)


class Rig:
    """One scheduler over its own pool, block manager and adapter manager."""

    def __init__(self, spec, adapters_dir, num_pages: int, prefix_cache: bool, **config):
        layout = PageLayout(spec.num_layers, BLOCK, spec.num_kv_heads, spec.head_dim)
        self.pool = PagePool(layout, num_pages, torch.float32, "cpu")
        self.allocator = self.pool.allocator
        self.blocks = BlockManager(self.allocator, BLOCK, enable_prefix_cache=prefix_cache)
        self.adapters = AdapterManager(SourceRegistry([adapters_dir]), self.pool, spec, 1 << 30)
        config.setdefault("watermark", 0.0)
        self.sched = Scheduler(SchedulerConfig(**config), self.blocks, self.adapters)
        self._count = itertools.count()

    async def adapter(self, name: str):
        """The entry of a demo adapter, loaded into host memory."""
        entry = self.adapters.entry(name)
        await self.adapters.ensure_host(entry)
        return entry

    def place(self, entry, last_used: float) -> int:
        """Make `entry` resident (as pinning does) with a chosen LRU time; returns
        its page count."""
        pages = self.sched.reserve_adapter(entry)
        assert pages is not None
        self.adapters.place(entry, pages)
        self.adapters.resident(entry).last_used = last_used
        return len(pages)

    def seq(
        self,
        rid: str,
        prompt_len: int,
        arrival: float,
        priority: int = 0,
        adapter=None,
        max_new_tokens: int = 100,
        add: bool = True,
    ) -> Sequence:
        # The first token is unique, so no two prompts share a cached prefix.
        n = next(self._count)
        ids = [3 + n] + [3 + (7 * n + i) % 500 for i in range(prompt_len - 1)]
        request = GenerationRequest(
            request_id=rid,
            input_ids=ids,
            adapter_id=adapter.adapter_id if adapter else "",
            params=SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True),
            priority=priority,
        )
        seq = Sequence(request, ids)
        seq.adapter_entry = adapter
        seq.arrival = arrival
        if add:
            self.sched.add(seq)
        return seq

    def step(self) -> StepPlan:
        """One engine step without a model: every sequence that reaches the end of
        its known tokens samples TOKEN."""
        plan = self.sched.schedule()
        for entry, pages in plan.placements:
            self.adapters.place(entry, pages)
        sampled = [
            (item.seq, TOKEN, None)
            for item in plan.batch
            if item.seq.num_computed + item.num_tokens == item.seq.num_tokens
        ]
        appended = self.sched.postprocess(plan.batch, sampled)
        for seq, _, _ in appended:
            if len(seq.output_ids) >= seq.params.max_new_tokens:
                self.sched.finish(seq)
        self.sched.after_step()
        return plan


def batch_of(plan: StepPlan) -> list[tuple[str, int]]:
    return [(item.seq.request_id, item.num_tokens) for item in plan.batch]


def ids(seqs) -> list[str]:
    return [s.request_id for s in seqs]


@pytest.fixture
def rig(spec, tiny_demo):
    rigs = []

    def make(num_pages: int = 64, prefix_cache: bool = False, **config) -> Rig:
        rigs.append(Rig(spec, tiny_demo.adapters_dir, num_pages, prefix_cache, **config))
        return rigs[-1]

    yield make
    for r in rigs:
        r.adapters.shutdown()


# ------------------------------------------------------------------------- admission


def test_admission_by_priority_then_arrival(rig):
    r = rig(max_running=4)
    r.seq("a", 4, arrival=1.0, priority=0)
    r.seq("b", 4, arrival=2.0, priority=1)
    r.seq("c", 4, arrival=0.0, priority=0)
    r.seq("d", 4, arrival=3.0, priority=1)
    plan = r.step()
    assert batch_of(plan) == [("b", 4), ("d", 4), ("c", 4), ("a", 4)]
    assert ids(r.sched.running) == ["b", "d", "c", "a"] and not r.sched.waiting


def test_one_slot_admits_in_priority_then_arrival_order(rig):
    r = rig(max_running=1)
    for rid, arrival, priority in [("a", 1.0, 0), ("b", 2.0, 1), ("c", 0.0, 0), ("d", 3.0, 1)]:
        r.seq(rid, 4, arrival=arrival, priority=priority, max_new_tokens=1)
    admitted = [batch_of(r.step()) for _ in range(4)]
    assert admitted == [[("b", 4)], [("d", 4)], [("c", 4)], [("a", 4)]]
    assert not r.sched.has_work() and r.allocator.free_count == r.allocator.num_pages


async def test_round_robin_across_adapter_queues(rig):
    r = rig(max_running=8)
    a = await r.adapter("adapter-000")
    b = await r.adapter("adapter-018")
    for i in range(3):
        r.seq(f"A{i}", 4, arrival=float(i), adapter=a)
    for i in range(2):
        r.seq(f"B{i}", 4, arrival=10.0 + i, adapter=b)
    r.seq("base0", 4, arrival=20.0)
    plan = r.step()
    # The i-th request of every queue before the (i+1)-th of any; arrival breaks ties.
    assert [rid for rid, _ in batch_of(plan)] == ["A0", "B0", "base0", "A1", "B1", "A2"]
    # Each adapter is placed once, before the step, in the pages it needs.
    assert [(e.adapter_id, len(p)) for e, p in plan.placements] == [
        ("adapter-000", r.adapters.pages_needed(a)),
        ("adapter-018", r.adapters.pages_needed(b)),
    ]
    assert r.adapters.users == {a.content_hash: 3, b.content_hash: 2, "": 1}


async def test_round_robin_turn_goes_to_the_adapter_that_waited_longest(rig):
    """Equal positions in their queues: the adapter admitted least recently goes first."""
    r = rig(max_running=1)
    a = await r.adapter("adapter-000")
    b = await r.adapter("adapter-018")
    r.seq("A0", 4, arrival=0.0, adapter=a, max_new_tokens=1)
    r.seq("A1", 4, arrival=1.0, adapter=a, max_new_tokens=1)
    r.seq("B0", 4, arrival=2.0, adapter=b, max_new_tokens=1)
    r.seq("B1", 4, arrival=3.0, adapter=b, max_new_tokens=1)
    order = [batch_of(r.step())[0][0] for _ in range(4)]
    assert order == ["A0", "B0", "A1", "B1"]


# ---------------------------------------------------------------- starvation bound


def test_starving_request_is_admitted_first_and_preempts(rig):
    r = rig(max_running=1, starvation_steps=2)
    hog = r.seq("hog", 4, arrival=0.0, priority=5)
    low = r.seq("low", 4, arrival=1.0, priority=0)
    assert batch_of(r.step()) == [("hog", 4)]
    assert low.waited_steps == 1
    r.seq("high", 4, arrival=2.0, priority=9)  # newer and higher: still not first
    assert batch_of(r.step()) == [("hog", 1)]
    assert low.waited_steps == 2
    # Waited starvation_steps steps: first in line, and the full slots are made free.
    assert batch_of(r.step()) == [("low", 4)]
    assert hog.status is Status.WAITING and hog.preemptions == 1 and r.sched.preemptions == 1
    assert ids(r.sched.running) == ["low"] and ids(r.sched.waiting) == ["high", "hog"]
    # Preemption keeps the generated tokens; the victim recomputes them later.
    assert hog.output_ids == [TOKEN, TOKEN] and hog.num_computed == 0 and not hog.block_table


def test_starving_request_preempts_for_pages(rig):
    # 4 pages: two running sequences hold two each; the starving one needs one.
    r = rig(num_pages=4, max_running=8, starvation_steps=1)
    first = r.seq("first", 20, arrival=0.0, priority=1)
    second = r.seq("second", 20, arrival=1.0, priority=1)
    assert batch_of(r.step()) == [("first", 20), ("second", 20)]
    assert r.allocator.free_count == 0
    starving = r.seq("starving", 4, arrival=2.0)
    assert batch_of(r.step()) == [("first", 1), ("second", 1)]  # no room: waits
    assert starving.waited_steps == 1
    # Starving now: admitted first, preempting the newest sequence for its page.
    assert batch_of(r.step()) == [("starving", 4), ("first", 1)]
    assert second.status is Status.WAITING and second.preemptions == 1
    assert first.preemptions == 0 and r.allocator.free_count == 1


# ------------------------------------------------------------------------ preemption


def test_preemption_victims_lowest_priority_then_newest(rig):
    # One page each for five 16-token prompts; the first decode token needs a second.
    r = rig(num_pages=5, max_running=5)
    r.seq("P", 16, arrival=0.0, priority=2)
    r.seq("Q", 16, arrival=1.0, priority=1)
    r.seq("S", 16, arrival=2.0, priority=1)
    r.seq("U", 16, arrival=3.0, priority=1)
    r.seq("T", 16, arrival=0.5, priority=0)  # oldest of the victims, but lowest priority
    assert batch_of(r.step()) == [("P", 16), ("Q", 16), ("S", 16), ("U", 16), ("T", 16)]
    assert r.allocator.free_count == 0
    # P needs a page: T goes (lowest priority). Q needs one: U goes (the newest of
    # S and U). S needs one and every other running sequence is in the step: S goes.
    # None of them fits back without preempting.
    assert batch_of(r.step()) == [("P", 1), ("Q", 1)]
    assert ids(r.sched.waiting) == ["T", "U", "S"] and ids(r.sched.running) == ["P", "Q"]
    assert r.sched.preemptions == 3 and r.allocator.free_count == 1


def test_a_sequence_without_room_and_without_victims_preempts_itself(rig):
    r = rig(num_pages=2, max_running=2)
    a = r.seq("a", 8, arrival=0.0)
    b = r.seq("b", 16, arrival=1.0)
    assert batch_of(r.step()) == [("a", 8), ("b", 16)]
    # a's decode token fits its page; b's needs a second page, and the only other
    # running sequence is already in the step: b is preempted and cannot rejoin.
    assert batch_of(r.step()) == [("a", 1)]
    assert b.status is Status.WAITING and b.preemptions == 1 and a.preemptions == 0
    assert r.allocator.free_count == 1


# ------------------------------------------------------------------- memory pressure


async def test_memory_pressure_order(rig):
    """Idle prefix-cache blocks go first, then idle adapters least recently used
    first (never a pinned one or one a running sequence uses), then preemption; an
    admission that cannot happen flushes nothing."""
    r = rig(num_pages=24, prefix_cache=True, max_running=8, max_batch_tokens=1024)
    pinned = await r.adapter("adapter-018")
    old = await r.adapter("adapter-008")
    new = await r.adapter("adapter-014")
    busy = await r.adapter("adapter-019")
    pinned.pinned = True
    n_pinned = r.place(pinned, last_used=0.0)  # oldest of all, but pinned
    n_old = r.place(old, last_used=1.0)
    n_new = r.place(new, last_used=2.0)
    user = r.seq("user", 8, arrival=0.0, adapter=busy)  # keeps `busy` in use
    r.seq("cached", 33, arrival=1.0, max_new_tokens=1)  # leaves 2 idle cached blocks
    plan = r.step()
    assert batch_of(plan) == [("user", 8), ("cached", 33)]
    n_busy = len(plan.placements[0][1])
    assert r.blocks.cached_pages == 2
    first_cached = set(r.blocks.cache)
    used = n_pinned + n_old + n_new + n_busy + 1 + 2  # adapters, user's page, cache
    free = r.pool.num_pages - used
    assert r.allocator.free_count == free

    # Needs more than free + idle cache + idle adapters: waits, nothing is dropped.
    reclaimable = 2 + n_old + n_new
    big = r.seq("big", BLOCK * (free + reclaimable) + 1, arrival=2.0)
    assert batch_of(r.step()) == [("user", 1)]
    assert r.blocks.cached_pages == 2 and r.adapters.evictions == 0
    assert r.allocator.free_count == free
    r.sched.remove(big)

    # Needs 2 pages past the free ones: the two cached blocks suffice.
    fits_cache = r.seq("fits-cache", BLOCK * (free + 2), arrival=3.0, max_new_tokens=1)
    assert batch_of(r.step()) == [("user", 1), ("fits-cache", BLOCK * (free + 2))]
    assert not first_cached & set(r.blocks.cache) and r.adapters.evictions == 0
    assert fits_cache.status is Status.FINISHED
    # Its own full blocks are cached now; drop them to start the next case clean.
    assert r.blocks.cached_pages == free + 2
    assert r.blocks.clear_cache() == free + 2

    # One page past free + cache: the least recently used idle adapter goes, whole.
    r.seq("fits-old", BLOCK * (free + 2 + 1), arrival=4.0, max_new_tokens=1)
    assert batch_of(r.step()) == [("user", 1), ("fits-old", BLOCK * (free + 3))]
    assert r.adapters.state(old) is AdapterState.HOST
    for e in (pinned, new, busy):
        assert r.adapters.state(e) is AdapterState.DEVICE
    assert r.adapters.evictions == 1
    r.blocks.clear_cache()
    assert r.allocator.free_count == free + 2 + n_old

    # Nothing idle but `new` and the pinned and busy adapters: reserving pages for
    # another adapter with preemption drops `new`, then preempts `user` (the only
    # running sequence), whose adapter then becomes idle and is dropped too.
    other = await r.adapter("adapter-001")
    n_other = r.adapters.pages_needed(other)
    extra = free + 2 + n_old + n_new + 1 - n_other + 1  # one page past `new`'s and user's
    pages = r.sched.reserve_adapter(other, extra, preempt=True)
    assert pages is not None and len(pages) == n_other
    assert user.status is Status.WAITING and r.sched.preemptions == 1
    assert r.adapters.state(new) is AdapterState.HOST
    assert r.adapters.state(busy) is AdapterState.HOST
    assert r.adapters.state(pinned) is AdapterState.DEVICE
    assert r.adapters.evictions == 3
    assert r.allocator.free_count == r.pool.num_pages - n_pinned - n_other
    r.adapters.unreserve(other.content_hash)
    assert r.allocator.free_count == r.pool.num_pages - n_pinned


async def test_reserve_adapter_without_preemption_keeps_what_it_cannot_free(rig):
    r = rig(num_pages=8, max_running=4)
    a = await r.adapter("adapter-000")
    b = await r.adapter("adapter-018")
    n_a = r.place(a, last_used=1.0)
    r.seq("running", 4 * BLOCK, arrival=0.0, adapter=a)
    assert batch_of(r.step()) == [("running", 4 * BLOCK)]
    free = r.allocator.free_count
    assert free == 8 - n_a - 4
    # `a` is in use and the running sequence is not preempted: no room for b + 3.
    assert r.sched.reserve_adapter(b, free - r.adapters.pages_needed(b) + 1) is None
    assert r.allocator.free_count == free and r.adapters.state(a) is AdapterState.DEVICE
    pages = r.sched.reserve_adapter(b, free - r.adapters.pages_needed(b))
    assert len(pages) == r.adapters.pages_needed(b) and b.content_hash in r.adapters.reserved


async def test_watermark_after_step(rig):
    """after_step keeps watermark * num_pages pages free: idle cached blocks first,
    then idle adapters least recently used first; it never preempts."""
    r = rig(num_pages=20, prefix_cache=True, watermark=0.25, max_running=4)  # keeps 5 free
    old = await r.adapter("adapter-008")
    new = await r.adapter("adapter-014")
    n_old = r.place(old, last_used=1.0)
    n_new = r.place(new, last_used=2.0)
    used = n_old + n_new
    # A running sequence fills the pool to one free page once the finished one's
    # two full blocks stay cached.
    fill = r.pool.num_pages - used - 2 - 1
    runner = r.seq("runner", BLOCK * fill, arrival=0.0)
    r.sched.config.watermark = 0.0  # measure the state before the watermark acts
    r.seq("cached", 2 * BLOCK + 1, arrival=1.0, max_new_tokens=1)
    assert batch_of(r.step()) == [("runner", BLOCK * fill), ("cached", 2 * BLOCK + 1)]
    assert r.allocator.free_count == 1 and r.blocks.cached_pages == 2
    r.sched.config.watermark = 0.25
    r.sched.after_step()
    # Short 4: two cached blocks, then the older adapter (all of its pages).
    assert r.blocks.cached_pages == 0
    assert r.adapters.state(old) is AdapterState.HOST
    assert r.adapters.state(new) is AdapterState.DEVICE
    assert r.allocator.free_count == 1 + 2 + n_old
    assert runner.status is Status.RUNNING and r.sched.preemptions == 0
    r.sched.after_step()  # at the watermark: nothing more goes
    assert r.adapters.state(new) is AdapterState.DEVICE
    assert r.allocator.free_count == 1 + 2 + n_old


# ------------------------------------------------------- token budget, chunked prefill


def test_token_budget_and_chunked_prefill(rig):
    r = rig(num_pages=16, max_running=4, max_batch_tokens=32)
    short = r.seq("short", 4, arrival=0.0)
    long = r.seq("long", 80, arrival=1.0)
    steps = []
    for _ in range(4):
        plan = r.step()
        steps.append(batch_of(plan))
        assert sum(n for _, n in steps[-1]) <= 32
        assert len(long.block_table) == -(-long.num_computed // BLOCK)
    assert steps == [
        [("short", 4), ("long", 28)],  # the rest of the budget
        [("short", 1), ("long", 31)],
        [("short", 1), ("long", 21)],  # the last chunk samples
        [("short", 1), ("long", 1)],
    ]
    assert short.output_ids == [TOKEN] * 4
    assert long.output_ids == [TOKEN] * 2 and long.num_computed == 81


def test_a_prompt_longer_than_the_budget_is_split_by_it(rig):
    r = rig(num_pages=16, max_running=4, max_batch_tokens=32)
    seq = r.seq("long", 100, arrival=0.0)
    chunks = [batch_of(r.step()) for _ in range(5)]
    assert chunks == [[("long", 32)], [("long", 32)], [("long", 32)], [("long", 4)], [("long", 1)]]
    assert seq.output_ids == [TOKEN] * 2


# ----------------------------------------------------------------------- postprocess


def test_postprocess_advances_all_and_appends_only_accepted_tokens(rig):
    r = rig(num_pages=16, prefix_cache=True, max_running=4)
    a = r.seq("a", BLOCK, arrival=0.0)
    b = r.seq("b", BLOCK, arrival=1.0)
    plan = r.sched.schedule()
    sampled = [(a, 11, None), (b, 12, None)]
    appended = r.sched.postprocess(plan.batch, sampled, accept=lambda s: s is not b)
    assert appended == [(a, 11, None)]
    assert a.output_ids == [11] and b.output_ids == []
    # Both computed their tokens and cached their full block.
    assert a.num_computed == b.num_computed == BLOCK
    assert len(a.block_hashes) == len(b.block_hashes) == 1 and len(r.blocks.cache) == 2
