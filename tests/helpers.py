"""Test harness for the engine core: drives ModelRunner directly (the test chooses
each step's batch and chunks, no event loop; the scheduler only advances sequences
by each step's output) and computes the transformers + PEFT reference on the same
files."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import lorapool.server.engine.runner as runner_module
from lorapool.memory.adapter_layout import PlacedAdapter, pack_adapter, place_adapter, verify_layout
from lorapool.memory.adapters import AdapterManager
from lorapool.memory.allocator import PageAllocator
from lorapool.memory.block_manager import BlockManager
from lorapool.memory.peft_adapter import read_adapter
from lorapool.memory.pool import PageLayout, PagePool
from lorapool.memory.sources import SourceRegistry
from lorapool.server.engine.runner import ModelRunner
from lorapool.server.engine.scheduler import Scheduler, SchedulerConfig
from lorapool.server.engine.sequence import ScheduledSeq, Sequence
from lorapool.server.model.model import Model
from lorapool.types import GenerationRequest, SamplingParams
from lorapool.v1 import lorapool_pb2 as pb

BLOCK_SIZE = 16


def scramble_free_list(allocator: PageAllocator, seed: int) -> None:
    """Reorder a fresh allocator's free stack at random, so that later allocations
    hand out scattered, non-contiguous page ids (as in a long-running server)."""
    assert allocator.free_count == allocator.num_pages
    pages = allocator.allocate(allocator.num_pages)
    rng = np.random.default_rng(seed)
    for page in rng.permutation(pages):
        allocator.free([int(page)])
    assert allocator.free_count == allocator.num_pages


@dataclass
class Row:
    """One sequence of a batch: prompt token ids and an adapter index (None: base)."""

    prompt: list[int]
    adapter: int | None = None
    # Prefill split: number of prompt tokens computed at each step before the
    # last one (e.g. (20,) computes 20 tokens, then the rest with logits).
    chunks: tuple[int, ...] = ()


@dataclass
class RowResult:
    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # one [vocab] row per token
    steps_without_logits: int = 0  # steps that computed tokens but sampled nothing
    cached_prompt_tokens: int = 0  # prompt tokens served by the prefix cache


@contextlib.contextmanager
def capture_logits():
    """Record the logits the runner samples from, keyed by request id."""
    seen: dict[str, list[torch.Tensor]] = {}
    original = runner_module.sample

    def recording_sample(logits, seqs):
        for i, seq in enumerate(seqs):
            seen.setdefault(seq.request_id, []).append(logits[i].detach().float().cpu().clone())
        return original(logits, seqs)

    runner_module.sample = recording_sample
    try:
        yield seen
    finally:
        runner_module.sample = original


class Harness:
    """A model, one pool, adapters placed in scattered pages, and a runner."""

    def __init__(
        self,
        model_dir: Path,
        adapter_dirs: list[Path],
        num_pages: int,
        block_size: int = BLOCK_SIZE,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        dense_lora_tokens: int = 8,  # low, so that short test prompts take both LoRA paths
    ):
        self.model = Model.from_pretrained(model_dir, dtype=dtype)
        spec = self.spec = self.model.spec
        self.layout = PageLayout(spec.num_layers, block_size, spec.num_kv_heads, spec.head_dim)
        self.pool = PagePool(self.layout, num_pages, dtype, "cpu")
        scramble_free_list(self.pool.allocator, seed)
        self.blocks = BlockManager(self.pool.allocator, block_size, enable_prefix_cache=False)
        self.adapters: list[PlacedAdapter] = [self.place(d) for d in adapter_dirs]
        self.runner = ModelRunner(self.model, self.pool, dense_lora_tokens)
        # The harness places its adapters itself (in scattered pages); this manager
        # only completes the scheduler, which here just advances sequences.
        self.adapter_manager = AdapterManager(SourceRegistry(), self.pool, spec, 0)

    def place(self, adapter_dir: Path) -> PlacedAdapter:
        weights = read_adapter(adapter_dir, self.spec)
        packed = pack_adapter(self.spec, weights, self.pool.dtype, self.pool.page_elems)
        verify_layout(self.layout, self.spec, packed, self.pool.dtype)
        pages = self.pool.allocator.allocate(packed.num_pages(self.pool.page_elems))
        return place_adapter(self.pool, self.spec, packed, pages, weights.content_hash)

    def generate(
        self, rows: list[Row], new_tokens: int, blocks: BlockManager | None = None
    ) -> list[RowResult]:
        """Greedy-generate new_tokens tokens for every row in one continuous batch;
        every row's pages are freed at the end (blocks committed to a prefix cache
        stay cached there)."""
        blocks = self.blocks if blocks is None else blocks
        scheduler = Scheduler(SchedulerConfig(), blocks, self.adapter_manager)
        free_before = self.pool.allocator.free_count + blocks.cached_pages
        seqs = []
        for i, row in enumerate(rows):
            request = GenerationRequest(
                request_id=f"row-{i}",
                input_ids=list(row.prompt),
                params=SamplingParams(max_new_tokens=new_tokens, ignore_eos=True),
            )
            key = "" if row.adapter is None else self.adapters[row.adapter].key
            seqs.append(Sequence(request, row.prompt, adapter_key=key))
            blocks.match_prefix(seqs[-1])
        chunks = [list(row.chunks) for row in rows]
        results = [RowResult() for _ in rows]
        try:
            with capture_logits() as seen:
                while True:
                    batch = []
                    for seq, row, todo in zip(seqs, rows, chunks, strict=True):
                        if len(seq.output_ids) >= new_tokens:
                            continue
                        n = todo.pop(0) if todo else seq.num_pending
                        assert 0 < n <= seq.num_pending
                        blocks.allocate(seq, n)
                        adapter = None if row.adapter is None else self.adapters[row.adapter]
                        batch.append(ScheduledSeq(seq, n, adapter, seq.adapter_key))
                    if not batch:
                        break
                    result = self.runner.step(batch)
                    scheduler.postprocess(batch, result.sampled)
                    sampled = {id(seq) for seq, _, _ in result.sampled}
                    for item in batch:
                        if id(item.seq) not in sampled:
                            results[seqs.index(item.seq)].steps_without_logits += 1
            for seq, res in zip(seqs, results, strict=True):
                res.tokens = list(seq.output_ids)
                res.logits = seen.get(seq.request_id, [])
                res.cached_prompt_tokens = seq.num_cached_prompt
        finally:
            for seq in seqs:
                blocks.free(seq)
        assert self.pool.allocator.free_count + blocks.cached_pages == free_before
        return results


class Reference:
    """transformers + PEFT on the same model and adapter directories."""

    def __init__(self, model_dir: Path, adapter_dirs: list[Path]):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        self.names = [f"a{i}" for i in range(len(adapter_dirs))]
        self.model = PeftModel.from_pretrained(base, str(adapter_dirs[0]), adapter_name="a0")
        for name, d in zip(self.names[1:], adapter_dirs[1:], strict=True):
            self.model.load_adapter(str(d), adapter_name=name)
        self.model.eval()
        # Generate exactly the requested number of tokens: never stop at EOS.
        base.generation_config.eos_token_id = None

    @contextlib.contextmanager
    def using(self, adapter: int | None):
        if adapter is None:
            with self.model.disable_adapter():
                yield self.model
        else:
            self.model.set_adapter(self.names[adapter])
            yield self.model

    @torch.no_grad()
    def logits(self, ids: list[int], adapter: int | None) -> torch.Tensor:
        """[len(ids), vocab] logits of one unpadded sequence."""
        with self.using(adapter) as model:
            return model(torch.tensor([ids])).logits[0].float()

    @torch.no_grad()
    def greedy(self, prompt: list[int], adapter: int | None, new_tokens: int) -> list[int]:
        """PeftModel.generate, greedy, never stopping early."""
        from transformers import GenerationConfig

        config = GenerationConfig(
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        ids = torch.tensor([prompt])
        with self.using(adapter) as model:
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config
            )
        return out[0, len(prompt) :].tolist()


def random_prompt(rng: np.random.Generator, length: int, vocab: int) -> list[int]:
    return rng.integers(3, vocab, size=length).tolist()


def assert_idle(stub, timeout: float = 10) -> None:
    """The pool is back to idle and its page counts add up."""
    deadline = time.monotonic() + timeout
    while True:
        s = stub.GetStats(pb.GetStatsRequest(), timeout=10)
        idle = s.kv_pages == 0 and s.running_requests == 0 and s.waiting_requests == 0
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert idle, s
    assert s.free_pages + s.kv_pages + s.cached_pages + s.adapter_pages == s.total_pages
