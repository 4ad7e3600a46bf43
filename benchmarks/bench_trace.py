"""The engine on a synthetic multi-adapter trace, against HF transformers + PEFT.

A seeded trace (client/trace.py's make_trace): adapter popularity follows a power
law (zipf 0.8 by default), arrivals are Poisson at --rps, prompts are random token
ids and every request asks for an exact number of new tokens (ignore_eos). The
trace is replayed through an in-process Engine (one asyncio task per request,
submitted at its arrival time; no gRPC) for each fleet size in --adapters, all on
the bench demo model (adapters adapter-000.. of one demo with the largest fleet).

Memory is sized once, from the largest fleet, and shared by every run:
- pool = --adapter-fraction (10%) of the fleet's adapter pages, measured by packing
  every adapter exactly as the engine does, + KV room for --max-running sequences
  of the longest prompt + output, + the engine's 2% free-page watermark;
- host cache = --host-fraction (15%) of the fleet's packed bytes.
With 256 requests at zipf 0.8 the 1000-adapter trace touches about 150 adapters
(about 3000 pages, more than the whole pool) and the 100-adapter trace about 70,
so the large fleet has to evict, while 100 adapters fit the host cache. (At zipf
1.0, 256 requests touch only about 110 adapters, which fit the pool's free pages.)

The peer is Hugging Face transformers + PEFT on the same checkpoint and the same
trace: one PeftModel holding every adapter of the fleet (load_adapter per name),
requests taken in arrival order in static batches of --peer-batch, left padded,
greedy, every row run to the batch's longest max_new_tokens with EOS disabled, and
a mixed-adapter batch through generate(adapter_names=[...]). A batch starts when
its last request has arrived and the previous batch is done; only the tokens each
request asked for count, and the adapter load time does not. Its greedy outputs
are compared with ours request by request. The peer is skipped above
--peer-max-adapters (100): loading 100 adapters into one PeftModel already takes
about 50 s here and the cost grows with every adapter (each load_adapter walks
and extends every targeted layer), 1000 would hold 2.3 GB of LoRA weights in
1000-entry ModuleDicts, and PEFT's mixed-batch forward loops in Python over the
distinct adapters of a batch at every targeted layer; nobody serves a fleet that
way.

The default rate (16 req/s) is about twice what the engine sustains on two CPU
cores, so the running batch stays near --max-running and throughput measures
capacity rather than the arrival rate (at 8 req/s the 8- and 100-adapter runs
simply keep up with arrivals); TTFT then includes a growing queue.

Throughput is ok requests' generated tokens over the span from the first
submission to the last finish. TTFT counts from a request's arrival time (queueing
included), split into cold requests (the first of their adapter, which must come
from disk) and the rest; inter-token latency is every gap between consecutive
tokens of a request. Scheduler overhead is engine.schedule_seconds /
(schedule_seconds + step_seconds). Engine functions are wrapped with timers
during every run to show where the time goes.

The last line of stdout is one JSON object with everything printed above it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import (
    BENCH_DEMO,
    RegionTimer,
    args_json,
    bench_demos,
    fmt,
    int_list,
    int_range,
    pct,
    print_header,
    print_json_line,
    verdict,
    warm_engine,
)

from lorapool.client.trace import make_trace, prompt_ids
from lorapool.memory.adapter_layout import pack_adapter
from lorapool.memory.adapters import AdapterManager
from lorapool.memory.peft_adapter import read_adapter
from lorapool.memory.pool import PageLayout
from lorapool.server.engine import runner as runner_mod
from lorapool.server.engine.engine import Engine, EngineConfig
from lorapool.server.engine.runner import ModelRunner
from lorapool.server.engine.scheduler import Scheduler
from lorapool.server.model.attention import PagedAttention
from lorapool.server.model.checkpoint import load_spec
from lorapool.server.model.lora import LoraBatch
from lorapool.server.model.model import Model
from lorapool.types import EngineStats, GenerationRequest, SamplingParams

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache"
DEMO_PREFIX = "bench-trace-"
PAGES_FILE = "bench-trace-pages.json"
CORES = os.cpu_count() or 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=256, help="requests per fleet size")
    p.add_argument("--rps", type=float, default=None, help="Poisson arrival rate (req/s)")
    p.add_argument("--adapters", type=int_list, default=[8, 100, 1000], help="fleet sizes")
    p.add_argument("--zipf", type=float, default=0.8, help="popularity exponent (0 = uniform)")
    p.add_argument("--prompt", type=int_range, default=(16, 128), help="prompt tokens MIN:MAX")
    p.add_argument("--output", type=int_range, default=(16, 64), help="new tokens MIN:MAX")
    p.add_argument("--max-running", type=int, default=64, help="engine running batch cap")
    p.add_argument("--max-batch-tokens", type=int, default=512, help="engine token budget")
    p.add_argument(
        "--starvation-steps",
        type=int,
        default=EngineConfig.starvation_steps,
        help="engine fairness bound (steps a ready request may wait)",
    )
    p.add_argument(
        "--adapter-fraction",
        type=float,
        default=0.10,
        help="pool room for adapters, as a fraction of the largest fleet's pages",
    )
    p.add_argument(
        "--host-fraction",
        type=float,
        default=0.15,
        help="host cache, as a fraction of the largest fleet's packed bytes",
    )
    p.add_argument("--peer-batch", type=int, default=64, help="HF PEFT static batch size")
    p.add_argument("--peer-max-adapters", type=int, default=100)
    p.add_argument("--no-peer", action="store_true", help="skip HF transformers + PEFT")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=CACHE)
    p.add_argument("--quick", action="store_true", help="small smoke-test run")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.adapters = 24, [4, 16]
        args.prompt, args.output = (16, 48), (8, 24)
        args.max_running, args.peer_batch = 16, 8
        args.adapter_fraction = 0.4
        args.rps = args.rps or 40.0
    if args.rps is None:
        args.rps = 16.0
    if args.requests < 1 or min(args.adapters) < 1 or args.rps <= 0:
        p.error("--requests >= 1, --adapters >= 1 and --rps > 0 are required")
    if not 1 <= args.prompt[0] <= args.prompt[1] or not 1 <= args.output[0] <= args.output[1]:
        p.error("length ranges must satisfy 1 <= MIN <= MAX")
    return args


# --------------------------------------------------------------------------- setup


def demo_for(n: int, cache: Path):
    """A bench demo with at least n adapters: reuse any larger one, else write one."""
    from lorapool.demo import make_demo

    best = None
    for folder, params in bench_demos(cache, f"{DEMO_PREFIX}*/demo.json"):
        if params.get("n_adapters", 0) >= n and (best is None or params["n_adapters"] < best[1]):
            best = (folder, params["n_adapters"])
    root, count = best or (cache / f"{DEMO_PREFIX}{n}", n)
    t0 = time.perf_counter()
    paths = make_demo(root, n_adapters=count, **BENCH_DEMO)
    return paths, time.perf_counter() - t0


def adapter_pages(paths, n: int, block_size: int) -> tuple[list[dict], int, float]:
    """Pages and packed bytes of the first n adapters, packed as the engine packs
    them (fp32 pool). Cached next to the demo."""
    spec = load_spec(paths.model_dir)
    layout = PageLayout(spec.num_layers, block_size, spec.num_kv_heads, spec.head_dim)
    page_elems = layout.page_elems
    cache_file = paths.root / PAGES_FILE
    cached: dict = {}
    if cache_file.is_file():
        try:
            cached = json.loads(cache_file.read_text())
        except ValueError:
            cached = {}
    if cached.get("page_elems") != page_elems:
        cached = {"page_elems": page_elems, "adapters": {}}
    rows = cached["adapters"]
    t0 = time.perf_counter()
    changed = False
    for d in paths.adapter_dirs[:n]:
        if d.name in rows:
            continue
        aw = read_adapter(d, spec)
        packed = pack_adapter(spec, aw, torch.float32, page_elems)
        rows[d.name] = {
            "rank": aw.rank,
            "modules": len(aw.target_modules),
            "pages": packed.num_pages(page_elems),
            "packed_bytes": packed.flat.numel() * 4,
        }
        changed = True
    if changed:
        cache_file.write_text(json.dumps(cached))
    out = [rows[d.name] | {"name": d.name} for d in paths.adapter_dirs[:n]]
    return out, page_elems * 4, time.perf_counter() - t0


# (owner, attribute, label); "step thread" rows nest: runner.step contains the rest.
REGIONS = [
    (Scheduler, "schedule", "scheduler.schedule"),
    (Scheduler, "after_step", "scheduler.after_step"),
    (Engine, "_postprocess", "engine._postprocess"),
    (AdapterManager, "place", "adapter place (step thread)"),
    (ModelRunner, "step", "runner.step"),
    (runner_mod, "build_meta", "  attention metadata"),
    (ModelRunner, "_lora_batch", "  LoRA plan lookup"),
    (LoraBatch, "__init__", "    LoraBatch build"),
    (Model, "forward", "  model forward"),
    (LoraBatch, "apply", "    LoRA apply"),
    (PagedAttention, "__call__", "    attention"),
    (runner_mod, "sample", "  sampling"),
    (AdapterManager, "_read", "adapter load: read+pack (load threads)"),
    (AdapterManager, "evict_idle", "adapter evict_idle"),
]


# --------------------------------------------------------------------------- engine


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


# --------------------------------------------------------------------------- peer


def load_peer(paths, n: int):
    """One PeftModel holding the first n adapters of the demo, with EOS disabled
    (ignore-EOS semantics: nothing stops a row before max_new_tokens); returns
    (model, seconds the loading took)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(str(paths.model_dir), dtype=torch.float32)
    dirs = paths.adapter_dirs[:n]
    model = PeftModel.from_pretrained(base, str(dirs[0]), adapter_name=dirs[0].name)
    for d in dirs[1:]:
        model.load_adapter(str(d), adapter_name=d.name)
    model.eval()
    model.generation_config.eos_token_id = None
    model.base_model.model.generation_config.eos_token_id = None
    return model, time.perf_counter() - t0


