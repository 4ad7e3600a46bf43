"""The engine's loop: one turn schedules a step, runs it on the step thread (torch
releases the GIL, so streaming, admission and cancellation stay responsive) and
turns the sampled tokens into events on each request's stream.

Between steps it does the housekeeping only the loop may do: cancelled requests
end, the adapters of the waiting requests nearest the front are loaded into host
memory (first loads, and reloads of evicted host copies), and pins are placed. Every
state change that can let work proceed sets `wake`; the loop sleeps otherwise."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from lorapool.errors import AdapterNotFound, LoraPoolError, QueueFull
from lorapool.memory.adapter_cache import AdapterEntry
from lorapool.memory.adapters import AdapterManager
from lorapool.server.engine.runner import ModelRunner
from lorapool.server.engine.scheduler import Scheduler, StepPlan
from lorapool.server.engine.sequence import Sequence, Status
from lorapool.server.engine.stream import RequestStream, Throughput
from lorapool.types import FinishReason, TokenEvent

log = logging.getLogger("lorapool.engine")

IDLE_WAKE_S = 1.0  # a safety net: every state change that matters sets wake


class StepLoop:
    def __init__(
        self,
        scheduler: Scheduler,
        adapters: AdapterManager,
        runner: ModelRunner,
        eos_ids: set[int],
        max_model_len: int,
    ):
        self.scheduler = scheduler
        self.adapters = adapters
        self.runner = runner
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self.streams: dict[str, RequestStream] = {}  # request id -> stream, while in flight
        self.pins: list[tuple[AdapterEntry, asyncio.Future]] = []  # pins to place
        self.wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="step")
        self.steps = 0
        self.generated_tokens = 0
        self.prefix_hit_tokens = 0
        self.step_seconds = 0.0
        self.schedule_seconds = 0.0
        self.throughput = Throughput()

    def watch_load(self, entry: AdapterEntry, fut: asyncio.Future) -> None:
        """When the load of entry ends, fail its waiting requests if it failed."""
        if not fut.done():
            fut.add_done_callback(lambda f, e=entry: self.on_loaded(e, f))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)

    def on_loaded(self, entry: AdapterEntry, fut: asyncio.Future) -> None:
        exc = None if fut.cancelled() else fut.exception()
        if exc is not None:
            if not isinstance(exc, LoraPoolError):
                exc = AdapterNotFound(f"adapter {entry.adapter_id!r}: {exc}")
            for req in list(self.streams.values()):
                if req.seq.adapter_entry is entry and req.seq.status is Status.WAITING:
                    self.scheduler.remove(req.seq)
                    self.fail(req, exc)
        self.wake.set()

    # -- the loop -------------------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self._iterate(loop)
            except Exception as exc:  # a bug must not stop the loop (and every stream) for good
                log.exception("engine loop iteration failed")
                self.fail_all(LoraPoolError(f"internal error in the engine: {exc}"))

    async def _iterate(self, loop) -> None:
        """One turn of the loop: housekeeping, then schedule and run one step."""
        self._reap_aborted()
        await self._place_pinned(loop)
        self.start_loads()
        if not self.scheduler.has_work():
            self.wake.clear()
            await self.wake.wait()
            return
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        for seq, exc in plan.failed:
            self.fail(self.streams[seq.request_id], exc)
        self._stamp_admitted(plan)
        if not plan.batch:
            # Nothing can run until something changes (a request, a finished load,
            # an unload or abort), and each of those sets wake: sleep until then.
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), IDLE_WAKE_S)
            except TimeoutError:
                pass
            return
        t1 = time.perf_counter()
        try:
            result = await loop.run_in_executor(self._executor, self._execute, plan)
        except Exception as exc:  # a failed step fails its own batch only
            log.exception("step failed")
            for entry, _pages in plan.placements:
                self.adapters.unreserve(entry.content_hash)
            for item in plan.batch:
                req = self.streams.get(item.seq.request_id)
                if req is not None:
                    self.fail(req, LoraPoolError(f"internal error in forward step: {exc}"))
            return
        t2 = time.perf_counter()
        self._postprocess(plan, result)
        self.scheduler.after_step()
        t3 = time.perf_counter()
        self.steps += 1
        self.step_seconds += t2 - t1
        self.schedule_seconds += (t1 - t0) + (t3 - t2)
        await asyncio.sleep(0)  # let streams and new requests in between steps

    def _execute(self, plan: StepPlan):
        for entry, pages in plan.placements:
            self.adapters.place(entry, pages)
        for item in plan.batch:
            item.adapter = self.adapters.placed(item.adapter_key)
        return self.runner.step(plan.batch)

    def _stamp_admitted(self, plan: StepPlan) -> None:
        """The queue time of a request ends when it is admitted, before its step."""
        now = time.monotonic()
        for item in plan.batch:
            seq = item.seq
            if seq.first_scheduled is None:
                seq.first_scheduled = now
                self.prefix_hit_tokens += seq.num_cached_prompt

    def _postprocess(self, plan: StepPlan, result) -> None:
        now = time.monotonic()
        appended = self.scheduler.postprocess(plan.batch, result.sampled, accept=self._streaming)
        for seq, token, logprob in appended:
            req = self.streams[seq.request_id]
            if seq.first_token_at is None:
                seq.first_token_at = now
            event, reason = req.token(token, logprob, self.eos_ids, self.max_model_len)
            if reason != FinishReason.NONE:
                self.finish(req, reason, event)
            else:
                req.queue.put_nowait(event)
        self.generated_tokens += len(appended)
        self.throughput.record(now, len(appended))

    def _streaming(self, seq: Sequence) -> bool:
        """Whether a sampled token of seq still goes to its stream (not aborted or done)."""
        req = self.streams.get(seq.request_id)
        return req is not None and not req.aborted and not req.done

    def finish(
        self, req: RequestStream, reason: FinishReason, event: TokenEvent | None = None
    ) -> None:
        if req.seq.status is not Status.FINISHED:
            self.scheduler.finish(req.seq)
        self.streams.pop(req.seq.request_id, None)
        req.finish(reason, event)

    def fail_all(self, exc: Exception) -> None:
        """Fail every request in flight and return all their pages: the scheduler's
        state can no longer be trusted after an internal error."""
        for req in list(self.streams.values()):
            self.fail(req, exc)
        self.scheduler.reset()

    def fail(self, req: RequestStream, exc: Exception) -> None:
        if req.seq.status is not Status.FINISHED:
            self.scheduler.remove(req.seq)
            req.seq.status = Status.FINISHED
        self.streams.pop(req.seq.request_id, None)
        req.fail(exc)

    def _reap_aborted(self) -> None:
        for req in [r for r in self.streams.values() if r.aborted and not r.done]:
            self.finish(req, FinishReason.CANCELLED)

    def start_loads(self) -> None:
        """Start the host loads of the waiting requests nearest the front of the
        queue whose adapter is neither in host memory, nor in the pool, nor loading
        (never loaded, or its host copy was evicted): as many distinct adapters
        (not in the pool) as the host cache holds, the first always. Loading for
        every waiting request when they use more adapters than the cache holds
        makes the loads evict one another's copies before any is placed (measured
        on bench_trace's 1000-adapter fleet: 2705 loads for 256 requests)."""
        room = self.adapters.host_cache_bytes
        seen: set[str] = set()
        first = True
        for seq in self.scheduler.waiting:
            e = seq.adapter_entry
            if e is None or e.adapter_id in seen:
                continue
            seen.add(e.adapter_id)
            if self.adapters.resident(e) is not None:
                continue
            if not first and e.nbytes > room:  # nbytes: 0 until a first load measured it
                break
            room -= e.nbytes
            first = False
            if self.adapters.needs_load(e):
                fut = self.adapters.ensure_host(e)
                self.watch_load(e, fut)

    async def _place_pinned(self, loop) -> None:
        while self.pins:
            entry, fut = self.pins.pop(0)
            try:
                if self.adapters.resident(entry) is None:
                    pages = self.scheduler.reserve_adapter(entry)
                    if pages is None:
                        raise QueueFull(
                            f"adapter {entry.adapter_id!r} needs "
                            f"{self.adapters.pages_needed(entry)} pages; the pool has no "
                            "idle memory to give it now"
                        )
                    try:
                        await loop.run_in_executor(
                            self._executor, self.adapters.place, entry, pages
                        )
                    except BaseException:
                        self.adapters.unreserve(entry.content_hash)
                        raise
                fut.set_result(None)
            except Exception as exc:
                fut.set_exception(exc)
