"""Iteration-level scheduling: every step decides which sequences compute how
many tokens, under one token budget, and makes room in the pool.

One rule for every sequence (vLLM v1 style): compute up to the difference between
tokens known and tokens computed. A long prompt is therefore chunked by the budget
and never stalls decoding rows for more than one step.

Memory pressure, in order: drop idle prefix-cache blocks (LRU), evict idle
adapters (LRU, never one a running sequence uses, never a pinned one), then
preempt running sequences (lowest priority, newest first; their KV is freed and
they recompute later with their generated tokens kept).

Fairness: waiting requests are admitted round-robin across adapters (the i-th
request of every adapter queue before the (i+1)-th of any), so one hot adapter
cannot monopolise the batch. Bound: once its adapter is in host memory, a request
that has waited `starvation_steps` steps and is the oldest such request is admitted
first in the next step, preempting running sequences if the slots or the pool are
full; so it starts within starvation_steps + k + 1 steps, k being the starving
requests ahead of it (0 unless the server is overloaded).

The step contract: `schedule` plans a step (which sequences compute how many
tokens, which adapters are placed first), the runner computes it, and
`postprocess` advances the sequences by its output (tokens computed, full blocks
cached, sampled tokens appended). Finishing a sequence stays the caller's
decision (`finish`), as do detokenization and streaming.
"""

from __future__ import annotations

from collections.abc import Callable, Set
from dataclasses import dataclass, field

from lorapool.errors import InvalidRequest, PoolTooSmall
from lorapool.memory.adapter_cache import AdapterEntry
from lorapool.memory.adapters import AdapterManager
from lorapool.memory.block_manager import BlockManager
from lorapool.server.engine.sequence import ScheduledSeq, Sequence, Status
from lorapool.types import AdapterState, TokenLogprob

# What the runner samples: (sequence, token id, logprob or None), one per sequence
# that reached the end of its known tokens in the step.
Sampled = tuple[Sequence, int, TokenLogprob | None]


@dataclass
class SchedulerConfig:
    max_batch_tokens: int = 512  # token budget of one step
    max_running: int = 128
    starvation_steps: int = 32
    watermark: float = 0.02  # fraction of pages kept free ahead of need


@dataclass
class StepPlan:
    batch: list[ScheduledSeq] = field(default_factory=list)
    placements: list[tuple[AdapterEntry, object]] = field(default_factory=list)  # (entry, pages)
    failed: list[tuple[Sequence, Exception]] = field(default_factory=list)


