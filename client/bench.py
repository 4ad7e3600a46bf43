"""`lorapool bench`: a load generator that reports like ghz, plus what ghz cannot
see in a stream (time to first token, inter-token latency, tokens/s).

Three layers, usable apart:
- `make_trace` / `iter_trace`: a seeded synthetic workload (power-law adapter
  popularity, Poisson arrivals, prompt and output lengths). Pure Python, so an
  in-process engine benchmark can replay the very same trace.
- `run_bench(target, config)`: drive a server over gRPC, closed loop
  (`concurrency` workers) or open loop (`rps` Poisson arrivals).
- `BenchReport`: ghz's summary text and ghz's JSON schema, with a `tokens` object.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import json
import random
import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

# -- trace synthesis -------------------------------------------------------------------------

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


def make_trace(
    n_requests: int,
    n_adapters: int,
    zipf: float = 1.0,
    rps: float | None = None,
    prompt_tokens: int | Range = (32, 128),
    max_new_tokens: int | Range = (32, 128),
    seed: int = 0,
    **kwargs: Any,
) -> list[TraceItem]:
    """The first n_requests items of `iter_trace` (same arguments)."""
    trace = iter_trace(n_adapters, zipf, rps, prompt_tokens, max_new_tokens, seed, **kwargs)
    return list(itertools.islice(trace, n_requests))


def prompt_text(item: TraceItem) -> str:
    """prompt_tokens common words: about that many tokens for a BPE tokenizer."""
    rng = random.Random(item.prompt_seed)
    return " ".join(rng.choice(WORDS) for _ in range(item.prompt_tokens))


def prompt_ids(item: TraceItem, vocab_size: int) -> list[int]:
    """Exactly prompt_tokens ids, avoiding the low ids where special tokens live."""
    rng = random.Random(item.prompt_seed)
    low = min(100, vocab_size // 2)
    return [rng.randrange(low, vocab_size) for _ in range(item.prompt_tokens)]


# -- running ---------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    """What to send and how fast. Closed loop unless `rps` is set; in open loop
    `concurrency` (if set) caps the requests in flight. Without `total` or
    `duration`, 200 requests are sent, as ghz does."""

    call: str = "generate"  # or "complete"
    total: int | None = None
    duration: float | None = None  # seconds; requests in flight then finish
    concurrency: int | None = None  # closed loop default: 8
    rps: float | None = None
    adapters: int = 8
    adapter_prefix: str = "adapter-"
    zipf: float = 1.0
    base_fraction: float = 0.0
    prompt_tokens: Range = (32, 128)
    max_new_tokens: Range = (32, 128)
    input_ids: bool = False  # send token ids (exact prompt lengths) instead of words
    vocab_size: int | None = None  # for input_ids; default: GetModelInfo
    ignore_eos: bool = True  # exact output lengths
    temperature: float = 0.0
    seed: int = 0
    timeout: float = 120.0
    api_key: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None
    details: bool = True
    progress: bool = False
    name: str = ""


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


def status_name(code: Any) -> str:
    """grpc.StatusCode in Go's spelling, as ghz reports it (Canceled, NotFound)."""
    if code.name in ("OK", "CANCELLED"):
        return {"OK": "OK", "CANCELLED": "Canceled"}[code.name]
    return "".join(part.capitalize() for part in code.name.split("_"))


