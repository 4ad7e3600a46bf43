"""PageAllocator and BlockManager: exact page ids, typed errors that change
nothing, and property tests over random operation sequences."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from lorapool.memory.allocator import DoubleFree, ForeignPage, OutOfPages, PageAllocator, PageError
from lorapool.memory.block_manager import BlockManager
from lorapool.server.engine.sequence import Sequence
from lorapool.types import GenerationRequest

BS = 4  # block size of the BlockManager tests


def snapshot(alloc: PageAllocator):
    """Everything that decides future behaviour: free count, every refcount, and
    the order in which free pages will be handed out."""
    return (
        alloc.free_count,
        alloc.refcounts(np.arange(alloc.num_pages)).tolist(),
        alloc._stack[: alloc._top].tolist(),
    )


# ---------------------------------------------------------------------- exact ids


def test_fresh_pool_hands_out_pages_from_zero():
    alloc = PageAllocator(8)
    assert alloc.free_count == 8 and alloc.used_count == 0
    assert alloc.allocate(3).tolist() == [0, 1, 2]
    assert alloc.allocate(2).tolist() == [3, 4]
    assert alloc.allocate(0).tolist() == []
    assert alloc.free_count == 3 and alloc.used_count == 5
    assert alloc.refcounts([0, 1, 2, 3, 4, 5]).tolist() == [1, 1, 1, 1, 1, 0]


def test_freed_pages_are_reused_last_in_first_out():
    alloc = PageAllocator(8)
    alloc.allocate(5)
    assert alloc.free([1]).tolist() == [1]
    assert alloc.free([3]).tolist() == [3]
    assert alloc.allocate(1).tolist() == [3]
    assert alloc.allocate(1).tolist() == [1]
    assert alloc.allocate(1).tolist() == [5]  # then the never-used pages, in order
    # A batch free pushes its pages so that the lowest id comes back first.
    alloc.free([4, 0, 2])
    assert alloc.allocate(3).tolist() == [0, 2, 4]
    assert alloc.allocate(2).tolist() == [6, 7]
    assert alloc.free_count == 0


def test_shared_page_returns_only_when_the_last_owner_frees_it():
    alloc = PageAllocator(4)
    a, b = alloc.allocate(2).tolist()
    alloc.share([a])
    alloc.share([a, a])  # repeated ids add one reference each
    assert alloc.refcount(a) == 4 and alloc.refcount(b) == 1
    assert alloc.free([a, b]).tolist() == [b]
    assert alloc.free([a, a]).tolist() == []
    assert alloc.refcount(a) == 1 and alloc.free_count == 3
    assert alloc.free([a]).tolist() == [a]
    assert alloc.free_count == 4 and alloc.refcount(a) == 0


def test_can_allocate():
    alloc = PageAllocator(3)
    assert alloc.can_allocate(0) and alloc.can_allocate(3)
    assert not alloc.can_allocate(4) and not alloc.can_allocate(-1)
    alloc.allocate(2)
    assert alloc.can_allocate(1) and not alloc.can_allocate(2)


def test_empty_pool_and_negative_counts_are_refused():
    with pytest.raises(ValueError, match="at least one page"):
        PageAllocator(0)
    alloc = PageAllocator(2)
    with pytest.raises(ValueError):
        alloc.allocate(-1)
    assert alloc.free_count == 2


# ---------------------------------------------------------------------- typed errors


def test_out_of_pages_takes_nothing():
    alloc = PageAllocator(6)
    alloc.allocate(2)
    alloc.free([0])
    before = snapshot(alloc)
    with pytest.raises(OutOfPages, match="need 6 pages, 5 free of 6"):
        alloc.allocate(6)
    assert snapshot(alloc) == before
    assert alloc.allocate(5).tolist() == [0, 2, 3, 4, 5]
    with pytest.raises(OutOfPages):
        alloc.allocate(1)
    assert alloc.free_count == 0


def test_double_free_raises_and_changes_nothing():
    alloc = PageAllocator(4)
    pages = alloc.allocate(3).tolist()
    alloc.free([pages[1]])
    before = snapshot(alloc)
    with pytest.raises(DoubleFree, match=r"\[1\]"):
        alloc.free([pages[1]])
    # A batch holding one bad id frees none of the good ones.
    with pytest.raises(DoubleFree):
        alloc.free([pages[0], pages[1], pages[2]])
    # The same page twice in one call, owned once, is a double free too.
    with pytest.raises(DoubleFree):
        alloc.free([pages[0], pages[0]])
    assert snapshot(alloc) == before
    # The pool still works: page 1 is handed out once, not twice.
    assert alloc.allocate(2).tolist() == [1, 3]
    with pytest.raises(OutOfPages):
        alloc.allocate(1)


@pytest.mark.parametrize("bad", [4, 5, 1000, -1])
def test_foreign_page_ids_raise_and_change_nothing(bad):
    alloc = PageAllocator(4)
    alloc.allocate(2)
    before = snapshot(alloc)
    with pytest.raises(ForeignPage, match="not in pool of 4"):
        alloc.free([0, bad])
    with pytest.raises(ForeignPage):
        alloc.share([bad, 1])
    with pytest.raises(ForeignPage):
        alloc.refcount(bad)
    assert snapshot(alloc) == before


def test_non_integer_page_ids_raise_and_change_nothing():
    alloc = PageAllocator(4)
    pages = alloc.allocate(2)
    before = snapshot(alloc)
    with pytest.raises(ForeignPage, match="integers"):
        alloc.free(pages.astype(np.float64) + 0.5)  # 0.5 would truncate to a live page
    assert snapshot(alloc) == before


def test_sharing_a_free_page_raises_and_changes_nothing():
    alloc = PageAllocator(4)
    alloc.allocate(2)
    before = snapshot(alloc)
    with pytest.raises(DoubleFree, match=r"free pages \[2\]"):
        alloc.share([0, 2])
    assert snapshot(alloc) == before
    assert alloc.refcount(0) == 1


def test_errors_share_one_base_class():
    assert all(issubclass(e, PageError) for e in (OutOfPages, DoubleFree, ForeignPage))


# ---------------------------------------------------------------------- properties


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate/share/free sequences, legal and illegal, against a model of
    who owns what (page -> number of references)."""

    @initialize(num_pages=st.integers(1, 24))
    def setup(self, num_pages):
        self.alloc = PageAllocator(num_pages)
        self.refs: dict[int, int] = {}

    @rule(n=st.integers(0, 30))
    def allocate(self, n):
        free = self.alloc.num_pages - len(self.refs)
        if n > free:
            before = snapshot(self.alloc)
            with pytest.raises(OutOfPages):
                self.alloc.allocate(n)
            assert snapshot(self.alloc) == before
            return
        pages = self.alloc.allocate(n).tolist()
        assert len(set(pages)) == n, "a page handed out twice in one call"
        for p in pages:
            assert 0 <= p < self.alloc.num_pages
            assert p not in self.refs, f"page {p} handed out while owned"
            self.refs[p] = 1

    @precondition(lambda self: self.refs)
    @rule(data=st.data())
    def share(self, data):
        pages = data.draw(st.lists(st.sampled_from(sorted(self.refs)), min_size=1, max_size=6))
        self.alloc.share(pages)
        for p in pages:
            self.refs[p] += 1

    @precondition(lambda self: self.refs)
    @rule(data=st.data())
    def free(self, data):
        pool = [p for p, r in self.refs.items() for _ in range(r)]
        picks = data.draw(st.lists(st.integers(0, len(pool) - 1), max_size=8, unique=True))
        pages = [pool[i] for i in picks]
        released = self.alloc.free(pages).tolist()
        expect = set()
        for p in pages:
            self.refs[p] -= 1
            if self.refs[p] == 0:
                del self.refs[p]
                expect.add(p)
        assert sorted(released) == sorted(expect)

    @rule(data=st.data())
    def free_too_often(self, data):
        p = data.draw(st.integers(0, self.alloc.num_pages - 1))
        extra = self.refs.get(p, 0) + 1
        others = data.draw(st.lists(st.sampled_from(sorted(self.refs) or [p]), max_size=3))
        others = [o for o in others if o != p and self.refs.get(o, 0) >= 1]
        before = snapshot(self.alloc)
        with pytest.raises(DoubleFree):
            self.alloc.free(others + [p] * extra)
        assert snapshot(self.alloc) == before

    @rule(data=st.data())
    def share_free_page(self, data):
        free = [p for p in range(self.alloc.num_pages) if p not in self.refs]
        assume(free)
        p = data.draw(st.sampled_from(free))
        before = snapshot(self.alloc)
        with pytest.raises(DoubleFree):
            self.alloc.share(sorted(self.refs)[:2] + [p])
        assert snapshot(self.alloc) == before

    @rule(bad=st.one_of(st.integers(-50, -1), st.integers(24, 100)), op=st.sampled_from("fs"))
    def foreign(self, bad, op):
        assume(bad >= self.alloc.num_pages or bad < 0)
        before = snapshot(self.alloc)
        with pytest.raises(ForeignPage):
            (self.alloc.free if op == "f" else self.alloc.share)(sorted(self.refs)[:1] + [bad])
        assert snapshot(self.alloc) == before

    @invariant()
    def accounting(self):
        n = self.alloc.num_pages
        assert self.alloc.free_count + len(self.refs) == n
        assert self.alloc.used_count == len(self.refs)
        expect = [self.refs.get(p, 0) for p in range(n)]
        assert self.alloc.refcounts(np.arange(n)).tolist() == expect

    def teardown(self):
        # Every owner releases everything: the whole pool is free again, and the
        # free list holds each page exactly once.
        pages = [p for p, r in self.refs.items() for _ in range(r)]
        self.alloc.free(pages)
        n = self.alloc.num_pages
        assert self.alloc.free_count == n
        assert sorted(self.alloc.allocate(n).tolist()) == list(range(n))


AllocatorMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None
)
TestAllocatorMachine = AllocatorMachine.TestCase


# ---------------------------------------------------------------------- BlockManager


def make_seq(tokens, adapter_key="", rid="r"):
    request = GenerationRequest(request_id=rid, input_ids=list(tokens))
    return Sequence(request, list(tokens), adapter_key=adapter_key)


def run_prompt(bm: BlockManager, seq) -> None:
    """What the scheduler does for a prompt: match the cache, allocate, compute
    everything, commit the full blocks."""
    bm.match_prefix(seq)
    bm.allocate(seq, seq.num_pending)
    seq.num_computed = seq.num_tokens
    bm.commit(seq)


def refs(bm, pages):
    return bm.allocator.refcounts(pages).tolist()


def test_blocks_cover_the_tokens():
    bm = BlockManager(PageAllocator(16), BS)
    assert [bm.blocks_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    seq = make_seq(range(10))
    bm.allocate(seq, 6)
    assert seq.block_table == [0, 1]
    seq.num_computed = 6
    assert bm.blocks_needed(seq, 2) == 0 and bm.blocks_needed(seq, 3) == 1
    bm.allocate(seq, 4)
    assert seq.block_table == [0, 1, 2]


def test_commit_caches_full_blocks_and_free_keeps_them_idle():
    alloc = PageAllocator(16)
    bm = BlockManager(alloc, BS)
    seq = make_seq(range(10), "ad1")
    run_prompt(bm, seq)
    table = list(seq.block_table)
    assert table == [0, 1, 2]
    # two full blocks are cached (one reference each for the cache); the partial
    # third block is not
    assert refs(bm, table) == [2, 2, 1]
    assert len(seq.block_hashes) == 2 and bm.cached_pages == 0
    bm.free(seq)
    assert seq.block_table == [] and seq.num_computed == 0
    assert refs(bm, table) == [1, 1, 0]
    assert bm.cached_pages == 2 and alloc.free_count == 14


def test_match_prefix_shares_cached_blocks_of_the_same_adapter():
    alloc = PageAllocator(16)
    bm = BlockManager(alloc, BS)
    first = make_seq(range(10), "ad1")
    run_prompt(bm, first)
    bm.free(first)
    cached = [0, 1]
    second = make_seq(list(range(9)) + [99, 98, 97], "ad1", "r2")
    bm.match_prefix(second)
    assert second.block_table == cached
    assert second.num_computed == 8 and second.num_cached_prompt == 8
    assert refs(bm, cached) == [2, 2] and bm.cached_pages == 0
    bm.allocate(second, second.num_pending)
    assert second.block_table == cached + [2]  # 12 tokens: one new block
    second.num_computed = second.num_tokens
    bm.commit(second)
    assert refs(bm, second.block_table) == [2, 2, 2]
    bm.free(second)
    assert bm.cached_pages == 3 and alloc.free_count == 13


def test_match_leaves_one_token_to_compute():
    bm = BlockManager(PageAllocator(16), BS)
    run_prompt(bm, make_seq(range(8), "k"))
    again = make_seq(range(8), "k", "r2")
    bm.match_prefix(again)
    # 8 tokens = 2 full cached blocks, but the last token must run to give logits
    assert again.num_computed == 4 and len(again.block_table) == 1


def test_different_adapters_never_share_blocks():
    alloc = PageAllocator(16)
    bm = BlockManager(alloc, BS)
    for key in ("", "ad1", "ad2"):
        seq = make_seq(range(12), key, f"r-{key}")
        run_prompt(bm, seq)
        assert seq.num_cached_prompt == 0, f"adapter {key!r} reused another adapter's KV"
        bm.free(seq)
    assert bm.cached_pages == 9 and alloc.free_count == 16 - 9
    for key in ("", "ad1", "ad2"):
        seq = make_seq(range(12), key, f"s-{key}")
        bm.match_prefix(seq)
        assert seq.num_computed == 8
        bm.free(seq)


def test_prefix_match_is_chained():
    bm = BlockManager(PageAllocator(16), BS)
    run_prompt(bm, make_seq(range(12), "k"))
    # block 1 is the same tokens, but after a different block 0: no match at all
    other = make_seq([50, 51, 52, 53] + list(range(4, 12)), "k", "r2")
    bm.match_prefix(other)
    assert other.num_computed == 0 and other.block_table == []


def test_evict_cached_frees_least_recently_used_first():
    alloc = PageAllocator(16)
    bm = BlockManager(alloc, BS)
    seqs = {name: make_seq([i] * 5, "k", name) for i, name in enumerate("abc")}
    pages = {}
    for name, seq in seqs.items():
        run_prompt(bm, seq)
        pages[name] = seq.block_table[0]
        bm.free(seq)  # order of becoming idle: a, b, c
    # a is used again, then idle again: now the most recently used
    a2 = make_seq([0] * 5, "k", "a2")
    bm.match_prefix(a2)
    assert a2.block_table == [pages["a"]]
    assert bm.evict_cached(5) == 2  # b and c: a is in use and cannot be evicted
    assert refs(bm, [pages["b"], pages["c"]]) == [0, 0]
    assert refs(bm, [pages["a"]]) == [2]
    bm.free(a2)
    for name in "bc":
        seq = make_seq([ord(name) - ord("a")] * 5, "k")
        bm.match_prefix(seq)
        assert seq.num_computed == 0, f"{name} was evicted but still matched"
    assert bm.evict_cached(1) == 1 and refs(bm, [pages["a"]]) == [0]
    assert bm.evict_cached(1) == 0


def test_evict_order_follows_idle_order():
    alloc = PageAllocator(16)
    bm = BlockManager(alloc, BS)
    order = []
    for i in range(4):
        seq = make_seq([i] * 5, "k", f"r{i}")
        run_prompt(bm, seq)
        order.append(seq.block_table[0])
        bm.free(seq)
    # touch block 1: it moves to the end of the LRU
    seq = make_seq([1] * 5, "k", "again")
    bm.match_prefix(seq)
    bm.free(seq)
    for expect in (order[0], order[2], order[3], order[1]):
        assert bm.evict_cached(1) == 1
        assert alloc.refcount(expect) == 0
        assert alloc.free_count == 16 - sum(alloc.refcounts(order) > 0)


def test_refcounts_return_to_zero():
    alloc = PageAllocator(32)
    bm = BlockManager(alloc, BS)
    live = []
    for i in range(6):
        seq = make_seq(list(range(9)) + [i] * (i + 1), "k" if i % 2 else "j", f"r{i}")
        run_prompt(bm, seq)
        live.append(seq)
    assert sum(alloc.refcounts(np.arange(32)) > 0) == 32 - alloc.free_count
    for seq in live:
        bm.free(seq)
    assert bm.cached_pages > 0
    assert bm.clear_cache() > 0
    assert bm.cached_pages == 0 and not bm.cache and not bm.page_hash
    assert alloc.free_count == 32
    assert alloc.refcounts(np.arange(32)).tolist() == [0] * 32


def test_disabled_prefix_cache_caches_nothing():
    alloc = PageAllocator(8)
    bm = BlockManager(alloc, BS, enable_prefix_cache=False)
    seq = make_seq(range(9), "k")
    run_prompt(bm, seq)
    assert refs(bm, seq.block_table) == [1, 1, 1]
    bm.free(seq)
    again = make_seq(range(9), "k", "r2")
    bm.match_prefix(again)
    assert again.num_computed == 0 and alloc.free_count == 8


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["run", "free", "evict"]),
            st.lists(st.integers(0, 2), min_size=1, max_size=14),  # prompt
            st.sampled_from(["", "a", "b"]),  # adapter key
            st.integers(0, 5),  # which live sequence / how many pages
        ),
        max_size=30,
    )
)
def test_every_page_is_free_live_or_cached(ops):
    """free + pages of live sequences + idle cached blocks == total after every
    operation; a shared block always holds the same adapter and token prefix;
    everything returns at the end."""
    total = 48
    alloc = PageAllocator(total)
    bm = BlockManager(alloc, BS)
    live = []
    origin: dict[int, tuple] = {}  # cached page -> (adapter key, tokens up to its end)
    for op, prompt, key, k in ops:
        if op == "run":
            seq = make_seq(prompt, key, f"r{len(live)}")
            bm.match_prefix(seq)
            need = bm.blocks_needed(seq, seq.num_pending)
            if not bm.can_allocate(need):
                bm.evict_cached(need - alloc.free_count)
            if not bm.can_allocate(need):
                bm.free(seq)
                continue
            bm.allocate(seq, seq.num_pending)
            seq.num_computed = seq.num_tokens
            bm.commit(seq)
            live.append(seq)
            for b, page in enumerate(seq.block_table):
                if page in bm.page_hash:
                    what = (key, tuple(seq.all_ids[: (b + 1) * BS]))
                    assert origin.setdefault(page, what) == what, "block shared across prefixes"
        elif op == "free" and live:
            bm.free(live.pop(k % len(live)))
        elif op == "evict":
            bm.evict_cached(k)
        origin = {p: o for p, o in origin.items() if p in bm.page_hash}
        assert alloc.free_count + bm.live_pages(live) + bm.cached_pages == total
        for seq in live:
            assert len(set(seq.block_table)) == len(seq.block_table)
    for page, h in bm.page_hash.items():
        assert bm.cache[h] == page
    for seq in live:
        bm.free(seq)
    bm.clear_cache()
    assert alloc.free_count == total
    assert alloc.refcounts(np.arange(total)).tolist() == [0] * total