def peer_generate(model, items, vocab: int, pad: int) -> tuple[list[list[int]], float, float]:
    """One left-padded mixed-adapter static batch, greedy, every row run to the
    batch's longest max_new_tokens: each request's own tokens, wall seconds and
    CPU seconds of the generate call."""
    prompts = [prompt_ids(it, vocab) for it in items]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    new = max(it.max_new_tokens for it in items)
    t, c = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            adapter_names=[it.adapter_id or "__base__" for it in items],
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=pad,
        )
    dt = time.perf_counter() - t
    cpu = time.process_time() - c
    gen = out[:, width:]
    if gen.shape[1] != new:
        raise RuntimeError(f"peer generated {gen.shape[1]} tokens, expected {new}")
    return [gen[i, : it.max_new_tokens].tolist() for i, it in enumerate(items)], dt, cpu


def run_peer(args, paths, trace, n: int) -> dict:
    """The trace in arrival order, in static batches of --peer-batch: a batch
    starts when its last request has arrived and the previous batch is done."""
    spec = load_spec(paths.model_dir)
    pad = spec.hf_config.pad_token_id if spec.hf_config is not None else 0
    pad = 0 if pad is None else pad
    model, load_s = load_peer(paths, n)
    peer_generate(model, trace[:2], spec.vocab_size, pad)  # warm-up
    clock, compute, cpu, outputs, batches = 0.0, 0.0, 0.0, {}, 0
    for b in range(0, len(trace), args.peer_batch):
        items = trace[b : b + args.peer_batch]
        start = max(clock, items[-1].arrival_s)
        outs, dt, batch_cpu = peer_generate(model, items, spec.vocab_size, pad)
        clock, compute, batches = start + dt, compute + dt, batches + 1
        cpu += batch_cpu
        for it, o in zip(items, outs, strict=True):
            outputs[it.index] = o
    tokens = sum(it.max_new_tokens for it in trace)
    return {
        "adapters": n,
        "batch": args.peer_batch,
        "batches": batches,
        "requests": len(trace),
        "tokens": tokens,
        "load_s": load_s,
        "compute_s": compute,
        "span_s": clock,
        "tok_s": tokens / clock,
        "compute_tok_s": tokens / compute,
        "cpu_s": cpu,
        "tok_per_cpu_s": tokens / cpu if cpu > 0 else 0.0,
        "cpu_share": cpu / (compute * CORES) if compute > 0 else 0.0,
        "outputs": outputs,
    }


