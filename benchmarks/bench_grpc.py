"""What gRPC costs: one trace through the engine in-process, then end to end
through `lorapool serve`, in the same run, on the bench demo model.

The trace is client/trace.py's (make_trace / iter_trace): power-law adapter
popularity over --adapters adapters, prompts of random token ids of a seeded
length, an exact number of new tokens per request (ignore_eos, greedy). Both runs
drive it closed loop with --concurrency workers taking requests from one shared
iterator, and measure alike (the engine side reuses lorapool bench's timed_call,
read_stream and BenchReport):

- engine: an Engine in this process, `engine.generate()` per request;
- end to end: `lorapool serve` in a subprocess with the same engine settings,
  driven by `lorapool bench`'s run_bench (AsyncLoraPoolClient, one Generate
  stream per request) from this process.

tokens/s is generated tokens over the wall span of the run; TTFT is send to
first token, ITL the gap between consecutive tokens of a request. Before each
run every adapter of the trace is loaded into host memory and a few base-model
requests warm the model up, so both runs start in the same state. The headline
is end-to-end tokens/s over engine tokens/s (target >= 90%).

CPU seconds (user + system) are counted too: the engine process for the engine
run, the server and client processes together for the end-to-end run. Tokens per
CPU second say what gRPC costs in work, whatever else the machine is doing; the
wall-clock ratio is the headline.

The last line of stdout is one JSON object with everything printed above it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

from common import (
    BENCH_DEMO,
    args_json,
    bench_demos,
    fmt,
    int_range,
    print_header,
    print_json_line,
    verdict,
)
from grpc_engine_run import engine_run
from grpc_server_run import server_run, start_server, stop_server
from grpc_workload import trace_kw

from lorapool.client.trace import make_trace

REPO = Path(__file__).resolve().parent.parent
TARGET_RATIO = 0.90


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=192, help="requests per run")
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop workers")
    p.add_argument("--adapters", type=int, default=32, help="adapters in the mix")
    p.add_argument("--zipf", type=float, default=1.0, help="popularity exponent (0 = uniform)")
    p.add_argument("--prompt", type=int_range, default=(16, 128), help="prompt tokens MIN:MAX")
    p.add_argument("--output", type=int_range, default=(16, 64), help="new tokens MIN:MAX")
    p.add_argument("--text", action="store_true", help="send word prompts instead of token ids")
    p.add_argument(
        "--rounds", type=int, default=None, help="engine/server pairs, alternating (default 2)"
    )
    p.add_argument("--pool-mib", type=float, default=512.0)
    p.add_argument("--host-cache-mib", type=float, default=1024.0)
    p.add_argument("--max-running", type=int, default=64)
    p.add_argument("--max-batch-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=REPO / ".cache")
    p.add_argument("--quick", action="store_true", help="small smoke-test run")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.concurrency, args.adapters = 24, 8, 4
        args.rounds = args.rounds or 1
        args.prompt, args.output = (8, 32), (4, 12)
        args.pool_mib = min(args.pool_mib, 128.0)
    args.rounds = 2 if args.rounds is None else args.rounds
    if args.requests < 1 or args.concurrency < 1 or args.adapters < 1 or args.rounds < 1:
        p.error("--requests, --concurrency, --adapters and --rounds must be >= 1")
    return args


def demo(args):
    """The bench demo with at least --adapters adapters: any bench demo already in
    the cache that has enough is reused; otherwise one is written."""
    from lorapool.demo import STAMP_VERSION, make_demo

    for folder, params in bench_demos(args.cache_dir, "*/demo.json"):
        if params.get("version") == STAMP_VERSION and params.get("n_adapters", 0) >= args.adapters:
            return make_demo(folder, n_adapters=params["n_adapters"], **BENCH_DEMO)
    root = args.cache_dir / f"bench-grpc-{args.adapters}"
    return make_demo(root, preset="bench", n_adapters=args.adapters, mix="bench")


def print_row(name: str, r: dict) -> None:
    t, i = r["ttft_ms"], r["itl_ms"]
    print(
        f"{name:>12s} {r['ok']:>4d}/{r['requests']:<4d} {r['tokens']:7d} {r['span_s']:7.2f} "
        f"{r['tok_s']:8.1f} {fmt(t['p50']):>8s} {fmt(t['p90']):>8s} {fmt(t['p99']):>8s} "
        f"{fmt(i['p50'], '.2f'):>7s} {fmt(i['p99'], '.2f'):>7s} {r['mean_batch']:6.1f} "
        f"{r['preemptions']:5d} {fmt(r['cpu_s']):>6s} {fmt(r['tok_per_cpu_s']):>7s}"
    )


def print_setup(args, paths, spec, trace, want_tokens: int, ready_s: float) -> None:
    import torch

    print(
        f"demo: {paths.root} ({len(paths.adapter_dirs)} adapters; {spec.num_layers} layers, "
        f"hidden {spec.hidden_size}, vocab {spec.vocab_size}; ready in {ready_s:.1f}s)"
    )
    print(
        f"trace: {args.requests} requests over {len({i.adapter_id for i in trace})} of "
        f"{args.adapters} adapters (zipf {args.zipf:g}), prompt {args.prompt[0]}-{args.prompt[1]} "
        f"{'words' if args.text else 'token ids'}, output {args.output[0]}-{args.output[1]} "
        f"(ignore_eos, greedy), {want_tokens} tokens; closed loop, {args.concurrency} workers; "
        f"seed {args.seed}"
    )
    print(
        f"engine: pool {args.pool_mib:g} MiB, max_running {args.max_running}, max_batch_tokens "
        f"{args.max_batch_tokens}; torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs"
    )


def run_rounds(args, paths, vocab: int) -> list[dict]:
    """--rounds pairs: the engine in this process, then `lorapool serve` end to end."""
    log_path = args.cache_dir / "bench-grpc-serve.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_bytes(b"")
    rounds: list[dict] = []
    for k in range(args.rounds):
        eng = asyncio.run(engine_run(args, paths, vocab))
        print(f"round {k + 1}: engine {eng['tok_s']:.1f} tok/s", end="", flush=True)
        proc, target = start_server(args, paths, log_path)
        try:
            e2e = asyncio.run(server_run(args, target, proc, vocab))
        finally:
            rc = stop_server(proc)
        print(f", end to end {e2e['tok_s']:.1f} tok/s (server exit {rc})", flush=True)
        rounds.append({"engine": eng, "grpc": e2e, "ratio": e2e["tok_s"] / eng["tok_s"]})
    return rounds


def print_rounds(args, rounds: list[dict]) -> None:
    print(
        "\nSame trace, in-process engine vs end to end over gRPC "
        "(TTFT from send, ITL between tokens, ms)"
    )
    head = (
        f"{'system':>12s} {'ok':>9s} {'tokens':>7s} {'span s':>7s} {'tok/s':>8s} "
        f"{'TTFT p50':>8s} {'p90':>8s} {'p99':>8s} {'ITL p50':>7s} {'p99':>7s} "
        f"{'batch':>6s} {'preem':>5s} {'CPU s':>6s} {'tok/CPUs':>7s}"
    )
    print_header(head)
    for k, r in enumerate(rounds):
        suffix = f" #{k + 1}" if args.rounds > 1 else ""
        print_row("engine" + suffix, r["engine"])
        print_row("gRPC e2e" + suffix, r["grpc"])


def judge(args, rounds: list[dict], want_tokens: int) -> dict:
    """The headline ratios (medians over rounds) and whether the target is met."""
    ratio = statistics.median([r["ratio"] for r in rounds])
    cpu_ratios = [
        r["grpc"]["tok_per_cpu_s"] / r["engine"]["tok_per_cpu_s"]
        for r in rounds
        if r["grpc"]["tok_per_cpu_s"] and r["engine"]["tok_per_cpu_s"]
    ]
    cpu_ratio = statistics.median(cpu_ratios) if cpu_ratios else None
    complete = all(
        r[s]["ok"] == args.requests and r[s]["tokens"] == want_tokens
        for r in rounds
        for s in ("engine", "grpc")
    )
    passed = None if args.quick else ratio >= TARGET_RATIO and complete
    return {"ratio": ratio, "cpu_ratio": cpu_ratio, "complete": complete, "pass": passed}


def print_verdict(args, verdicts: dict, want_tokens: int) -> None:
    print(
        f"\nend-to-end tok/s / engine tok/s: {verdicts['ratio']:.3f}"
        + (f" (median of {args.rounds} rounds)" if args.rounds > 1 else "")
    )
    print(
        f"tokens per CPU second, end to end (server + client processes) / engine: "
        f"{fmt(verdicts['cpu_ratio'], '.3f')}  (less sensitive to other load on the machine)"
    )
    print(
        f"[{verdict(verdicts['pass'])}] end to end >= {TARGET_RATIO:.0%} of the engine, every "
        f"request complete ({want_tokens} tokens each run: "
        f"{'yes' if verdicts['complete'] else 'NO'})"
        + ("; a --quick run is too short to judge" if args.quick else "")
    )


def main(argv=None) -> int:
    import torch

    from lorapool.server.model.checkpoint import load_spec

    args = parse_args(argv)
    t0 = time.perf_counter()
    paths = demo(args)
    spec = load_spec(paths.model_dir)
    vocab = spec.vocab_size
    trace = make_trace(args.requests, **trace_kw(args))
    want_tokens = sum(item.max_new_tokens for item in trace)
    print_setup(args, paths, spec, trace, want_tokens, time.perf_counter() - t0)
    rounds = run_rounds(args, paths, vocab)
    print_rounds(args, rounds)
    verdicts = judge(args, rounds, want_tokens)
    print_verdict(args, verdicts, want_tokens)
    result = {
        "config": args_json(args)
        | {
            "demo": str(paths.root),
            "vocab": vocab,
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "trace_tokens": want_tokens,
        },
        "rounds": rounds,
        "ratio": verdicts["ratio"],
        "cpu_ratio": verdicts["cpu_ratio"],
        "target": TARGET_RATIO,
        "complete": verdicts["complete"],
        "pass": verdicts["pass"],
    }
    print_json_line(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
