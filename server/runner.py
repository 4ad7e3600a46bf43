"""ModelRunner: turns the scheduler's plain description of a step (which
sequences, how many tokens each) into tensors, runs the model and samples.

It runs in a worker thread; it reads sequences but only the scheduler mutates
them, after the step returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lorapool.memory.pool import PagePool

from .attention import build_meta
from .lora import LoraBatch, PlacedAdapter
from .model import Model
from .sampling import sample
from .types import TokenLogprob


@dataclass
class ScheduledSeq:
    seq: object  # Sequence
    num_tokens: int  # tokens to compute this step
    adapter: PlacedAdapter | None


@dataclass
class StepResult:
    # one entry per scheduled sequence that reached the end of its known tokens
    sampled: list[tuple[object, int, TokenLogprob | None]]


class ModelRunner:
    def __init__(self, model: Model, pool: PagePool):
        self.model = model
        self.pool = pool
        self.block_size = pool.layout.block_size
        self.scale = model.spec.head_dim**-0.5

    def step(self, batch: list[ScheduledSeq]) -> StepResult:
        # Decode rows (one token) first so attention batches them in one call.
        batch = sorted(batch, key=lambda s: s.num_tokens != 1)
        bs = self.block_size
        ids, positions, slot_pages, slot_offsets = [], [], [], []
        decode_tables, decode_lens, prefills, segments, logits_rows, sampling = (
            [],
            [],
            [],
            [],
            [],
            [],
        )
        for item in batch:
            seq, n = item.seq, item.num_tokens
            start = len(ids)
            first = seq.num_computed
            tokens = seq.all_ids[first : first + n]
            ids.extend(tokens)
            pos = range(first, first + n)
            positions.extend(pos)
            slot_pages.extend(seq.block_table[p // bs] for p in pos)
            slot_offsets.extend(p % bs for p in pos)
            ctx = first + n
            if n == 1:
                decode_tables.append(seq.block_table[: -(-ctx // bs)])
                decode_lens.append(ctx)
            else:
                prefills.append((start, n, ctx, seq.block_table[: -(-ctx // bs)]))
            segments.append((start, n, item.adapter))
            if ctx == seq.num_tokens:
                logits_rows.append(start + n - 1)
                sampling.append(seq)
        dev = self.pool.device
        meta = build_meta(
            slot_pages,
            slot_offsets,
            decode_tables,
            decode_lens,
            prefills,
            bs,
            self.scale,
            dev,
            self.model.spec.sliding_window,
        )
        lora = None
        if any(a is not None for _, _, a in segments):
            lora = LoraBatch(self.pool, self.model.spec, segments)
        logits = self.model.forward(
            torch.as_tensor(ids, dtype=torch.long).to(dev),
            torch.as_tensor(positions, dtype=torch.long).to(dev),
            self.pool.kv,
            meta,
            lora,
            torch.as_tensor(logits_rows, dtype=torch.long).to(dev),
        )
        if not sampling:
            return StepResult([])
        tokens, logprobs = sample(logits, sampling)
        return StepResult(list(zip(sampling, tokens, logprobs, strict=True)))