def agreement(ours: dict, peer: dict) -> dict:
    """Requests whose greedy tokens match the peer's exactly, and the mean fraction
    of leading tokens that match (random-init weights have near ties, so a single
    float difference can fork a continuation)."""
    same, prefix = 0, []
    for idx, toks in ours.items():
        other = peer.get(idx)
        if other is None:
            continue
        same += toks == other
        k = next((i for i, (a, b) in enumerate(zip(toks, other, strict=False)) if a != b), None)
        prefix.append(1.0 if k is None else k / max(len(toks), 1))
    return {
        "identical": same,
        "compared": len(prefix),
        "mean_prefix": statistics.fmean(prefix) if prefix else None,
    }


# --------------------------------------------------------------------------- report


def print_table(result: dict) -> None:
    runs, peers = result["runs"], result["peer"]
    print_rows(runs, peers)
    print_notes(runs, peers)
    print("\nRatios")
    for k, v in result["ratios"].items():
        print(f"  {k:38s} {fmt(v, '.2f')}")
    print("\nTargets")
    for t in result["targets"]:
        print(f"  [{verdict(t['pass'])}] {t['name']}: {t['detail']}")


def print_rows(runs: list[dict], peers: dict) -> None:
    """One row per engine run and per peer run (or why the peer was skipped)."""
    print("\nTrace replay (tok/s: generated tokens of ok requests / wall span)")
    head = (
        f"{'system':>10s} {'adapters':>8s} {'tok/s':>8s} {'TTFT p50':>9s} {'p99':>8s} "
        f"{'ITL p50':>8s} {'p99':>7s} {'ok':>4s} {'fail':>4s} {'loads':>5s} {'evict':>5s} "
        f"{'preempt':>7s} {'batch':>5s} {'sched':>6s} {'tok/cpu-s':>9s} {'cpu':>4s}"
    )
    print_header(head)
    for r in runs:
        print(
            f"{'lorapool':>10s} {r['adapters']:8d} {r['tok_s']:8.1f} {fmt(r['ttft_ms_p50']):>9s} "
            f"{fmt(r['ttft_ms_p99']):>8s} {fmt(r['itl_ms_p50']):>8s} {fmt(r['itl_ms_p99']):>7s} "
            f"{r['ok']:4d} {r['failed']:4d} {r['adapter_loads']:5d} "
            f"{r['adapter_evictions']:5d} {r['preemptions']:7d} {r['mean_step_rows']:5.1f} "
            f"{r['sched_overhead']:6.1%} {r['tok_per_cpu_s']:9.1f} {r['cpu_share']:4.0%}"
        )
    for n, p in peers.items():
        if "skipped" in p:
            print(f"{'HF PEFT':>10s} {n:>8s} {'skipped: ' + p['skipped']}")
            continue
        print(
            f"{'HF PEFT':>10s} {p['adapters']:8d} {p['tok_s']:8.1f} {'-':>9s} {'-':>8s} "
            f"{'-':>8s} {'-':>7s} {p['requests']:4d} {0:4d} {'-':>5s} {'-':>5s} {'-':>7s} "
            f"{p['batch']:5d} {'-':>6s} {p['tok_per_cpu_s']:9.1f} {p['cpu_share']:4.0%}"
        )


