"""The trace through an in-process Engine, for bench_trace.py: one asyncio task
per request, submitted at its arrival time (no gRPC), every token's arrival
recorded, engine functions wrapped with region timers; then the run's figures
(throughput, cold and warm TTFT, ITL, loads, evictions, scheduler overhead)."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

from common import RegionTimer, pct, warm_engine
from cpu_time import CORES

from lorapool.client.trace import prompt_ids
from lorapool.memory.adapters import AdapterManager
from lorapool.server.engine import runner as runner_mod
from lorapool.server.engine.config import EngineConfig
from lorapool.server.engine.engine import Engine
from lorapool.server.engine.loop import StepLoop
from lorapool.server.engine.runner import ModelRunner
from lorapool.server.engine.scheduler import Scheduler
from lorapool.server.model.attention import PagedAttention
from lorapool.server.model.checkpoint import load_spec
from lorapool.server.model.lora import LoraBatch
from lorapool.server.model.model import Model
from lorapool.types import EngineStats, GenerationRequest, SamplingParams

# (owner, attribute, label); "step thread" rows nest: runner.step contains the rest.
REGIONS = [
    (Scheduler, "schedule", "scheduler.schedule"),
    (Scheduler, "after_step", "scheduler.after_step"),
    (StepLoop, "_postprocess", "loop._postprocess"),
    (AdapterManager, "place", "adapter place (step thread)"),
    (ModelRunner, "step", "runner.step"),
    (PagedAttention, "build_meta", "  attention metadata"),
    (ModelRunner, "_lora_batch", "  LoRA plan lookup"),
    (LoraBatch, "__init__", "    LoraBatch build"),
    (Model, "forward", "  model forward"),
    (LoraBatch, "apply", "    LoRA apply"),
    (PagedAttention, "__call__", "    attention"),
    (runner_mod, "sample", "  sampling"),
    (AdapterManager, "_read", "adapter load: read+pack (load threads)"),
    (AdapterManager, "evict_idle", "adapter evict_idle"),
]


async def replay(engine: Engine, trace, vocab: int) -> tuple[list[dict], float, list[int]]:
    loop = asyncio.get_running_loop()
    records: list[dict] = []
    running_samples: list[int] = []

    async def one(item, t0: float) -> None:
        delay = t0 + item.arrival_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        rec = {
            "index": item.index,
            "adapter": item.adapter_id,
            "want": item.max_new_tokens,
            "arrival": t0 + item.arrival_s,
            "times": [],
            "tokens": [],
            "error": None,
        }
        records.append(rec)
        req = GenerationRequest(
            request_id=f"trace-{item.index}",
            input_ids=prompt_ids(item, vocab),
            adapter_id=item.adapter_id,
            params=SamplingParams(max_new_tokens=item.max_new_tokens, ignore_eos=True),
        )
        try:
            async for ev in engine.generate(req):
                if ev.token_ids:
                    now = loop.time()
                    rec["times"].extend([now] * len(ev.token_ids))
                    rec["tokens"].extend(ev.token_ids)
        except Exception as exc:  # recorded as a failed request
            rec["error"] = f"{type(exc).__name__}: {exc}"
        rec["end"] = loop.time()

    async def sampler() -> None:
        while True:
            running_samples.append(len(engine.scheduler.running))
            await asyncio.sleep(0.02)

    t0 = loop.time()
    watch = asyncio.create_task(sampler())
    await asyncio.gather(*(one(item, t0) for item in trace))
    watch.cancel()
    return records, t0, running_samples


@dataclass
class EngineRun:
    """What one replay measured: the requests' records, samples of the running
    batch, this process's CPU seconds, engine stats before and after, the loop's
    scheduling and step seconds, the region timers and the rows of every step."""

    records: list[dict]
    running: list[int]
    cpu_s: float
    before: EngineStats
    after: EngineStats
    schedule_s: float
    step_s: float
    timer: RegionTimer
    step_rows: list[int]


def engine_config(args, paths, n_requests: int, pool_mib: float, host_mib: float):
    return EngineConfig(
        model_dir=str(paths.model_dir),
        adapter_dirs=[str(paths.adapters_dir)],
        pool_mib=pool_mib,
        host_cache_mib=host_mib,
        max_running=args.max_running,
        max_batch_tokens=args.max_batch_tokens,
        starvation_steps=args.starvation_steps,
        max_waiting=max(1024, n_requests + 16),
    )


async def run_engine(args, paths, trace, n: int, pool_mib: float, host_mib: float) -> dict:
    """The trace through a fresh engine, after base-model requests only (so no
    adapter is loaded before the trace), with REGIONS timed."""
    spec = load_spec(paths.model_dir)
    engine = Engine(engine_config(args, paths, len(trace), pool_mib, host_mib))
    await engine.start()
    timer = RegionTimer()
    step_rows: list[int] = []

    def count_rows(runner, scheduled, *args, **kwargs) -> None:
        step_rows.append(len(scheduled))

    try:
        await warm_engine(engine, spec.vocab_size, "warm-")
        s0 = engine.stats()
        sched0, step0 = engine.schedule_seconds, engine.step_seconds
        timer.wrap_all(REGIONS, before={"runner.step": count_rows})
        c0 = time.process_time()
        records, _, running = await replay(engine, trace, spec.vocab_size)
        cpu = time.process_time() - c0
        timer.restore()
        s1 = engine.stats()
        sched, step = engine.schedule_seconds - sched0, engine.step_seconds - step0
    finally:
        timer.restore()
        await engine.stop()
    return summarize_run(n, EngineRun(records, running, cpu, s0, s1, sched, step, timer, step_rows))


def latencies_ms(records: list[dict], ok: list[dict]) -> dict[str, list[float]]:
    """TTFT from arrival of the ok requests: all, cold and warm; and every gap
    between consecutive tokens. A request is cold when it is the first of its
    adapter in the trace: its adapter has to come from disk before it can start."""
    seen: set[str] = set()
    cold_ids = set()
    for r in sorted(records, key=lambda r: r["arrival"]):
        if r["adapter"] not in seen:
            seen.add(r["adapter"])
            cold_ids.add(r["index"])
    return {
        "ttft": [1e3 * (r["times"][0] - r["arrival"]) for r in ok if r["times"]],
        "cold": [1e3 * (r["times"][0] - r["arrival"]) for r in ok if r["index"] in cold_ids],
        "warm": [1e3 * (r["times"][0] - r["arrival"]) for r in ok if r["index"] not in cold_ids],
        "itl": [
            1e3 * (b - a) for r in ok for a, b in zip(r["times"], r["times"][1:], strict=False)
        ],
    }


def summarize_run(n: int, run: EngineRun) -> dict:
    records, cpu, s0, s1 = run.records, run.cpu_s, run.before, run.after
    sched, step, timer = run.schedule_s, run.step_s, run.timer
    idle = s1.total_pages - s1.free_pages - s1.adapter_pages - s1.cached_pages
    ok = [r for r in records if r["error"] is None and len(r["tokens"]) == r["want"]]
    failed = [r for r in records if r not in ok]
    start = min(r["arrival"] for r in records)
    span = max(r["end"] for r in records) - start
    tokens = sum(len(r["tokens"]) for r in ok)
    lat = latencies_ms(records, ok)
    ttft, cold, warm, itl = lat["ttft"], lat["cold"], lat["warm"], lat["itl"]
    regions = {
        k: {"s": timer.total[k], "calls": timer.calls[k]} for _, _, k in REGIONS if k in timer.calls
    }
    return {
        "adapters": n,
        "requests": len(records),
        "ok": len(ok),
        "failed": len(failed),
        "errors": sorted({r["error"] or "short output" for r in failed})[:5],
        "distinct_adapters": len({r["adapter"] for r in records}),
        "tokens": tokens,
        "span_s": span,
        "tok_s": tokens / span if span > 0 else 0.0,
        "cpu_s": cpu,
        "tok_per_cpu_s": tokens / cpu if cpu > 0 else 0.0,
        "cpu_share": cpu / (span * CORES) if span > 0 else 0.0,
        "ttft_ms_p50": pct(ttft, 50),
        "ttft_ms_p99": pct(ttft, 99),
        "ttft_cold_ms_p50": pct(cold, 50),
        "ttft_cold_ms_p99": pct(cold, 99),
        "ttft_warm_ms_p50": pct(warm, 50),
        "ttft_warm_ms_p99": pct(warm, 99),
        "cold_requests": len(cold),
        "itl_ms_p50": pct(itl, 50),
        "itl_ms_p99": pct(itl, 99),
        "adapter_loads": s1.adapter_loads - s0.adapter_loads,
        "adapter_evictions": s1.adapter_evictions - s0.adapter_evictions,
        "preemptions": s1.preemptions - s0.preemptions,
        "steps": s1.steps - s0.steps,
        "schedule_s": sched,
        "step_s": step,
        "sched_overhead": sched / (sched + step) if sched + step > 0 else 0.0,
        "step_busy": step / span if span > 0 else 0.0,
        "mean_step_rows": statistics.fmean(run.step_rows) if run.step_rows else 0.0,
        "mean_running": statistics.fmean(run.running) if run.running else 0.0,
        "kv_pages_at_end": idle,
        "total_pages": s1.total_pages,
        "host_cache_bytes_end": s1.host_cache_bytes,
        "regions": regions,
        "outputs": {r["index"]: r["tokens"] for r in ok},
    }
