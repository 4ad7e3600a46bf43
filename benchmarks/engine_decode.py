"""Decode steps of ModelRunner against the dense-matmul limit, for bench_engine.py.

A configuration is (batch, adapter count): its rows are prefilled once with
random prompts, their pages (prompt + every decode token) allocated beforehand,
and every repeat rewinds them to the end of the prompt, so a timed step is
runner.step plus the scheduler's bookkeeping and all repeats do the same work.
The limit is x W^T for every Linear in Model.dense_weights() at the same batch,
with the engine's own kernel."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from cpu_time import OtherLoad
from pool_memory import adapter_facts

from lorapool.memory.adapter_layout import pack_adapter, place_adapter
from lorapool.memory.block_manager import BlockManager
from lorapool.memory.peft_adapter import read_adapter
from lorapool.memory.pool import PageLayout, PagePool
from lorapool.server.engine.runner import ModelRunner, ScheduledSeq
from lorapool.server.engine.sequence import Sequence
from lorapool.server.model.model import Model
from lorapool.types import GenerationRequest, SamplingParams


class DecodeBench:
    """One model, one pool holding every adapter the run needs, and the rows of
    each configuration: prefilled once, rewound to the end of their prompt before
    every repeat, decoded step by step against the limit's matmuls."""

    def __init__(self, args, model_dir: Path, adapter_dirs: list[Path]):
        self.args = args
        self.model = Model.from_pretrained(model_dir)
        spec = self.model.spec
        self.spec = spec
        layout = PageLayout(spec.num_layers, args.block_size, spec.num_kv_heads, spec.head_dim)
        n_adapters = max(args.adapters)
        reads = [read_adapter(d, spec) for d in adapter_dirs[:n_adapters]]
        page_elems = layout.page_elems
        packs = [pack_adapter(spec, aw, torch.float32, page_elems) for aw in reads]
        self.max_len = args.prompt_len + args.steps + 1
        # Every adapter count of the largest batch is resident at once.
        rows = max(args.batches) * max(len(args.adapters), 1)
        kv_pages = rows * -(-self.max_len // args.block_size)
        adapter_pages = sum(p.num_pages(page_elems) for p in packs)
        self.pool = PagePool(layout, kv_pages + adapter_pages + 8, torch.float32, "cpu")
        self.blocks = BlockManager(self.pool.allocator, args.block_size, enable_prefix_cache=False)
        self.placed, self.adapter_info = [], []
        item = self.pool.tensor.element_size()
        for d, aw, packed in zip(adapter_dirs, reads, packs, strict=False):
            pages = self.pool.allocator.allocate(packed.num_pages(page_elems))
            self.placed.append(place_adapter(self.pool, spec, packed, pages, aw.content_hash))
            self.adapter_info.append(adapter_facts(d, aw, packed, len(pages), item))
        self.runner = ModelRunner(self.model, self.pool)
        self.gen = torch.Generator().manual_seed(args.seed)

    # -- one configuration ------------------------------------------------------------
    def make_rows(self, batch: int, n_adapters: int, runner: ModelRunner | None = None):
        runner = runner or self.runner
        params = SamplingParams(max_new_tokens=self.max_len, ignore_eos=True)
        rows = []
        for i in range(batch):
            ids = torch.randint(
                3, self.spec.vocab_size, (self.args.prompt_len,), generator=self.gen
            )
            ids = ids.tolist()
            seq = Sequence(GenerationRequest(request_id=str(i), input_ids=ids, params=params), ids)
            self.blocks.allocate(seq, self.max_len)
            adapter = self.placed[i % n_adapters] if n_adapters else None
            rows.append((seq, adapter))
        # Prefill in groups so that one step stays a few thousand tokens.
        group = max(1, 2048 // self.args.prompt_len)
        for g in range(0, batch, group):
            part = rows[g : g + group]
            res = runner.step([ScheduledSeq(s, s.num_pending, a) for s, a in part])
            for s, tok, _ in res.sampled:
                s.num_computed = s.num_tokens
                s.output_ids.append(tok)
        return rows

    def rewind(self, rows) -> None:
        for seq, _ in rows:
            del seq.output_ids[1:]
            seq.num_computed = self.args.prompt_len

    @staticmethod
    def decode_step(runner: ModelRunner, rows) -> float:
        t0 = time.perf_counter()
        res = runner.step([ScheduledSeq(s, 1, a) for s, a in rows])
        for s, tok, _ in res.sampled:
            s.num_computed += 1
            s.output_ids.append(tok)
        return time.perf_counter() - t0

    def decode(self, rows, runner: ModelRunner | None = None) -> float:
        """All steps of one repeat, from the end of the prompt."""
        runner = runner or self.runner
        self.rewind(rows)
        return sum(self.decode_step(runner, rows) for _ in range(self.args.steps))

    def limit_inputs(self, batch: int):
        mats = self.model.dense_weights()
        xs = {w.in_features: torch.randn(batch, w.in_features, generator=self.gen) for w in mats}
        return [(xs[w.in_features], w) for w in mats]

    @staticmethod
    def limit_step(pairs) -> float:
        t0 = time.perf_counter()
        for x, w in pairs:
            w(x)
        return time.perf_counter() - t0

    def free(self, rows) -> None:
        for seq, _ in rows:
            self.blocks.free(seq)

    def measure_batch(self, batch: int, counts: list[int]) -> list[dict]:
        """Every adapter count of one batch size, interleaved step by step with each
        other and with the limit: E(a0) L E(a8) L E(a64) L, then the next step."""
        # One runner per configuration: each keeps its own reusable LoRA plan.
        load = OtherLoad()
        configs = []
        for n in counts:
            runner = ModelRunner(self.model, self.pool)
            configs.append((n, runner, self.make_rows(batch, n, runner)))
        pairs = self.limit_inputs(batch)
        eng = {n: [] for n in counts}
        lim: list[float] = []
        for rep in range(self.args.repeats + 1):  # the first repeat is a warm-up
            for _, _, rows in configs:
                self.rewind(rows)
            for _ in range(self.args.steps):
                for n, runner, rows in configs:
                    e = self.decode_step(runner, rows)
                    m = self.limit_step(pairs)
                    if rep:
                        eng[n].append(e)
                        lim.append(m)
        for _, _, rows in configs:
            self.free(rows)
        busy = load.share()
        m = statistics.median(lim)
        base = statistics.median(eng[0]) if 0 in eng else None
        out = []
        for n in counts:
            e = statistics.median(eng[n])
            out.append(
                {
                    "batch": batch,
                    "adapters": n,
                    "distinct": min(batch, n),
                    "engine_tok_s": batch / e,
                    "limit_tok_s": batch / m,
                    "ratio_limit": m / e,
                    "ratio_base": base / e if n and base is not None else None,
                    "engine_ms_step": 1e3 * e,
                    "limit_ms_step": 1e3 * m,
                    "engine_iqr": _iqr(eng[n]) / e,
                    "limit_iqr": _iqr(lim) / m,
                    "samples": len(eng[n]),
                    "other_load": None if busy is None else busy["other"],
                }
            )
        return out


def _iqr(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]
