"""Engine decode throughput against the dense-matmul limit, and pool memory use.

Drives ModelRunner directly (no scheduler, no event loop) on the bench demo model:
for every (batch, adapter count) it prefills each row with a random prompt, then
times decode steps. Adapters are assigned to rows round-robin, so 64 adapters in a
batch of 16 means 16 distinct ones.

Each row's pages (prompt + every decode token) are allocated before timing, so a
timed step is runner.step plus the scheduler's bookkeeping (append the sampled
token, advance num_computed); block allocation is not in it. Every repeat rewinds
the rows to the end of their prompt, so all repeats do the same work.

The limit is the same model's bare weight matmuls for that batch: x W^T for
every Linear in Model.dense_weights(), x of shape [batch, in], with the kernel
the engine uses (oneDNN-reordered weights on a CPU). Because the machine is
noisy, every configuration of one batch size (one runner each, so each keeps its
own LoRA plan) and the limit take turns step by step, E(0) L E(8) L E(64) L ...,
and each figure is the median of its step times. The "other load" column is the
share of this machine's CPU time that other processes used meanwhile; above ~10%
the figures are unreliable (neighbours outside the machine are not seen).

The last line of stdout is one JSON object with everything printed above it.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
from common import fmt, int_list, print_header, print_json_line
from cpu_time import OtherLoad
from engine_decode import DecodeBench
from engine_profile import print_profile, profile
from pool_memory import memory_report, print_memory

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DEMO = REPO / ".cache" / "bench-demo"
DEMO_ADAPTERS = 64

# (label, batch, adapters, key, threshold): what the project aims at.
TARGETS = [
    ("batch 64, 0 adapters: engine/limit >= 0.85", 64, 0, "ratio_limit", 0.85),
    ("batch 64, 64 adapters: engine/limit >= 0.70", 64, 64, "ratio_limit", 0.70),
    ("batch 64, 64 adapters: vs 0 adapters >= 0.70", 64, 64, "ratio_base", 0.70),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int_list, default=[1, 16, 64, 128], help="e.g. 1,16,64,128")
    p.add_argument("--adapters", type=int_list, default=[0, 8, 64], help="distinct adapter counts")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per repeat")
    p.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="passes over the timed steps; figures are medians of step times",
    )
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--demo-dir", type=Path, default=DEFAULT_DEMO)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small smoke-test run")
    p.add_argument(
        "--profile",
        metavar="BATCH:ADAPTERS",
        nargs="?",
        const="64:64",
        default=None,
        help="also break down where a decode step's time goes (default case 64:64)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.adapters = [1, 8], [0, 4]
        args.steps, args.repeats, args.prompt_len = 4, 2, 16
        if args.profile:
            args.profile = "8:4"
    if args.profile:
        b, a = args.profile.split(":")
        args.profile = (int(b), int(a))
    if min(args.batches) < 1 or min(args.adapters) < 0 or args.steps < 1 or args.repeats < 1:
        p.error("batches >= 1, adapters >= 0, steps >= 1 and repeats >= 1 are required")
    if max(args.adapters) > DEMO_ADAPTERS:
        p.error(f"the bench demo has {DEMO_ADAPTERS} adapters")
    return args


def load_demo(demo_dir: Path):
    from lorapool.demo import make_demo

    t0 = time.perf_counter()
    paths = make_demo(demo_dir, preset="bench", n_adapters=DEMO_ADAPTERS, mix="bench", seed=0)
    return paths, time.perf_counter() - t0


def print_table(results: list[dict]) -> None:
    head = (
        f"{'batch':>5s} {'adapters':>8s} {'distinct':>8s} {'engine tok/s':>12s} "
        f"{'limit tok/s':>12s} {'eng/limit':>9s} {'vs 0-ad':>7s} "
        f"{'eng ms/step':>11s} {'lim ms/step':>11s} {'IQR e/l':>11s} {'other load':>10s}"
    )
    print_header(head)
    for r in results:
        print(
            f"{r['batch']:5d} {r['adapters']:8d} {r['distinct']:8d} {r['engine_tok_s']:12.0f} "
            f"{r['limit_tok_s']:12.0f} {r['ratio_limit']:9.2f} {fmt(r['ratio_base'], '.2f'):>7s} "
            f"{r['engine_ms_step']:11.2f} {r['limit_ms_step']:11.2f} "
            f"{r['engine_iqr']:5.0%}/{r['limit_iqr']:<5.0%} {fmt(r['other_load'], '.0%'):>10s}"
        )


def evaluate_targets(results: list[dict]) -> list[dict]:
    out = []
    for label, batch, adapters, key, threshold in TARGETS:
        row = next((r for r in results if r["batch"] == batch and r["adapters"] == adapters), None)
        value = None if row is None else row[key]
        status = "n/a" if value is None else ("PASS" if value >= threshold else "FAIL")
        out.append({"target": label, "value": value, "threshold": threshold, "status": status})
    return out


def print_targets(targets: list[dict]) -> None:
    print("\nTargets:")
    for t in targets:
        print(f"  [{t['status']:4s}] {t['target']:48s} measured {fmt(t['value'], '.2f')}")


def print_setup(bench: DecodeBench, paths, demo_s: float) -> None:
    args, spec = bench.args, bench.spec
    print(
        f"bench_engine: {spec.arch}, hidden {spec.hidden_size}, intermediate "
        f"{spec.intermediate_size}, {spec.num_layers} layers, {spec.num_heads}/"
        f"{spec.num_kv_heads} heads, vocab {spec.vocab_size}, float32, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(
        f"prompt {args.prompt_len} tokens, {args.steps} decode steps x {args.repeats} "
        "repeats; median step times; pages allocated before timing; limit = x W^T "
        "over Model.dense_weights(); engine (every adapter count) and limit steps "
        "take turns one by one"
    )
    print(f"demo: {paths.root} (ready in {demo_s:.1f} s)\n")


def measure(bench: DecodeBench) -> list[dict]:
    """Every batch size and adapter count, with a progress line each on stderr."""
    results = []
    for batch in bench.args.batches:
        for r in bench.measure_batch(batch, bench.args.adapters):
            results.append(r)
            print(
                f"  measured batch {batch} adapters {r['adapters']}: {r['engine_tok_s']:.0f} tok/s",
                file=sys.stderr,
                flush=True,
            )
    return results


def print_total(elapsed: float, busy: dict | None) -> None:
    print(f"\ntotal {elapsed:.0f} s", end="")
    if busy is not None:
        print(
            f"; other processes used {busy['other']:.0%} of the machine's CPU time "
            f"(steal {busy['steal']:.0%})"
            + ("; above ~10% the figures are unreliable" if busy["other"] > 0.1 else ""),
            end="",
        )
    print()


def config_json(args, paths) -> dict:
    return {
        "batches": args.batches,
        "adapters": args.adapters,
        "steps": args.steps,
        "repeats": args.repeats,
        "prompt_len": args.prompt_len,
        "block_size": args.block_size,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "demo": str(paths.root),
        "timed": "runner.step + token bookkeeping; pages allocated before timing",
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    paths, demo_s = load_demo(args.demo_dir)
    t_start = time.perf_counter()
    load = OtherLoad()
    with torch.inference_mode():
        bench = DecodeBench(args, paths.model_dir, paths.adapter_dirs)
        print_setup(bench, paths, demo_s)
        results = measure(bench)
        print_table(results)
        targets = evaluate_targets(results)
        print_targets(targets)
        mem = memory_report(bench.pool, bench.adapter_info)
        print_memory(mem)
        prof = None
        if args.profile:
            batch, n = args.profile
            prof = profile(bench, batch, n)
            with contextlib.suppress(ZeroDivisionError):
                print_profile(prof)
    elapsed = time.perf_counter() - t_start
    busy = load.share()
    print_total(elapsed, busy)
    report = {
        "config": config_json(args, paths),
        "results": results,
        "targets": targets,
        "memory": mem,
        "profile": prof,
        "seconds": elapsed,
        "other_load": busy,
    }
    print_json_line(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