def print_notes(runs: list[dict], peers: dict) -> None:
    """What the columns mean, cold and warm TTFT, and the peer's agreement."""
    print(
        "  TTFT/ITL in ms; TTFT from arrival (queueing included); batch = mean rows per "
        "engine step (peer: static batch); sched = scheduler share of loop time;\n"
        f"  tok/cpu-s = tokens per CPU-second of this process (all its threads); cpu = its "
        f"CPU-seconds / (wall seconds x {CORES} cores)"
    )
    for r in runs:
        print(
            f"  n={r['adapters']}: TTFT p50/p99 of the {r['cold_requests']} cold requests "
            f"(first of their adapter) {fmt(r['ttft_cold_ms_p50'], '.0f')}/"
            f"{fmt(r['ttft_cold_ms_p99'], '.0f')} ms, of the others "
            f"{fmt(r['ttft_warm_ms_p50'], '.0f')}/{fmt(r['ttft_warm_ms_p99'], '.0f')} ms; "
            f"step thread busy {r['step_busy']:.0%} of the span"
        )
    for n, p in peers.items():
        if "skipped" not in p:
            a = p["agreement"]
            print(
                f"  peer n={n}: load {p['load_s']:.1f}s (not counted), compute-only "
                f"{p['compute_tok_s']:.1f} tok/s, greedy outputs identical to ours for "
                f"{a['identical']}/{a['compared']} requests (mean matching prefix "
                f"{fmt(a['mean_prefix'], '.0%')})"
            )