class _Runner:
    def __init__(self, client: Any, config: BenchConfig, vocab_size: int):
        self.client = client
        self.config = config
        self.vocab_size = vocab_size
        self.results: list[CallResult] = []
        self.in_flight = 0
        self.timed_out = False  # stopped sending because the duration ran out
        self.run_id = uuid.uuid4().hex[:8]  # request ids must not clash with another run

    def _kwargs(self, item: TraceItem) -> dict[str, Any]:
        inputs: dict[str, Any] = (
            {"input_ids": prompt_ids(item, self.vocab_size)}
            if self.config.input_ids
            else {"prompt": prompt_text(item)}
        )
        return {
            **inputs,
            "adapter_id": item.adapter_id,
            "request_id": f"bench-{self.run_id}-{item.index}",
            "max_new_tokens": item.max_new_tokens,
            "ignore_eos": self.config.ignore_eos,
            "temperature": self.config.temperature,
        }

    async def one(self, item: TraceItem) -> None:
        from lorapool.client.client import LoraPoolClientError

        kwargs = self._kwargs(item)
        result = CallResult(timestamp=time.time(), latency_s=0.0, status="OK")
        self.in_flight += 1
        t0 = time.perf_counter()
        try:
            if self.config.call == "complete":
                reply = await self.client.complete(**kwargs)
                result.tokens = len(reply.token_ids)
                result.finish_reason = reply.finish_reason.name
                result.ttft_s = reply.usage.ttft_ms / 1e3 if reply.usage.ttft_ms else None
            else:
                last = t0
                async for event in self.client.generate(**kwargs):
                    if event.finish_reason:
                        result.finish_reason = event.finish_reason.name
                    n = len(event.token_ids)
                    if not n:
                        continue
                    now = time.perf_counter()
                    if result.ttft_s is None:
                        result.ttft_s = now - t0
                    else:
                        result.itl_s.extend([(now - last) / n] * n)
                    last = now
                    result.tokens += n
        except LoraPoolClientError as err:
            result.status = status_name(err.code)
            result.error = f"rpc error: code = {result.status} desc = {err.details}"
        except Exception as err:  # a bench reports every failure, it never stops on one
            result.status = "Unknown"
            result.error = f"{type(err).__name__}: {err}"
        result.latency_s = time.perf_counter() - t0
        self.in_flight -= 1
        self.results.append(result)

    async def closed_loop(self, items: Iterator[TraceItem], deadline: float | None) -> None:
        async def worker() -> None:
            for item in items:  # one shared iterator: workers take turns
                if deadline is not None and time.perf_counter() >= deadline:
                    self.timed_out = True
                    return
                await self.one(item)

        await asyncio.gather(*(worker() for _ in range(self.config.concurrency or 8)))

    async def open_loop(
        self, items: Iterator[TraceItem], start: float, deadline: float | None
    ) -> None:
        limit = asyncio.Semaphore(self.config.concurrency) if self.config.concurrency else None

        async def send(item: TraceItem) -> None:
            if limit is None:
                return await self.one(item)
            async with limit:
                await self.one(item)

        tasks = []
        for item in items:
            at = start + item.arrival_s
            if deadline is not None and at >= deadline:
                self.timed_out = True
                break
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(item)))
        await asyncio.gather(*tasks)

    async def show_progress(self, start: float, stream: TextIO) -> None:
        while True:
            done = len(self.results)
            errors = sum(r.status != "OK" for r in self.results)
            tokens = sum(r.tokens for r in self.results)
            elapsed = time.perf_counter() - start
            stream.write(
                f"\r[{elapsed:6.1f}s] {done} done, {self.in_flight} in flight, "
                f"{errors} errors, {tokens / max(elapsed, 1e-9):.0f} tok/s  "
            )
            stream.flush()
            await asyncio.sleep(0.25)


async def run_bench_async(
    target: str, config: BenchConfig, progress_stream: TextIO | None = None
) -> BenchReport:
    """Drive `target` with the configured workload and return the report."""
    from lorapool.client.client import AsyncLoraPoolClient

    if config.call not in ("generate", "complete"):
        raise ValueError(f"call must be generate or complete, not {config.call!r}")
    total = config.total if config.total or config.duration else 200
    client = AsyncLoraPoolClient(
        target,
        api_key=config.api_key,
        tls=config.tls,
        root_certificates=config.root_certificates,
        timeout=config.timeout,
        retries=0,  # count exactly what was sent
    )
    try:
        vocab = config.vocab_size or 0
        if config.input_ids and not vocab:
            vocab = (await client.model_info()).vocab_size
        runner = _Runner(client, config, vocab)
        trace = iter_trace(
            config.adapters,
            config.zipf,
            config.rps,
            config.prompt_tokens,
            config.max_new_tokens,
            config.seed,
            adapter_prefix=config.adapter_prefix,
            base_fraction=config.base_fraction,
        )
        items = itertools.islice(trace, total) if total else trace
        start = time.perf_counter()
        deadline = start + config.duration if config.duration else None
        progress = None
        if config.progress:
            progress = asyncio.create_task(
                runner.show_progress(start, progress_stream or sys.stderr)
            )
        try:
            if config.rps:
                await runner.open_loop(items, start, deadline)
            else:
                await runner.closed_loop(items, deadline)
        finally:
            if progress is not None:
                progress.cancel()
                (progress_stream or sys.stderr).write("\n")
        elapsed = time.perf_counter() - start
    finally:
        await client.close()
    end_reason = "timeout" if runner.timed_out else "normal"
    return BenchReport.build(target, config, runner.results, elapsed, end_reason)


