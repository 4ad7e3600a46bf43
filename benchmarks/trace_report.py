"""What bench_trace.py prints: the set-up, one row per engine and peer run, the
notes under them, where the engine's time went, and the ratios and targets
judged from the runs."""

from __future__ import annotations

import torch
from common import fmt, print_header, verdict
from cpu_time import CORES


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
    small = min(n for n in args.adapters if n > 0)
    mid = 100 if 100 in runs else None
    ratios = {}
    base = None
    if 0 in runs and runs[0]["tok_s"] > 0:
        base = runs[small]["tok_s"] / runs[0]["tok_s"]
    ratios[f"ours n={small} / ours base only tok/s"] = base
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
            "name": f"n={small} adapters >= 0.80x base-only throughput",
            "pass": None if base is None else base >= 0.80 and runs[small]["failed"] == 0,
            "detail": f"ratio {fmt(base, '.2f')}",
        },
        {
            "name": "n=100 throughput >= 6x HF PEFT",
            "pass": None if ratio_peer is None else ratio_peer >= 6.0,
            "detail": f"ratio {fmt(ratio_peer, '.2f')}",
        },
        {
            "name": "n=1000 >= 0.9x n=100 at the same memory, no failed request",
            "pass": None if scale is None else scale >= 0.9 and runs[1000]["failed"] == 0,
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
