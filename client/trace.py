"""A seeded synthetic workload: power-law adapter popularity, Poisson arrivals,
prompt and output lengths. Pure Python, so that the gRPC load generator and an
in-process engine benchmark replay the very same requests."""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

Range = tuple[int, int]

WORDS = (
    "the of and to in is was that for on with as by at from his her they this which "
    "river stone light morning garden window letter music winter city road forest "
    "number table story water paper silver market island bridge valley summer engine "
    "quiet bright simple careful golden narrow gentle sudden ancient distant modern "
    "walks finds keeps opens builds carries follows watches remembers changes"
).split()


@dataclass(frozen=True)
class TraceItem:
    """One request of a synthetic workload. `arrival_s` counts from the start (0.0
    for every item when no rate is given); adapter_id "" is the base model."""

    index: int
    arrival_s: float
    adapter_id: str
    prompt_tokens: int
    max_new_tokens: int
    prompt_seed: int


def adapter_name(prefix: str, rank: int) -> str:
    """adapter-000 is the most popular adapter, adapter-001 the next, ..."""
    return f"{prefix}{rank:03d}"


def zipf_weights(n: int, s: float) -> list[float]:
    """Popularity of the adapter at rank k is 1 / (k + 1) ** s; s = 0 is uniform."""
    return [1.0 / (k + 1) ** s for k in range(n)]


def as_range(value: int | Range) -> Range:
    lo, hi = (value, value) if isinstance(value, int) else value
    if not 1 <= lo <= hi:
        raise ValueError(f"bad length range {lo}:{hi} (need 1 <= MIN <= MAX)")
    return lo, hi


def split_range(text: str) -> Range:
    """ "MIN:MAX" or "N" as two ints, unchecked (see `as_range`)."""
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def iter_trace(
    n_adapters: int,
    zipf: float = 1.0,
    rps: float | None = None,
    prompt_tokens: int | Range = (32, 128),
    max_new_tokens: int | Range = (32, 128),
    seed: int = 0,
    *,
    adapter_prefix: str = "adapter-",
    base_fraction: float = 0.0,
) -> Iterator[TraceItem]:
    """An endless seeded trace; every item draws the same random numbers in the
    same order, so a prefix of it never depends on how much is consumed."""
    p_lo, p_hi = as_range(prompt_tokens)
    o_lo, o_hi = as_range(max_new_tokens)
    rng = random.Random(seed)
    cumulative = list(itertools.accumulate(zipf_weights(n_adapters, zipf)))
    t = 0.0
    for index in itertools.count():
        gap = rng.expovariate(rps) if rps else 0.0
        t += gap
        base = rng.random() < base_fraction
        pick = rng.random() * cumulative[-1] if cumulative else 0.0
        adapter = ""
        if cumulative and not base:
            adapter = adapter_name(adapter_prefix, bisect.bisect_right(cumulative, pick))
        yield TraceItem(
            index=index,
            arrival_s=t,
            adapter_id=adapter,
            prompt_tokens=rng.randint(p_lo, p_hi),
            max_new_tokens=rng.randint(o_lo, o_hi),
            prompt_seed=rng.getrandbits(32),
        )


def make_trace(n_requests: int, *args: Any, **kwargs: Any) -> list[TraceItem]:
    """The first n_requests items of `iter_trace` (same arguments after n_requests)."""
    return list(itertools.islice(iter_trace(*args, **kwargs), n_requests))


def prompt_text(item: TraceItem) -> str:
    """prompt_tokens common words: about that many tokens for a BPE tokenizer."""
    rng = random.Random(item.prompt_seed)
    return " ".join(rng.choice(WORDS) for _ in range(item.prompt_tokens))


def prompt_ids(item: TraceItem, vocab_size: int) -> list[int]:
    """Exactly prompt_tokens ids, avoiding the low ids where special tokens live."""
    rng = random.Random(item.prompt_seed)
    low = min(100, vocab_size // 2)
    return [rng.randrange(low, vocab_size) for _ in range(item.prompt_tokens)]