def run_bench(target: str, config: BenchConfig) -> BenchReport:
    """Blocking entry point for scripts; use run_bench_async inside an event loop."""
    return asyncio.run(run_bench_async(target, config))


# -- report ----------------------------------------------------------------------------------

PERCENTAGES = (10, 25, 50, 75, 90, 95, 99)
NS = 1_000_000_000


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


def _ns(seconds: float | None) -> int | None:
    return None if seconds is None else int(round(seconds * NS))


def _rfc3339(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, UTC).isoformat().replace("+00:00", "Z")


@dataclass
class BenchReport:
    """The ghz report of one run. Fastest, slowest, histogram and distribution
    cover successful calls; average covers every call (ghz's definitions)."""

    name: str
    date: float
    end_reason: str
    options: dict[str, Any]
    count: int
    total_s: float
    average_s: float
    fastest_s: float
    slowest_s: float
    rps: float
    histogram: list[tuple[float, int, float]]
    latency_distribution: list[tuple[int, float]]
    status_codes: dict[str, int]
    errors: dict[str, int]
    finish_reasons: dict[str, int]  # of OK calls: a stream cut by a drain is OK + CANCELLED
    results: list[CallResult]
    generated_tokens: int
    tokens_per_second: float
    ttft: dict[str, float | None]
    itl: dict[str, float | None]
    ttft_source: str  # "stream" (measured here) or "server" (Usage.ttft_ms, for complete)

    @classmethod
    def build(
        cls,
        target: str,
        config: BenchConfig,
        results: list[CallResult],
        total_s: float,
        end_reason: str = "normal",
    ) -> BenchReport:
        ok = sorted(r.latency_s for r in results if r.status == "OK")
        ttfts = sorted(r.ttft_s for r in results if r.ttft_s is not None)
        itls = sorted(x for r in results for x in r.itl_s)
        tokens = sum(r.tokens for r in results)
        count = len(results)
        return cls(
            name=config.name,
            date=time.time(),
            end_reason=end_reason,
            options=_options(target, config),
            count=count,
            total_s=total_s,
            average_s=sum(r.latency_s for r in results) / count if count else 0.0,
            fastest_s=ok[0] if ok else 0.0,
            slowest_s=ok[-1] if ok else 0.0,
            rps=count / total_s if total_s > 0 else 0.0,
            histogram=histogram(ok),
            latency_distribution=[(p, percentile(ok, p) or 0.0) for p in PERCENTAGES if ok],
            status_codes=dict(Counter(r.status for r in results)),
            errors=dict(Counter(r.error for r in results if r.error)),
            finish_reasons=dict(Counter(r.finish_reason for r in results if r.finish_reason)),
            results=results if config.details else [],
            generated_tokens=tokens,
            tokens_per_second=tokens / total_s if total_s > 0 else 0.0,
            ttft={f"p{p}": percentile(ttfts, p) for p in (50, 90, 99)},
            itl={f"p{p}": percentile(itls, p) for p in (50, 99)},
            ttft_source="server" if config.call == "complete" else "stream",
        )

    def to_json(self) -> dict[str, Any]:
        """ghz's JSON report (durations in nanoseconds, histogram marks in
        seconds) with a `tokens` object added."""
        return {
            "name": self.name,
            "endReason": self.end_reason,
            "options": self.options,
            "date": _rfc3339(self.date),
            "count": self.count,
            "total": _ns(self.total_s),
            "average": _ns(self.average_s),
            "fastest": _ns(self.fastest_s),
            "slowest": _ns(self.slowest_s),
            "rps": self.rps,
            "errorDistribution": self.errors,
            "statusCodeDistribution": self.status_codes,
            "latencyDistribution": [
                {"percentage": p, "latency": _ns(v)} for p, v in self.latency_distribution
            ],
            "histogram": [{"mark": m, "count": c, "frequency": f} for m, c, f in self.histogram],
            "details": [
                {
                    "timestamp": _rfc3339(r.timestamp),
                    "latency": _ns(r.latency_s),
                    "error": r.error,
                    "status": r.status,
                }
                for r in self.results
            ],
            "tokens": {
                "total": self.generated_tokens,
                "tokens_per_second": self.tokens_per_second,
                "ttft": {k: _ns(v) for k, v in self.ttft.items()},
                "itl": {k: _ns(v) for k, v in self.itl.items()},
                "ttft_source": self.ttft_source,
                "finish_reasons": self.finish_reasons,
            },
        }

    def text(self) -> str:
        """ghz's summary layout, then the token section."""
        lines = [
            "",
            "Summary:",
            f"  Count:        {self.count}",
            f"  Total:        {format_duration(self.total_s)}",
            f"  Slowest:      {format_duration(self.slowest_s)}",
            f"  Fastest:      {format_duration(self.fastest_s)}",
            f"  Average:      {format_duration(self.average_s)}",
            f"  Requests/sec: {self.rps:.2f}",
            "",
            "Response time histogram:",
        ]
        top = max((c for _, c, _ in self.histogram), default=0)
        width = len(f"[{top}]")
        for mark, c, _ in self.histogram:
            bar = "∎" * (round(40 * c / top) if top else 0)
            lines.append(f"  {mark * 1e3:10.3f} {f'[{c}]':<{width}}  |{bar}")
        lines += ["", "Latency distribution:"]
        lines += [f"  {p} % in {format_duration(v)}" for p, v in self.latency_distribution]
        lines += ["", "Status code distribution:"]
        width = max((len(s) + 2 for s in self.status_codes), default=0)
        for status, n in sorted(self.status_codes.items()):
            lines.append(f"  {f'[{status}]':<{width}}  {n} responses")
        if self.errors:
            lines += ["", "Error distribution:"]
            width = max(len(str(n)) + 2 for n in self.errors.values())
            for error, n in sorted(self.errors.items(), key=lambda x: -x[1]):
                lines.append(f"  {f'[{n}]':<{width}}  {error}")
        source = "server-reported" if self.ttft_source == "server" else "measured on the stream"
        ttft = ", ".join(f"{k} {format_duration(v)}" for k, v in self.ttft.items())
        itl = ", ".join(f"{k} {format_duration(v)}" for k, v in self.itl.items())
        lines += [
            "",
            "Tokens:",
            f"  Generated:    {self.generated_tokens}",
            f"  Tokens/sec:   {self.tokens_per_second:.2f}",
            "  Finished:     "
            + (", ".join(f"{k} {n}" for k, n in sorted(self.finish_reasons.items())) or "-"),
            f"  TTFT:         {ttft}  ({source})",
            f"  ITL:          {itl}",
            "",
        ]
        return "\n".join(lines)