@dataclass
class _StepState:
    budget: int
    scheduled: set[int] = field(default_factory=set)  # ids of sequences in this step
    keep: set[str] = field(default_factory=set)  # adapter keys this step uses
    placing: dict[str, object] = field(default_factory=dict)  # adapter key -> pages


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, adapters: AdapterManager):
        self.config = config
        self.blocks = blocks
        self.adapters = adapters
        self.allocator = blocks.allocator
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.adapter_turn: dict[str, int] = {}  # adapter id -> step it last had a request admitted
        self.step_no = 0
        self.preemptions = 0

    # -- queue --------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.running) or any(self._ready(s) for s in self.waiting)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the scheduler and release everything it holds."""
        if seq in self.running:
            self.running.remove(seq)
            self._release_adapter(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)

    def finish(self, seq: Sequence) -> None:
        self.blocks.commit(seq)
        self.remove(seq)
        seq.status = Status.FINISHED

    def reset(self) -> None:
        """After an internal error: give back placements that will not happen and
        everything any sequence still holds."""
        for key in list(self.adapters.reserved):
            self.adapters.unreserve(key)
        for seq in self.running + self.waiting:
            self.remove(seq)

    # -- one step -----------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        self.step_no += 1
        plan = StepPlan()
        step = _StepState(budget=self.config.max_batch_tokens)
        order = self._admission_order()
        # 1. The oldest starving request goes first and may preempt anything.
        if order and order[0].waited_steps >= self.config.starvation_steps:
            seq = order.pop(0)
            while len(self.running) >= self.config.max_running:
                self._preempt(min(self.running, key=self._victim_order))
            self._admit(seq, plan, step, preempt=True)
        # 2. Running sequences continue; newer ones are preempted if pages run out.
        for seq in sorted(self.running, key=self._running_order):
            if seq.status is not Status.RUNNING or id(seq) in step.scheduled:
                continue  # preempted earlier in this loop, or admitted above
            n = min(seq.num_pending, step.budget)
            if n <= 0:
                continue
            need = self.blocks.blocks_needed(seq, n)
            if not self._make_room(need, step.scheduled | {id(seq)}, step.keep, preempt=True):
                self._preempt(seq)
                continue
            self.blocks.allocate(seq, n)
            self._schedule(plan, step, seq, n)
        # 3. Waiting requests join, round-robin across adapters, without preempting.
        for seq in order:
            if step.budget <= 0 or len(self.running) >= self.config.max_running:
                break
            self._admit(seq, plan, step, preempt=False)
        for seq in self.waiting:
            if self._ready(seq):
                seq.waited_steps += 1
        return plan

    def _admit(self, seq: Sequence, plan: StepPlan, step: _StepState, preempt: bool) -> bool:
        entry = seq.adapter_entry
        key = entry.content_hash if entry else ""
        need_adapter = 0
        if entry is not None and key not in step.placing and self.adapters.resident(entry) is None:
            if not self._ready(seq):
                # Evicted from the pool earlier in this step while its host copy was
                # already gone: it waits for the reload the engine starts.
                return False
            need_adapter = self.adapters.pages_needed(entry)
        seq.adapter_key = key
        self.blocks.match_prefix(seq)
        n = min(seq.num_pending, step.budget)
        need_kv = self.blocks.blocks_needed(seq, n)
        need = need_adapter + need_kv
        if need > self.room_beside_pins(key):
            self.blocks.free(seq)
            plan.failed.append((seq, self.too_big(seq.request_id, need, key)))
            self.waiting.remove(seq)
            return False
        if need_adapter:
            pages = self.reserve_adapter(
                entry, need_kv, protect=step.scheduled, keep=step.keep, preempt=preempt
            )
            if pages is None:
                self.blocks.free(seq)
                return False
            step.placing[key] = pages
            plan.placements.append((entry, pages))
        elif not self._make_room(need, step.scheduled, step.keep | {key}, preempt=preempt):
            self.blocks.free(seq)
            return False
        self.blocks.allocate(seq, n)
        self.waiting.remove(seq)
        self.running.append(seq)
        seq.status = Status.RUNNING
        self.adapters.acquire(key, entry)
        self.adapter_turn[seq.adapter_id] = self.step_no
        self._schedule(plan, step, seq, n)
        return True

    def _schedule(self, plan: StepPlan, step: _StepState, seq: Sequence, n: int) -> None:
        plan.batch.append(ScheduledSeq(seq, n, adapter_key=seq.adapter_key))
        step.scheduled.add(id(seq))
        step.keep.add(seq.adapter_key)
        step.budget -= n

    def postprocess(
        self,
        batch: list[ScheduledSeq],
        sampled: list[Sampled],
        accept: Callable[[Sequence], bool] | None = None,
    ) -> list[Sampled]:
        """Advance sequences by the output of the step that computed `batch`: each
        scheduled sequence has num_tokens more tokens computed and its newly full
        blocks join the prefix cache; then each sampled token is appended to its
        sequence, unless accept(seq) is false (the engine passes a check that drops
        the tokens of requests aborted or finished meanwhile). Returns the sampled
        entries whose token was appended, in order. Whether a sequence finishes is
        the caller's decision (`finish`)."""
        for item in batch:
            item.seq.num_computed += item.num_tokens
            self.blocks.commit(item.seq)
        appended = []
        for out in sampled:
            seq, token = out[0], out[1]
            if accept is not None and not accept(seq):
                continue
            seq.output_ids.append(token)
            appended.append(out)
        return appended

    def reserve_adapter(
        self,
        entry: AdapterEntry,
        extra_pages: int = 0,
        protect: Set[int] = frozenset(),
        keep: Set[str] = frozenset(),
        preempt: bool = False,
    ):
        """Reserve pool pages for placing `entry` (its host copy must be loaded):
        make room for them plus `extra_pages` that the caller allocates next (the KV
        of the request that needs the adapter), then allocate the adapter's pages
        and reserve them in the adapter manager. Room comes from idle prefix-cache
        blocks (LRU), then idle adapters (LRU; never pinned, used by a running
        sequence, or in `keep`), then, with `preempt`, from preempting running
        sequences (lowest priority, newest first) whose ids are not in `protect`.
        Returns the pages, or None with nothing allocated (caches may have been
        trimmed) when the room cannot be made."""
        key = entry.content_hash
        need = self.adapters.pages_needed(entry)
        if not self._make_room(need + extra_pages, protect, keep | {key}, preempt=preempt):
            return None
        pages = self.allocator.allocate(need)
        self.adapters.reserve(key, pages)
        return pages

    def after_step(self) -> None:
        """Keep a free-page watermark by reclaiming idle memory ahead of need."""
        target = int(self.config.watermark * self.allocator.num_pages)
        short = target - self.allocator.free_count
        if short > 0:
            short -= self.blocks.evict_cached(short)
        if short > 0:
            self.adapters.evict_idle(short, keep=self._in_use())

    # -- policy helpers -------------------------------------------------------------------
    def _ready(self, seq: Sequence) -> bool:
        e = seq.adapter_entry
        return e is None or self.adapters.state(e) in (AdapterState.HOST, AdapterState.DEVICE)

    def _running_order(self, seq: Sequence):
        return (-seq.priority, seq.arrival)

    def _victim_order(self, seq: Sequence):
        """min() of this is preempted first: lowest priority, then newest."""
        return (seq.priority, -seq.arrival)

    def _admission_order(self) -> list[Sequence]:
        position: dict[str, int] = {}
        keyed = []
        for seq in sorted(self.waiting, key=lambda s: (-s.priority, s.arrival)):
            if not self._ready(seq):
                continue
            pos = position.get(seq.adapter_id, 0)
            position[seq.adapter_id] = pos + 1
            starving = seq.waited_steps >= self.config.starvation_steps
            turn = self.adapter_turn.get(seq.adapter_id, -1)
            keyed.append(((not starving, -seq.priority, pos, turn, seq.arrival), seq))
        keyed.sort(key=lambda item: item[0])
        return [seq for _, seq in keyed]

    def _in_use(self) -> set[str]:
        return self.adapters.in_use()

    def _make_room(self, need: int, protect: set[int], keep: set[str], preempt: bool) -> bool:
        short = need - self.allocator.free_count
        if short <= 0:
            return True
        reclaimable = self.blocks.cached_pages + self.adapters.idle_pages(keep | self._in_use())
        if not preempt and short > reclaimable:
            return False  # do not flush caches for an admission that cannot happen
        short -= self.blocks.evict_cached(short)
        if short > 0:
            short -= self.adapters.evict_idle(short, keep=keep | self._in_use())
        while short > 0 and preempt:
            victims = [s for s in self.running if id(s) not in protect]
            if not victims:
                return False
            before = self.allocator.free_count
            self._preempt(min(victims, key=self._victim_order))
            short -= self.allocator.free_count - before
            if short > 0:
                short -= self.blocks.evict_cached(short)
            if short > 0:  # the victim's adapter may have become idle
                short -= self.adapters.evict_idle(short, keep=keep | self._in_use())
        return short <= 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release_adapter(seq)
        self.blocks.free(seq)
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.append(seq)  # keeps its arrival time: it goes back near the front

    def _release_adapter(self, seq: Sequence) -> None:
        self.adapters.release(seq.adapter_key)

    # -- capacity -------------------------------------------------------------------------
    def room_beside_pins(self, key: str = "") -> int:
        """Pages a request for adapter content `key` can ever hold: the pool less the
        pages of pinned adapters other than its own."""
        return self.allocator.num_pages - self.adapters.pinned_pages(exclude=key)

    def too_big(self, request_id: str, need: int, key: str = "") -> Exception:
        """The error for a request needing `need` pages more than it can ever get:
        INVALID_ARGUMENT past the whole pool, RESOURCE_EXHAUSTED past the pins."""
        total = self.allocator.num_pages
        if need > total:
            return InvalidRequest(
                f"request {request_id} needs {need} pages (prompt + max_new_tokens + adapter) "
                f"but the whole pool holds {total}; lower max_new_tokens or the prompt length"
            )
        pinned = total - self.room_beside_pins(key)
        return PoolTooSmall(
            f"request {request_id} needs {need} pages (prompt + max_new_tokens + adapter); "
            f"the pool holds {total}, of which pinned adapters hold {pinned}; lower "
            "max_new_tokens or the prompt length, or ask the operator to unpin an adapter"
        )
