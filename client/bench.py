"""`lorapool bench`: a load generator that reports like ghz, plus what ghz cannot
see in a stream (time to first token, inter-token latency, tokens/s).

It drives a server over gRPC, closed loop (`concurrency` workers) or open loop
(`rps` Poisson arrivals), with the seeded workload of `lorapool.client.trace`,
and returns a `lorapool.client.report.BenchReport`.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import re
import sys
import time
import uuid
from collections.abc import AsyncIterable, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from lorapool import progress
from lorapool.client.client import AsyncLoraPoolClient
from lorapool.client.commands import add_connection_arguments, connection_kwargs
from lorapool.client.errors import LoraPoolClientError
from lorapool.client.report import BenchReport, status_name
from lorapool.client.stats import CallResult
from lorapool.client.trace import (
    Range,
    TraceItem,
    as_range,
    iter_trace,
    prompt_ids,
    prompt_text,
    split_range,
)

# -- configuration ---------------------------------------------------------------------------


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
    tls_cert: bytes | None = None  # client certificate and key, for mutual TLS
    tls_key: bytes | None = None
    details: bool = True
    progress: bool | None = (
        False  # a bar of requests done on stderr; None: lorapool.progress decides
    )
    name: str = ""


# -- one call --------------------------------------------------------------------------------


def describe_error(err: Exception) -> tuple[str, str]:
    """(status, error) of a failed call as ghz reports them."""
    if isinstance(err, LoraPoolClientError):
        status = status_name(err.code)
        return status, f"rpc error: code = {status} desc = {err.details}"
    return "Unknown", f"{type(err).__name__}: {err}"


async def timed_call(send: Callable[[CallResult, float], Awaitable[None]]) -> CallResult:
    """Time one call: `send(result, start)` fills in what came back. A failure is
    recorded in the result, never raised: a bench reports every failure and never
    stops on one."""
    result = CallResult(timestamp=time.time(), latency_s=0.0, status="OK")
    start = time.perf_counter()
    try:
        await send(result, start)
    except Exception as err:
        result.status, result.error = describe_error(err)
    result.latency_s = time.perf_counter() - start
    return result


async def read_stream(result: CallResult, events: AsyncIterable[Any], start: float) -> None:
    """Count a stream of TokenEvents into `result` (TTFT, ITL, finish reason)."""
    last = start
    async for event in events:
        if event.finish_reason:
            result.finish_reason = event.finish_reason.name
        last = result.add_tokens(len(event.token_ids), start, last)


# -- running ---------------------------------------------------------------------------------


class _Runner:
    def __init__(self, client: Any, config: BenchConfig, vocab_size: int):
        self.client = client
        self.config = config
        self.vocab_size = vocab_size
        self.results: list[CallResult] = []
        self.in_flight = 0
        self.timed_out = False  # stopped sending because the duration ran out
        self.errors = 0
        self.tokens = 0
        self.start = time.perf_counter()
        self.shown: Any = progress.NoBar()  # requests done, while drive() runs
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
        call = self._complete if self.config.call == "complete" else self._generate
        send = functools.partial(call, self._kwargs(item))
        self.in_flight += 1
        result = await timed_call(send)
        self.in_flight -= 1
        self.results.append(result)
        self.errors += result.status != "OK"
        self.tokens += result.tokens
        self.shown.update()
        self.shown.set_postfix_str(self.postfix(), refresh=False)

    def postfix(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.tokens / max(elapsed, 1e-9)
        return f"{self.in_flight} in flight, {self.errors} errors, {rate:.0f} tok/s"

    async def _generate(self, kwargs: dict[str, Any], result: CallResult, start: float) -> None:
        await read_stream(result, self.client.generate(**kwargs), start)

    async def _complete(self, kwargs: dict[str, Any], result: CallResult, start: float) -> None:
        reply = await self.client.complete(**kwargs)
        result.tokens = len(reply.token_ids)
        result.finish_reason = reply.finish_reason.name
        result.ttft_s = reply.usage.ttft_ms / 1e3 if reply.usage.ttft_ms else None

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

    async def drive(
        self, items: Iterator[TraceItem], total: int | None, stream: TextIO | None = None
    ) -> float:
        """Send `items` (closed or open loop, until the duration runs out), with a
        bar of the `total` requests (None: unknown) on `stream` (default stderr)
        when config.progress asks for one; returns the elapsed seconds."""
        start = self.start = time.perf_counter()
        deadline = start + self.config.duration if self.config.duration else None
        with progress.bar(total, "bench", "req", self.config.progress, stream) as self.shown:
            if self.config.rps:
                await self.open_loop(items, start, deadline)
            else:
                await self.closed_loop(items, deadline)
        self.shown = progress.NoBar()
        return time.perf_counter() - start


def _planned_total(config: BenchConfig) -> int | None:
    """Requests to send: `total`, 200 without total or duration, None (endless)
    when only a duration bounds the run."""
    return config.total if config.total or config.duration else 200


def _trace_items(config: BenchConfig) -> Iterator[TraceItem]:
    """The configured workload: _planned_total(config) items, or endless."""
    total = _planned_total(config)
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
    return itertools.islice(trace, total) if total else trace


async def run_bench_async(
    target: str, config: BenchConfig, progress_stream: TextIO | None = None
) -> BenchReport:
    """Drive `target` with the configured workload and return the report."""
    if config.call not in ("generate", "complete"):
        raise ValueError(f"call must be generate or complete, not {config.call!r}")
    client = AsyncLoraPoolClient(
        target,
        api_key=config.api_key,
        tls=config.tls,
        root_certificates=config.root_certificates,
        tls_cert=config.tls_cert,
        tls_key=config.tls_key,
        timeout=config.timeout,
        retries=0,  # count exactly what was sent
    )
    try:
        vocab = config.vocab_size or 0
        if config.input_ids and not vocab:
            vocab = (await client.model_info()).vocab_size
        runner = _Runner(client, config, vocab)
        elapsed = await runner.drive(_trace_items(config), _planned_total(config), progress_stream)
    finally:
        await client.close()
    end_reason = "timeout" if runner.timed_out else "normal"
    return BenchReport.build(target, config, runner.results, elapsed, end_reason)


def run_bench(target: str, config: BenchConfig) -> BenchReport:
    """Blocking entry point for scripts; use run_bench_async inside an event loop."""
    return asyncio.run(run_bench_async(target, config))


# -- command line ----------------------------------------------------------------------------


def parse_range(text: str) -> Range:
    """ "MIN:MAX" or "N"."""
    try:
        return as_range(split_range(text))
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
    add_connection_arguments(parser)
    load = parser.add_argument_group("load")
    load.add_argument(
        "--call", choices=("generate", "complete"), default="generate", help="RPC to call"
    )
    load.add_argument("-n", "--total", type=int, help="requests to send (default 200)")
    load.add_argument("-z", "--duration", type=parse_duration, help="run for this long (30s, 2m)")
    load.add_argument("-c", "--concurrency", type=int, help="closed loop workers (default 8)")
    load.add_argument("--rps", type=float, help="open loop: Poisson arrivals at this rate")
    work = parser.add_argument_group("workload")
    work.add_argument("--adapters", type=int, default=8, help="adapters in the mix (0 = base)")
    work.add_argument("--adapter-prefix", default="adapter-", help="names PREFIX000, PREFIX001..")
    work.add_argument("--zipf", type=float, default=1.0, help="popularity skew (0 = uniform)")
    work.add_argument("--base-fraction", type=float, default=0.0, help="share of base requests")
    work.add_argument(
        "--prompt-tokens",
        type=parse_range,
        default="32:128",  # parsed by type, shown as given
        metavar="MIN:MAX",
        help="prompt length range, or N",
    )
    work.add_argument(
        "--max-new-tokens",
        type=parse_range,
        default="32:128",
        metavar="MIN:MAX",
        help="output length range, or N",
    )
    work.add_argument("--input-ids", action="store_true", help="send token ids, exact lengths")
    work.add_argument("--vocab-size", type=int, help="id range for --input-ids")
    work.add_argument("--allow-eos", action="store_true", help="stop at EOS (lengths vary)")
    work.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    work.add_argument(
        "--seed", type=int, default=0, help="seeds the workload (adapters, lengths, arrivals)"
    )
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="PATH|-", help="ghz JSON report to a file or stdout")
    out.add_argument("--no-details", action="store_true", help="leave per-call details out")
    out.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        help="a bar of requests done on stderr (default: on a terminal, or LORAPOOL_PROGRESS=1)",
    )
    out.add_argument("--name", default="", help="name stored in the report")


# BenchConfig fields that the flag of the same name sets as it is
_SAME_NAME = (
    "call", "total", "duration", "concurrency", "rps", "adapters", "adapter_prefix", "zipf",
    "base_fraction", "prompt_tokens", "max_new_tokens", "input_ids", "vocab_size",
    "temperature", "seed", "name",
)  # fmt: skip


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        **{key: getattr(args, key) for key in _SAME_NAME},
        **connection_kwargs(args),  # timeout, api_key, tls, certificates
        ignore_eos=not args.allow_eos,
        details=not args.no_details,
        progress=args.progress,  # None: lorapool.progress decides
    )


def run(args: argparse.Namespace) -> int:
    """Exit 0 when any call succeeded (ghz's habit), 1 when none did."""
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