def _options(target: str, config: BenchConfig) -> dict[str, Any]:
    """ghz's `options` block, plus the workload under `lorapool`."""
    method = "Complete" if config.call == "complete" else "Generate"
    return {
        "host": target,
        "call": f"lorapool.v1.LoraPoolService.{method}",
        "insecure": not (config.tls or config.root_certificates),
        "total": config.total or 0,
        "concurrency": config.concurrency or (0 if config.rps else 8),
        "rps": config.rps or 0,
        "duration": _ns(config.duration) or 0,
        "timeout": _ns(config.timeout),
        "name": config.name,
        "lorapool": {
            "adapters": config.adapters,
            "adapter_prefix": config.adapter_prefix,
            "zipf": config.zipf,
            "base_fraction": config.base_fraction,
            "prompt_tokens": list(config.prompt_tokens),
            "max_new_tokens": list(config.max_new_tokens),
            "input_ids": config.input_ids,
            "ignore_eos": config.ignore_eos,
            "temperature": config.temperature,
            "seed": config.seed,
        },
    }


# -- command line ----------------------------------------------------------------------------


def parse_range(text: str) -> Range:
    """ "MIN:MAX" or "N"."""
    lo, _, hi = text.partition(":")
    try:
        return as_range((int(lo), int(hi or lo)))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None