def print_regions(r: dict) -> None:
    span = r["span_s"]
    print(
        f"\nWhere time goes, n={r['adapters']} ({r['steps']} steps over {span:.1f}s; "
        f"step thread {r['step_s']:.1f}s, loop-side scheduling {r['schedule_s']:.2f}s)"
    )
    print(f"  {'region':42s} {'seconds':>8s} {'calls':>7s} {'ms/call':>8s} {'of span':>7s}")
    for label, v in r["regions"].items():
        s, c = v["s"], v["calls"]
        print(f"  {label:42s} {s:8.2f} {c:7d} {1e3 * s / max(c, 1):8.2f} {s / span:7.1%}")


def evaluate(args, runs: dict, peers: dict) -> tuple[dict, list[dict]]:
    small = min(args.adapters)
    mid = 100 if 100 in runs else None
    ratios = {}
    p100 = peers.get(100)
    ratio_peer = None
    if mid and p100 and "tok_s" in p100:
        ratio_peer = runs[100]["tok_s"] / p100["tok_s"]
    ratios["ours/peer tok/s, n=100"] = ratio_peer
    if ratio_peer is not None:
        ratios["ours/peer tok per CPU-second, n=100"] = (
            runs[100]["tok_per_cpu_s"] / p100["tok_per_cpu_s"]
        )
    if small in peers and "tok_s" in peers[small] and small != 100:
        ratios[f"ours/peer tok/s, n={small}"] = runs[small]["tok_s"] / peers[small]["tok_s"]
    scale = None
    if mid and 1000 in runs:
        scale = runs[1000]["tok_s"] / runs[100]["tok_s"]
    ratios["ours n=1000 / ours n=100 tok/s"] = scale
    targets = [
        {
            "name": "n=100 throughput >= 6x HF PEFT",
            "pass": None if ratio_peer is None else ratio_peer >= 6.0,
            "detail": f"ratio {fmt(ratio_peer, '.2f')}",
        },
        {
            "name": "n=1000 (small pool) >= 80% of n=100, no failed request",
            "pass": None if scale is None else scale >= 0.8 and runs[1000]["failed"] == 0,
            "detail": (
                f"ratio {fmt(scale, '.2f')}, failed {runs[1000]['failed'] if 1000 in runs else '-'}"
            ),
        },
    ]
    worst = max(runs.values(), key=lambda r: r["sched_overhead"])
    targets.append(
        {
            "name": f"scheduler overhead < 10% of step time (batch {args.max_running})",
            "pass": worst["sched_overhead"] < 0.10,
            "detail": (
                f"worst run n={worst['adapters']}: {worst['sched_overhead']:.1%} "
                f"(mean batch {worst['mean_step_rows']:.1f}); "
                + ", ".join(f"n={n}: {r['sched_overhead']:.1%}" for n, r in runs.items())
            ),
        }
    )
    return ratios, targets


