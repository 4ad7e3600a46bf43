"""The numbers of a load test: ghz's percentiles and histogram, durations as ghz
prints them, and what one call measured (latency, TTFT, inter-token latency)."""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

PERCENTAGES = (10, 25, 50, 75, 90, 95, 99)
NS = 1_000_000_000


@dataclass
class CallResult:
    timestamp: float  # unix seconds at send
    latency_s: float
    status: str  # ghz's status name: "OK", "Unavailable", ...
    error: str = ""  # ghz style: "rpc error: code = ... desc = ..."
    tokens: int = 0
    finish_reason: str = ""  # LENGTH, STOP, EOS, CANCELLED (server shutdown) on an OK call
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)

    def add_tokens(self, n: int, start: float, last: float) -> float:
        """Count n tokens that arrived now on a stream sent at `start` whose previous
        tokens came at `last`: the first ones set TTFT, later ones add one ITL each
        (a message of several tokens spreads its gap evenly). Returns the new `last`."""
        if not n:
            return last
        now = time.perf_counter()
        if self.ttft_s is None:
            self.ttft_s = now - start
        else:
            self.itl_s.extend([(now - last) / n] * n)
        self.tokens += n
        return now


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest rank, as ghz computes its latency distribution."""
    if not sorted_values:
        return None
    rank = p / 100.0 * len(sorted_values)
    index = int(rank) - 1 if rank == int(rank) else int(rank)
    return sorted_values[min(max(index, 0), len(sorted_values) - 1)]


def histogram(sorted_values: list[float], buckets: int = 10) -> list[tuple[float, int, float]]:
    """ghz's histogram: marks evenly spaced from fastest to slowest; each value
    counts in the first bucket whose mark is >= it."""
    if not sorted_values:
        return []
    fastest, slowest = sorted_values[0], sorted_values[-1]
    step = (slowest - fastest) / buckets
    marks = [fastest + step * i for i in range(buckets)] + [slowest]
    counts = [0] * len(marks)
    for v in sorted_values:
        counts[min(bisect.bisect_left(marks, v), len(marks) - 1)] += 1
    n = len(sorted_values)
    return [(m, c, c / n) for m, c in zip(marks, counts, strict=True)]


def format_duration(seconds: float | None) -> str:
    """Like ghz: the largest unit that keeps the number >= 1, two decimals."""
    if seconds is None:
        return "n/a"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.2f} {unit}"
    return f"{seconds * 1e9:.2f} ns"


def to_ns(seconds: float | None) -> int | None:
    return None if seconds is None else int(round(seconds * NS))
