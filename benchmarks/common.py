"""What the benchmark scripts share: flag parsers, the bench demo's parameters,
warm-up requests, region timers, percentiles, number and table formatting, and
the JSON line each script ends with."""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from lorapool.client.stats import percentile
from lorapool.client.trace import split_range
from lorapool.types import GenerationRequest, SamplingParams

# -- flags -----------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    """ "1,16,64" -> [1, 16, 64]."""
    return [int(v) for v in text.split(",") if v.strip()]


int_range = split_range  # "MIN:MAX" or "N" -> (MIN, MAX), unchecked


def args_json(args: Any) -> dict[str, Any]:
    """The parsed flags as JSON values (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


# -- the bench demo --------------------------------------------------------------------------

# make_demo parameters of every bench demo the scripts write or reuse
BENCH_DEMO = {"preset": "bench", "arch": "llama", "mix": "bench", "seed": 0, "shard_mib": None}


def bench_demos(cache: Path, pattern: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(folder, stamp) of each demo whose stamp (`pattern` under `cache`, in name
    order) says it was written with BENCH_DEMO's parameters."""
    for stamp in sorted(cache.glob(pattern)):
        try:
            params = json.loads(stamp.read_text())
        except (OSError, ValueError):
            continue
        if all(params.get(k) == v for k, v in BENCH_DEMO.items()):
            yield stamp.parent, params


def warm_requests(vocab: int) -> list[dict[str, Any]]:
    """Base-model requests that touch every code path once (prefill, decode)."""
    return [
        {
            "input_ids": [(97 * i + 7 * k) % (vocab - 100) + 100 for k in range(24 + 8 * i)],
            "max_new_tokens": 6,
            "ignore_eos": True,
        }
        for i in range(4)
    ]


async def warm_engine(engine: Any, vocab: int, prefix: str) -> None:
    """`warm_requests` through an in-process Engine, request ids PREFIX0, PREFIX1..."""

    async def one(i: int, warm: dict[str, Any]) -> None:
        request = GenerationRequest(
            request_id=f"{prefix}{i}",
            input_ids=warm["input_ids"],
            params=SamplingParams(
                max_new_tokens=warm["max_new_tokens"], ignore_eos=warm["ignore_eos"]
            ),
        )
        async for _ in engine.generate(request):
            pass

    await asyncio.gather(*(one(i, w) for i, w in enumerate(warm_requests(vocab))))


# -- timers ----------------------------------------------------------------------------------


class RegionTimer:
    """Inclusive wall time and calls of named functions, patched in until
    restore(). Functions that run in other threads at the same time overlap."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.record: Callable[[str], Any] | None = None  # marks regions for torch.profiler
        self._patches: list[tuple[Any, str, Any]] = []

    def wrap(
        self, owner: Any, name: str, label: str, before: Callable[..., Any] | None = None
    ) -> None:
        """Time owner.name as `label`; `before`, if given, sees each call's
        arguments first, outside the timed part."""
        fn = getattr(owner, name)
        total, calls = self.total, self.calls

        def timed(*a, **kw):
            if before is not None:
                before(*a, **kw)
            t0 = time.perf_counter()
            try:
                if self.record is not None:
                    with self.record(label):
                        return fn(*a, **kw)
                return fn(*a, **kw)
            finally:
                total[label] += time.perf_counter() - t0
                calls[label] += 1

        self._patches.append((owner, name, fn))
        setattr(owner, name, timed)

    def wrap_all(
        self,
        regions: Iterable[tuple[Any, str, str]],
        before: dict[str, Callable[..., Any]] | None = None,
    ) -> None:
        """Wrap each (owner, attribute, label); `before` maps labels to hooks."""
        for owner, name, label in regions:
            self.wrap(owner, name, label, (before or {}).get(label))

    def record_for_profiler(self) -> None:
        """From now on also mark every region for torch.profiler."""
        import torch

        self.record = torch.profiler.record_function

    def clear(self) -> None:
        self.total.clear()
        self.calls.clear()

    def restore(self) -> None:
        for owner, name, fn in reversed(self._patches):
            setattr(owner, name, fn)
        self._patches.clear()


# -- numbers and tables ----------------------------------------------------------------------


def pct(values: Iterable[float], p: float) -> float | None:
    """Nearest-rank percentile p (0-100) of unsorted values; None when empty."""
    return percentile(sorted(values), p)


def fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def verdict(passed: bool | None) -> str:
    """A target's mark, four characters wide."""
    return {True: "PASS", False: "FAIL", None: "n/a "}[passed]


def print_header(head: str) -> None:
    """A table's heading line, underlined."""
    print(head)
    print("-" * len(head))


def print_json_line(result: dict[str, Any]) -> None:
    """The last line of a benchmark's stdout: everything printed above it."""
    print(json.dumps(result))


# -- the machine -----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What a figure was measured on: CPU model, cores, torch, Python, the date."""
    import datetime
    import os
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
