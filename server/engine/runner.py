"""ModelRunner: turns the scheduler's plain description of a step (which
sequences, how many tokens each) into tensors, runs the model and samples.

It runs in a worker thread; it reads sequences but only the scheduler mutates
them, after the step returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorapool.memory.pool import PagePool
from lorapool.server.engine.sampling import sample
from lorapool.server.engine.sequence import ScheduledSeq, Sequence
from lorapool.server.model.attention import PagedAttention
from lorapool.server.model.lora import LoraBatch, Segment
from lorapool.server.model.model import Model
from lorapool.types import TokenLogprob


@dataclass
class StepResult:
    # one entry per scheduled sequence that reached the end of its known tokens
    sampled: list[tuple[Sequence, int, TokenLogprob | None]]


@dataclass
class StepInputs:
    """A step's tokens flattened into host lists, and where each one goes: its KV
    slot, its sequence's attention rows, its adapter, whether it is sampled."""

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slot_pages: list[int] = field(default_factory=list)  # KV page of each new token
    slot_offsets: list[int] = field(default_factory=list)  # its slot in that page
    decode_tables: list[list[int]] = field(default_factory=list)  # per decode row
    decode_lens: list[int] = field(default_factory=list)
    prefills: list[tuple[int, int, int, list[int]]] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    logits_rows: list[int] = field(default_factory=list)  # tokens whose logits are sampled
    sampling: list[Sequence] = field(default_factory=list)  # their sequences


class ModelRunner:
    def __init__(self, model: Model, pool: PagePool, dense_lora_tokens: int | None = None):
        self.model = model
        # segment length where LoRA goes dense (None: lora.py's default for the path)
        self.dense_lora_tokens = dense_lora_tokens
        self.pool = pool
        self.block_size = pool.layout.block_size
        self.scale = model.spec.head_dim**-0.5
        self.attention = PagedAttention(pool)
        self._lora_cache: tuple[list[Segment], LoraBatch] | None = None  # the last step's

    def step(self, batch: list[ScheduledSeq]) -> StepResult:
        # Decode rows (one token) first so attention batches them in one call; rows
        # of one adapter side by side so LoRA reads each adapter's weights once per
        # run of rows (dense per adapter when the run is long).
        batch = sorted(batch, key=lambda s: (s.num_tokens != 1, s.adapter.key if s.adapter else ""))
        inputs = self._flatten(batch)
        meta = self.attention.build_meta(
            self.model.spec.num_heads,
            inputs.slot_pages,
            inputs.slot_offsets,
            inputs.decode_tables,
            inputs.decode_lens,
            inputs.prefills,
            self.scale,
            self.model.spec.sliding_window,
        )
        lora = self._lora_batch(inputs.segments, len(inputs.ids))
        dev = self.pool.device
        logits = self.model.forward(
            torch.as_tensor(inputs.ids, dtype=torch.long).to(dev),
            torch.as_tensor(inputs.positions, dtype=torch.long).to(dev),
            self.attention,
            meta,
            lora,
            torch.as_tensor(inputs.logits_rows, dtype=torch.long).to(dev),
        )
        if not inputs.sampling:
            return StepResult([])
        tokens, logprobs = sample(logits, inputs.sampling)
        return StepResult(list(zip(inputs.sampling, tokens, logprobs, strict=True)))

    def _flatten(self, batch: list[ScheduledSeq]) -> StepInputs:
        """One pass over the scheduled sequences, in batch order."""
        bs = self.block_size
        inputs = StepInputs()
        for item in batch:
            seq, n = item.seq, item.num_tokens
            start = len(inputs.ids)
            first = seq.num_computed
            inputs.ids.extend(seq.all_ids[first : first + n])
            pos = range(first, first + n)
            inputs.positions.extend(pos)
            inputs.slot_pages.extend(seq.block_table[p // bs] for p in pos)
            inputs.slot_offsets.extend(p % bs for p in pos)
            ctx = first + n
            if n == 1:
                inputs.decode_tables.append(seq.block_table[: -(-ctx // bs)])
                inputs.decode_lens.append(ctx)
            else:
                inputs.prefills.append((start, n, ctx, seq.block_table[: -(-ctx // bs)]))
            inputs.segments.append((start, n, item.adapter))
            if ctx == seq.num_tokens:
                inputs.logits_rows.append(start + n - 1)
                inputs.sampling.append(seq)
        return inputs

    def _lora_batch(self, segments: list[Segment], num_tokens: int) -> LoraBatch | None:
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
