"""The engine on a synthetic multi-adapter trace, against HF transformers + PEFT.

A seeded trace (client/trace.py's make_trace): adapter popularity follows a power
law (zipf 0.8 by default), arrivals are Poisson at --rps, prompts are random token
ids and every request asks for an exact number of new tokens (ignore_eos). The
trace is replayed through an in-process Engine (one asyncio task per request,
submitted at its arrival time; no gRPC) for each fleet size in --adapters, all on
the bench demo model (adapters adapter-000.. of one demo with the largest fleet).
Fleet size 0 is the same trace on the base model only: the server's own ceiling,
which the smallest adapter fleet is compared with (adapters nearly free means
that ratio near 1).

Memory is sized once, from the largest fleet, and shared by every run:
- pool = --adapter-fraction (3%) of the fleet's adapter pages, measured by packing
  every adapter exactly as the engine does, + KV room for --max-running sequences
  of the longest prompt + output, + the engine's 2% free-page watermark;
- host cache = --host-fraction (5%) of the fleet's packed bytes.
With 256 requests at zipf 0.8 the 1000-adapter trace touches about 150 adapters
(about 3000 pages, several times the pool's adapter room) and the 100-adapter
trace about 70, so both fleets load, evict and preempt all the time, the large
one more: the scale case compares the two at the same memory.

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
import sys
import time
from pathlib import Path

import torch
from common import args_json, int_list, int_range, print_json_line
from trace_engine import run_engine
from trace_fleet import adapter_pages, demo_for, size_memory
from trace_peer import agreement, run_peer
from trace_report import evaluate, print_regions, print_setup, print_table

from lorapool.client.trace import make_trace
from lorapool.server.engine.config import EngineConfig
from lorapool.server.model.checkpoint import load_spec

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=256, help="requests per fleet size")
    p.add_argument("--rps", type=float, default=None, help="Poisson arrival rate (req/s)")
    p.add_argument(
        "--adapters",
        type=int_list,
        default=[0, 32, 100, 1000],
        help="fleet sizes (0: the base model only)",
    )
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
        default=0.03,
        help="pool room for adapters, as a fraction of the largest fleet's pages",
    )
    p.add_argument(
        "--host-fraction",
        type=float,
        default=0.05,
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
        args.requests, args.adapters = 24, [0, 4, 16]
        args.prompt, args.output = (16, 48), (8, 24)
        args.max_running, args.peer_batch = 16, 8
        args.adapter_fraction = 0.4
        args.rps = args.rps or 40.0
    if args.rps is None:
        args.rps = 16.0
    if args.requests < 1 or min(args.adapters) < 0 or max(args.adapters) < 1 or args.rps <= 0:
        p.error("--requests >= 1, --adapters >= 0 (one of them >= 1) and --rps > 0 are required")
    if not 1 <= args.prompt[0] <= args.prompt[1] or not 1 <= args.output[0] <= args.output[1]:
        p.error("length ranges must satisfy 1 <= MIN <= MAX")
    return args


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
