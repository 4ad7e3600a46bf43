"""ModelRunner: turns the scheduler's plain description of a step (which
sequences, how many tokens each) into tensors, runs the model and samples.

It runs in a worker thread; it reads sequences but only the scheduler mutates
them, after the step returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorapool.memory.pool import PagePool
from lorapool.server.engine.sampling import sample
from lorapool.server.engine.sequence import ScheduledSeq
from lorapool.server.model.attention import PagedAttention, build_meta
from lorapool.server.model.lora import DENSE_SEGMENT_TOKENS, LoraBatch
from lorapool.server.model.model import Model
from lorapool.types import TokenLogprob


@dataclass
class StepResult:
    # one entry per scheduled sequence that reached the end of its known tokens
    sampled: list[tuple[object, int, TokenLogprob | None]]


class ModelRunner:
    def __init__(self, model: Model, pool: PagePool, dense_lora_tokens: int = DENSE_SEGMENT_TOKENS):
        self.model = model
        self.dense_lora_tokens = dense_lora_tokens  # segment length where LoRA goes dense
        self.pool = pool
        self.block_size = pool.layout.block_size
        self.scale = model.spec.head_dim**-0.5
        self.attention = PagedAttention(pool)
        self._lora_cache: tuple | None = None  # (segments, LoraBatch) of the last step

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
            self.pool,
            self.model.spec.num_heads,
            slot_pages,
            slot_offsets,
            decode_tables,
            decode_lens,
            prefills,
            self.scale,
            self.model.spec.sliding_window,
        )
        lora = self._lora_batch(segments, len(ids))
        logits = self.model.forward(
            torch.as_tensor(ids, dtype=torch.long).to(dev),
            torch.as_tensor(positions, dtype=torch.long).to(dev),
            self.attention,
            meta,
            lora,
            torch.as_tensor(logits_rows, dtype=torch.long).to(dev),
        )
        if not sampling:
            return StepResult([])
        tokens, logprobs = sample(logits, sampling)
        return StepResult(list(zip(sampling, tokens, logprobs, strict=True)))

    def _lora_batch(self, segments, num_tokens: int) -> LoraBatch | None:
        """Decode steps with an unchanged batch reuse the previous step's plan."""
        if all(a is None for _, _, a in segments):
            return None
        cached = self._lora_cache
        if (
            cached is not None
            and len(cached[0]) == len(segments)
            and all(
                s1 == s2 and n1 == n2 and a1 is a2
                for (s1, n1, a1), (s2, n2, a2) in zip(cached[0], segments, strict=True)
            )
        ):
            return cached[1]
        lora = LoraBatch(self.pool, self.model.spec, segments, num_tokens, self.dense_lora_tokens)
        self._lora_cache = (segments, lora)
        return lora
