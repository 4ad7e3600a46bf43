"""The engine side of bench_grpc.py: the trace through an Engine in this process,
closed loop, each call measured as `lorapool bench` measures a Generate stream
(timed_call, read_stream, BenchReport), so the two runs differ only by gRPC."""

from __future__ import annotations

import asyncio
import functools
import time

from common import warm_engine
from cpu_time import self_cpu_s
from grpc_workload import bench_config, engine_config, summary, trace_adapters, trace_kw

from lorapool.client.bench import BenchConfig, read_stream, timed_call
from lorapool.client.report import BenchReport
from lorapool.client.stats import CallResult
from lorapool.client.trace import iter_trace, prompt_ids, prompt_text
from lorapool.types import GenerationRequest, SamplingParams


def engine_request(item, config: BenchConfig, vocab: int):
    """The GenerationRequest run_bench would send for this trace item."""
    if config.input_ids:
        inputs = {"input_ids": prompt_ids(item, vocab)}
    else:
        inputs = {"prompt": prompt_text(item)}
    return GenerationRequest(
        request_id=f"trace-{item.index}",
        adapter_id=item.adapter_id,
        params=SamplingParams(
            max_new_tokens=item.max_new_tokens,
            ignore_eos=config.ignore_eos,
            temperature=config.temperature,
        ),
        **inputs,
    )


async def engine_closed_loop(args, engine, config: BenchConfig, vocab: int) -> list[CallResult]:
    """--concurrency workers taking the trace's items from one shared iterator,
    each call measured as run_bench measures a Generate stream."""
    results: list[CallResult] = []
    items = iter_trace(**trace_kw(args))
    remaining = [args.requests]

    async def one(item) -> None:
        request = engine_request(item, config, vocab)
        results.append(await timed_call(functools.partial(_engine_stream, engine, request)))

    async def worker() -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            await one(next(items))

    await asyncio.gather(*(worker() for _ in range(config.concurrency)))
    return results


async def _engine_stream(engine, request, result: CallResult, start: float) -> None:
    await read_stream(result, engine.generate(request), start)


async def engine_run(args, paths, vocab: int) -> dict:
    """The trace through an in-process Engine, measured as run_bench measures."""
    from lorapool.server.engine.engine import Engine

    config = bench_config(args, vocab)
    loop = asyncio.get_running_loop()
    engine = await loop.run_in_executor(None, Engine, engine_config(args, paths))
    await engine.start()
    try:
        for adapter_id in trace_adapters(args):
            await engine.load_adapter(adapter_id)
        await warm_engine(engine, vocab, "engine-")
        stats0 = engine.stats()
        cpu0 = self_cpu_s()
        start = time.perf_counter()
        results = await engine_closed_loop(args, engine, config, vocab)
        elapsed = time.perf_counter() - start
        cpu = self_cpu_s() - cpu0
        stats1 = engine.stats()
        report = BenchReport.build("in-process", config, results, elapsed)
        return summary(report, stats0, stats1, cpu)
    finally:
        await engine.stop()
