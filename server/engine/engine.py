"""The engine: what a request meets in process. generate(request) validates it at
the door, starts its adapter's load and returns an async iterator of TokenEvents;
the step loop (loop.py) schedules, runs and streams. Also the engine's lifecycle
(start, drain, stop), adapter admin and stats. Adapter loads run on their own
threads and never pause the steps."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lorapool.errors import (
    AdapterNotFound,
    Draining,
    InvalidRequest,
    NoTokenizer,
    QueueFull,
)
from lorapool.memory.adapters import AdapterManager
from lorapool.memory.block_manager import BlockManager
from lorapool.memory.pool import PageLayout, PagePool
from lorapool.memory.sources import SourceRegistry
from lorapool.server.engine.config import EngineConfig
from lorapool.server.engine.detok import IncrementalDetokenizer
from lorapool.server.engine.loop import StepLoop
from lorapool.server.engine.runner import ModelRunner
from lorapool.server.engine.scheduler import Scheduler, SchedulerConfig
from lorapool.server.engine.sequence import Sequence, Status
from lorapool.server.engine.stream import RequestStream
from lorapool.server.engine.tokenizer import chat_template_ids, check_chat_template, load_tokenizer
from lorapool.server.engine.validation import (
    ADAPTER_ID,
    Limits,
    RequestValidator,
    check_adapter_id,
)
from lorapool.server.model.checkpoint import resolve_model_dir
from lorapool.server.model.model import Model
from lorapool.types import (
    AdapterInfo,
    EngineStats,
    FinishReason,
    GenerationRequest,
    TokenEvent,
)

log = logging.getLogger("lorapool.engine")

_NO_TOKENIZER = "this server runs a checkpoint without a tokenizer (start it with --tokenizer)"


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        dtype = config.torch_dtype
        self.model_dir = resolve_model_dir(config.model_dir)  # a folder, or a Hub id
        self.model = Model.from_pretrained(self.model_dir, dtype=dtype, device=config.device)
        self.spec = self.model.spec
        self.tokenizer = load_tokenizer(self.model_dir, config.tokenizer_dir)
        layout = PageLayout(
            self.spec.num_layers, config.block_size, self.spec.num_kv_heads, self.spec.head_dim
        )
        self.pool = PagePool.from_budget(layout, int(config.pool_mib * 2**20), dtype, config.device)
        self.blocks = BlockManager(
            self.pool.allocator, config.block_size, config.enable_prefix_cache
        )
        self.registry = SourceRegistry(config.adapter_dirs)
        self.adapters = AdapterManager(
            self.registry, self.pool, self.spec, int(config.host_cache_mib * 2**20)
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_batch_tokens=config.max_batch_tokens,
                max_running=config.max_running,
                starvation_steps=config.starvation_steps,
                watermark=config.watermark,
            ),
            self.blocks,
            self.adapters,
        )
        self.runner = ModelRunner(self.model, self.pool)
        self.max_model_len = config.max_model_len or self.spec.max_position
        self.validator = RequestValidator(
            Limits.for_model(
                self.spec.vocab_size,
                self.max_model_len,
                self.tokenizer.get_vocab() if self.tokenizer is not None else (),
                max_new_tokens=config.max_new_tokens_limit,
                max_logprobs=config.max_logprobs,
                block_size=config.block_size,
                total_pages=self.pool.num_pages,
            )
        )
        self.eos_ids = set(self.spec.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.loop = StepLoop(
            self.scheduler, self.adapters, self.runner, self.eos_ids, self.max_model_len
        )
        self._requests = self.loop.streams
        # Tokenizing runs off the event loop, so a long text never stalls the streams.
        self._tokenize_executor = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self._task: asyncio.Task | None = None
        self.draining = False
        self._cut_drain = False

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        self.loop.wake = asyncio.Event()
        self._task = asyncio.create_task(self.loop.run(), name="engine-loop")
        for adapter_id in self.config.pinned:
            await self.load_adapter(adapter_id, pin=True)

    async def stop(self) -> None:
        for req in list(self._requests.values()):
            self.abort(req.seq.request_id)
        await asyncio.sleep(0)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for req in list(self._requests.values()):
            self.loop.finish(req, FinishReason.CANCELLED)
        self.loop.shutdown()
        self._tokenize_executor.shutdown(wait=False, cancel_futures=True)
        self.adapters.shutdown()

    async def drain(self, grace_s: float) -> None:
        """Stop admitting, let in-flight requests finish for grace_s, then cancel."""
        self.draining = True
        deadline = time.monotonic() + grace_s
        while self._requests and time.monotonic() < deadline and not self._cut_drain:
            await asyncio.sleep(0.02)
        for request_id in list(self._requests):
            self.abort(request_id)
        while self._requests and self._task is not None and not self._task.done():
            await asyncio.sleep(0.01)

    def cut_drain(self) -> None:
        """End a drain's grace period now: in-flight requests are cancelled."""
        self._cut_drain = True

    # -- requests -------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        req = await self._admit(request)
        try:
            while True:
                item = await req.queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finish_reason != FinishReason.NONE:
                    return
        finally:
            if not req.done:
                self.abort(req.seq.request_id)

    def abort(self, request_id: str) -> bool:
        req = self._requests.get(request_id)
        if req is None or req.done:
            return False
        req.aborted = True
        self.loop.wake.set()
        return True

    async def _admit(self, request: GenerationRequest) -> RequestStream:
        self._check_admissible(request)
        check_adapter_id(request.adapter_id)
        ids = self.validator.input_ids(request)
        if ids is None:
            chat = request.chat
            ids = await (self._tokenize(request.prompt) if chat is None else self._render(chat))
            self._check_admissible(request)  # the server may have changed meanwhile
        self.validator.check(request, ids)
        self._check_fits_beside_pins(request, ids)
        if request.params.stop and self.tokenizer is None:
            raise NoTokenizer(_NO_TOKENIZER + "; stop strings need one (use stop_token_ids)")
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise QueueFull(
                f"admission queue is full ({self.config.max_waiting} waiting); retry with backoff"
            )
        seq = Sequence(request, ids)
        seq.adapter_entry = None
        if request.adapter_id:
            entry = seq.adapter_entry = self.adapters.entry(request.adapter_id)
            if self.adapters.cache.is_loading(entry):  # join a load in flight
                self.loop.watch_load(entry, self.adapters.ensure_host(entry))
        req = RequestStream(seq, IncrementalDetokenizer(self.tokenizer, request.params.stop))
        self._requests[request.request_id] = req
        self.scheduler.add(seq)
        # its adapter's load starts now if the request is near enough the front
        self.loop.start_loads()
        self.loop.wake.set()
        return req

    def _check_fits_beside_pins(self, request: GenerationRequest, ids: list[int]) -> None:
        """A request whose KV alone can never fit beside the pinned adapters would
        wait forever: refuse it at the door (RESOURCE_EXHAUSTED, with the numbers)."""
        entry = self.adapters.entries.get(request.adapter_id) if request.adapter_id else None
        key = entry.content_hash if entry is not None else ""
        need = self.blocks.blocks_for(len(ids) + request.params.max_new_tokens)
        if need > self.scheduler.room_beside_pins(key):
            raise self.scheduler.too_big(request.request_id, need, key)

    def _check_admissible(self, request: GenerationRequest) -> None:
        if self.draining:
            raise Draining("the server is draining; retry on another replica")
        if self._task is None:
            raise Draining("the engine is not started")
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        if request.request_id in self._requests:
            raise InvalidRequest(f"request_id {request.request_id!r} is already in flight")

    # -- adapters -------------------------------------------------------------------------
    async def load_adapter(
        self, adapter_id: str, source: str | None = None, pin: bool = False
    ) -> AdapterInfo:
        """Load (or reload from a new source) and optionally pin an adapter. A load
        that fails leaves no trace: the name keeps serving what it served before,
        and a new name gets no entry."""
        check_adapter_id(adapter_id, required=True)
        entry = await self.adapters.load(adapter_id, source)
        if pin and not entry.pinned:
            entry.pinned = True
            fut = asyncio.get_running_loop().create_future()
            self.loop.pins.append((entry, fut))
            self.loop.wake.set()
            try:
                await fut
            except BaseException:
                entry.pinned = False
                raise
        return self.adapters.info(entry)

    async def unload_adapter(self, adapter_id: str) -> None:
        check_adapter_id(adapter_id, required=True)
        waiting = [
            r
            for r in self._requests.values()
            if r.seq.adapter_id == adapter_id and r.seq.status is Status.WAITING
        ]
        self.adapters.unload(adapter_id)
        self.loop.wake.set()  # its pages may be free now
        for req in waiting:
            self.scheduler.remove(req.seq)
            self.loop.fail(req, AdapterNotFound(f"adapter {adapter_id!r} was unloaded"))

    def list_adapters(self) -> list[AdapterInfo]:
        return self.adapters.list_infos()

    def knows_adapter(self, adapter_id: str) -> bool:
        """Whether the id was loaded or a source knows it (without loading it)."""
        return ADAPTER_ID.fullmatch(adapter_id) is not None and self.adapters.knows(adapter_id)

    def on_adapter_load(self, callback) -> None:
        """callback(seconds) after every completed adapter load (for metrics)."""
        self.adapters.on_load = callback

    async def tokenize(
        self, text: str, return_tokens: bool = False, chat=None
    ) -> tuple[list[int], list[str]]:
        """Token ids (and token strings) of text, or of chat rendered as generate
        renders it, bounded like a prompt."""
        if chat is None:
            self.validator.check_text(text, "text")
            ids = await self._tokenize(text)
        else:
            self.validator.check_chat_length(chat)
            ids = await self._render(chat)
        return ids, (self.tokenizer.convert_ids_to_tokens(ids) if return_tokens else [])

    async def _tokenize(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise NoTokenizer(_NO_TOKENIZER + "; send input_ids instead of text")
        loop = asyncio.get_running_loop()
        encoded = await loop.run_in_executor(self._tokenize_executor, self.tokenizer, text)
        return encoded["input_ids"]

    async def _render(self, chat) -> list[int]:
        """chat's token ids through the tokenizer's chat template. Checking and
        rendering walk every message: on the tokenizer thread, like a prompt."""
        if self.tokenizer is None:
            raise NoTokenizer(_NO_TOKENIZER + "; a chat needs one (send input_ids instead)")
        check_chat_template(self.tokenizer)

        def render() -> list[int]:
            return chat_template_ids(self.tokenizer, self.validator.chat_messages(chat))

        return await asyncio.get_running_loop().run_in_executor(self._tokenize_executor, render)

    def clear_prefix_cache(self) -> int:
        return self.blocks.clear_cache()

    # -- observability ----------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return self.loop.steps

    @property
    def step_seconds(self) -> float:
        """Time in forward steps (the step thread)."""
        return self.loop.step_seconds

    @property
    def schedule_seconds(self) -> float:
        """Time the loop spends scheduling and turning tokens into events."""
        return self.loop.schedule_seconds

    def stats(self) -> EngineStats:
        live = [r.seq for r in self._requests.values()]
        kv = self.blocks.live_pages(live)
        return EngineStats(
            total_pages=self.pool.num_pages,
            free_pages=self.pool.allocator.free_count,
            kv_pages=kv,
            cached_pages=self.blocks.cached_pages,
            adapter_pages=self.adapters.device_pages,
            page_bytes=self.pool.page_bytes,
            running_requests=len(self.scheduler.running),
            waiting_requests=len(self.scheduler.waiting),
            tokens_per_second=self.loop.throughput.rate(time.monotonic()),
            generated_tokens=self.loop.generated_tokens,
            steps=self.steps,
            adapter_loads=self.adapters.loads,
            adapter_evictions=self.adapters.evictions,
            preemptions=self.scheduler.preemptions,
            prefix_cache_hit_tokens=self.loop.prefix_hit_tokens,
            host_cache_bytes=self.adapters.host_bytes,
        )

    def model_info(self) -> dict:
        return {
            "model_name": self.config.model_name or Path(self.config.model_dir).name,
            "model_path": str(self.model_dir),
            "architecture": self.spec.arch,
            "vocab_size": self.spec.vocab_size,
            "max_model_len": self.max_model_len,
            "hidden_size": self.spec.hidden_size,
            "num_layers": self.spec.num_layers,
            "dtype": self.config.dtype,
            "device": str(self.pool.device),
            "eos_token_id": min(self.eos_ids) if self.eos_ids else -1,
            "page_bytes": self.pool.page_bytes,
            "total_pages": self.pool.num_pages,
            "block_size": self.config.block_size,
            "max_new_tokens_limit": self.config.max_new_tokens_limit,
        }
