"""One request's state inside the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import torch

from lorapool.memory.adapter_layout import PlacedAdapter
from lorapool.types import FinishReason, GenerationRequest, SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to recompute
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Tokens known (prompt + generated) vs tokens computed (KV in pages) is the one
    scheduling rule: a step computes some of the difference; when nothing is left
    the step's logits sample the next token."""

    def __init__(self, request: GenerationRequest, prompt_ids: list[int], adapter_key: str = ""):
        self.request = request
        self.request_id = request.request_id
        self.adapter_id = request.adapter_id
        self.adapter_key = adapter_key  # content identity of the adapter, "" for base
        self.params: SamplingParams = request.params
        self.priority = request.priority
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.status = Status.WAITING
        self.finish_reason = FinishReason.NONE
        self.block_table: list[int] = []  # page ids, one per block_size tokens
        self.block_hashes: list[int] = []  # chained hashes of the full blocks
        self.num_computed = 0  # tokens whose K/V are in the pages
        self.num_cached_prompt = 0  # prompt tokens served from the prefix cache
        self.arrival = time.monotonic()
        self.first_scheduled: float | None = None
        self.first_token_at: float | None = None
        self.waited_steps = 0  # steps spent waiting while others ran (fairness)
        self.preemptions = 0
        self.adapter_entry = None  # AdapterEntry, None for the base model
        self.generator: torch.Generator | None = None
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(int(self.params.seed))

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        return self.num_tokens - self.num_computed

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, adapter={self.adapter_id!r}, {self.status.value}, "
            f"computed={self.num_computed}/{self.num_tokens}, blocks={len(self.block_table)})"
        )


@dataclass
class ScheduledSeq:
    """One sequence of a step: the scheduler plans it (seq, num_tokens, adapter_key),
    the engine fills in the placed adapter before the runner computes it."""

    seq: Sequence
    num_tokens: int  # tokens to compute this step
    adapter: PlacedAdapter | None = None  # pages of the adapter, None for the base model
    adapter_key: str = ""  # content identity of the adapter, "" for the base model