def parse_duration(text: str) -> float:
    """Seconds, or a number with s / m / h, as ghz's -z takes (30s, 2m)."""
    m = re.fullmatch(r"(\d+(?:\.\d*)?)\s*(ms|s|m|h)?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"bad duration {text!r} (e.g. 30s, 2m)")
    scale = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}[m.group(2)]
    return float(m.group(1)) * scale


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    from lorapool.client.commands import add_connection_arguments

    add_connection_arguments(parser)
    load = parser.add_argument_group("load")
    load.add_argument("--call", choices=("generate", "complete"), default="generate")
    load.add_argument("-n", "--total", type=int, help="requests to send (default 200)")
    load.add_argument("-z", "--duration", type=parse_duration, help="run for this long (30s, 2m)")
    load.add_argument("-c", "--concurrency", type=int, help="closed loop workers (default 8)")
    load.add_argument("--rps", type=float, help="open loop: Poisson arrivals at this rate")
    work = parser.add_argument_group("workload")
    work.add_argument("--adapters", type=int, default=8, help="adapters in the mix (0 = base)")
    work.add_argument("--adapter-prefix", default="adapter-", help="names PREFIX000, PREFIX001..")
    work.add_argument("--zipf", type=float, default=1.0, help="popularity skew (0 = uniform)")
    work.add_argument("--base-fraction", type=float, default=0.0, help="share of base requests")
    work.add_argument("--prompt-tokens", type=parse_range, default=(32, 128), metavar="MIN:MAX")
    work.add_argument("--max-new-tokens", type=parse_range, default=(32, 128), metavar="MIN:MAX")
    work.add_argument("--input-ids", action="store_true", help="send token ids, exact lengths")
    work.add_argument("--vocab-size", type=int, help="id range for --input-ids")
    work.add_argument("--allow-eos", action="store_true", help="stop at EOS (lengths vary)")
    work.add_argument("--temperature", type=float, default=0.0)
    work.add_argument("--seed", type=int, default=0)
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="PATH|-", help="ghz JSON report to a file or stdout")
    out.add_argument("--no-details", action="store_true", help="leave per-call details out")
    out.add_argument("--progress", action="store_true", help="live line on stderr (tty: on)")
    out.add_argument("--name", default="", help="name stored in the report")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    from lorapool.client.commands import connection_kwargs

    conn = connection_kwargs(args)
    return BenchConfig(
        call=args.call,
        total=args.total,
        duration=args.duration,
        concurrency=args.concurrency,
        rps=args.rps,
        adapters=args.adapters,
        adapter_prefix=args.adapter_prefix,
        zipf=args.zipf,
        base_fraction=args.base_fraction,
        prompt_tokens=args.prompt_tokens,
        max_new_tokens=args.max_new_tokens,
        input_ids=args.input_ids,
        vocab_size=args.vocab_size,
        ignore_eos=not args.allow_eos,
        temperature=args.temperature,
        seed=args.seed,
        timeout=conn["timeout"],
        api_key=conn["api_key"],
        tls=conn["tls"],
        root_certificates=conn["root_certificates"],
        details=not args.no_details,
        progress=args.progress or sys.stderr.isatty(),
        name=args.name,
    )


def run(args: argparse.Namespace) -> int:
    """Exit 0 when any call succeeded (ghz's habit), 1 when none did."""
    from lorapool.client.client import LoraPoolClientError

    try:
        report = run_bench(args.target, config_from_args(args))
    except LoraPoolClientError as err:
        print(f"lorapool bench: {err}", file=sys.stderr)
        return 1
    if args.json == "-":
        json.dump(report.to_json(), sys.stdout)
        sys.stdout.write("\n")
    else:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report.to_json(), f, indent=2)
        print(report.text())
    return 0 if report.status_codes.get("OK") else 1