def size_memory(args, pages: list[dict], page_bytes: int) -> dict:
    """Pool and host cache of every run, sized from the largest fleet."""
    total_pages = sum(a["pages"] for a in pages)
    total_bytes = sum(a["packed_bytes"] for a in pages)
    max_len = args.prompt[1] + args.output[1]
    kv_pages = args.max_running * -(-max_len // 16)
    adapter_room = max(
        math.ceil(args.adapter_fraction * total_pages), 2 * max(a["pages"] for a in pages)
    )
    pool_pages = math.ceil((kv_pages + adapter_room) / (1 - 0.02))  # engine watermark 2%
    return {
        "pool_mib": (pool_pages + 0.5) * page_bytes / 2**20,
        "pool_pages": pool_pages,
        "page_bytes": page_bytes,
        "adapter_room_pages": adapter_room,
        "kv_pages": kv_pages,
        "host_cache_mib": args.host_fraction * total_bytes / 2**20,
        "fleet_pages": total_pages,
        "fleet_packed_bytes": total_bytes,
        "mean_adapter_pages": total_pages / len(pages),
    }


def print_setup(args, pages: list[dict], pages_s: float, memory: dict) -> None:
    total_pages, page_bytes = memory["fleet_pages"], memory["page_bytes"]
    mean_pages, adapter_room = memory["mean_adapter_pages"], memory["adapter_room_pages"]
    max_len = args.prompt[1] + args.output[1]
    print(
        f"adapters: {len(pages)} measured in {pages_s:.1f}s: {mean_pages:.1f} pages each on "
        f"average (min {min(a['pages'] for a in pages)}, max {max(a['pages'] for a in pages)}), "
        f"{total_pages} pages = {total_pages * page_bytes / 2**20:.0f} MiB in all"
    )
    print(
        f"pool: {memory['pool_pages']} pages of {page_bytes // 1024} KiB = "
        f"{memory['pool_mib']:.0f} MiB ({adapter_room} adapter pages = "
        f"{adapter_room / total_pages:.0%} of the fleet, about {adapter_room / mean_pages:.0f} "
        f"adapters; {memory['kv_pages']} KV pages for {args.max_running} x {max_len} tokens); "
        f"host cache {memory['host_cache_mib']:.0f} MiB "
        f"({args.host_fraction:.0%} of the fleet's packed bytes)"
    )
    print(
        f"trace: {args.requests} requests/run, {args.rps:g} req/s Poisson, zipf {args.zipf:g}, "
        f"prompt {args.prompt[0]}-{args.prompt[1]}, output {args.output[0]}-{args.output[1]} "
        f"(ignore_eos), seed {args.seed}; torch threads {torch.get_num_threads()}"
    )


def run_fleet(args, paths, n: int, memory: dict, runs: dict, peers: dict) -> None:
    """One fleet size: the engine run into runs[n]; the peer run (or why it was
    skipped, under str(n)) into peers."""
    trace = make_trace(
        args.requests,
        n,
        zipf=args.zipf,
        rps=args.rps,
        prompt_tokens=args.prompt,
        max_new_tokens=args.output,
        seed=args.seed,
    )
    t0 = time.perf_counter()
    pool_mib, host_mib = memory["pool_mib"], memory["host_cache_mib"]
    r = asyncio.run(run_engine(args, paths, trace, n, pool_mib, host_mib))
    print(
        f"engine n={n}: {r['tok_s']:.1f} tok/s, {r['ok']}/{r['requests']} ok, "
        f"{r['distinct_adapters']} distinct adapters, {r['adapter_loads']} loads, "
        f"{r['adapter_evictions']} evictions ({time.perf_counter() - t0:.0f}s)",
        flush=True,
    )
    runs[n] = r
    if args.no_peer:
        return
    if n > args.peer_max_adapters:
        peers[str(n)] = {"skipped": f"more than {args.peer_max_adapters} adapters"}
        return
    t0 = time.perf_counter()
    p = run_peer(args, paths, trace, n)
    p["agreement"] = agreement(r["outputs"], p["outputs"])
    peers[n] = p
    print(f"peer n={n}: {p['tok_s']:.1f} tok/s ({time.perf_counter() - t0:.0f}s)", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fleet = max(args.adapters)
    paths, demo_s = demo_for(fleet, args.cache_dir)
    print(f"demo: {paths.root} ({len(paths.adapter_dirs)} adapters, ready in {demo_s:.1f}s)")
    pages, page_bytes, pages_s = adapter_pages(paths, fleet, 16)
    spec = load_spec(paths.model_dir)
    memory = size_memory(args, pages, page_bytes)
    print_setup(args, pages, pages_s, memory)
    runs: dict[int, dict] = {}
    peers: dict = {}
    for n in args.adapters:
        run_fleet(args, paths, n, memory, runs, peers)
    peers_by_int = {k: v for k, v in peers.items() if isinstance(k, int)}
    ratios, targets = evaluate(args, runs, peers_by_int)
    result = {
        "config": args_json(args)
        | {"demo": str(paths.root)}
        | memory
        | {"torch_threads": torch.get_num_threads(), "vocab": spec.vocab_size},
        "runs": [{k: v for k, v in r.items() if k != "outputs"} for r in runs.values()],
        "peer": {
            str(k): {kk: vv for kk, vv in v.items() if kk != "outputs"} for k, v in peers.items()
        },
        "ratios": ratios,
        "targets": targets,
    }
    print_table(result)
    for r in runs.values():
        print_regions(r)
    print_json_line(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
