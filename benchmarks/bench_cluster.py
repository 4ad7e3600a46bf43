"""One skewed trace through `lorapool serve-ray` with adapter-affinity routing, with
random routing, and through one `lorapool serve` with the same total CPU, in the
same run, on the bench demo model.

The trace is client/trace.py's: --adapters adapters (hundreds) with power-law
(zipf) popularity, prompts of random token ids, an exact number of new tokens per
request (ignore_eos, greedy), driven closed loop with --concurrency workers by
`lorapool bench`'s run_bench (one Generate stream per request). Each run starts a
fresh server in a subprocess (no adapter preloaded), sends a few base-model
requests to warm it up, then --warmup short requests (1-2 new tokens) with the
same adapter popularity and another seed, so that most adapters have been
placed where routing puts them (steady state: a first load, which every policy
pays once per adapter, would otherwise dominate a short trace over hundreds of
adapters), then the measured trace.

- serve: `lorapool serve` with OMP_NUM_THREADS = --replicas x --replica-cpus and
  the replicas' device pools together (--pool-mib x --replicas);
- affinity: `lorapool serve-ray --replicas N --replica-cpus C` (each replica's
  torch uses C threads: Ray sets OMP_NUM_THREADS from num_cpus);
- random: the same with `--routing random` (replicas chosen by load only).

Reported per run: adapter loads per request (device placements, from GetStats,
summed over replicas), tokens/s (generated tokens over the run's wall span), TTFT
and ITL p50/p99, the busiest replica's share of generated tokens, and after the
run the replicas holding each adapter the trace used (ListAdapters; mean).
Targets (on 2 replicas): affinity's loads per request <= 60% of random's; <= 1.3
replicas per adapter; affinity TTFT p50 within 50 ms of serve's; affinity tok/s
>= 80% of serve's. The pool is sized (--pool-mib) so that one replica's device
holds about half of the adapters and the fleet's about all of them: the case
scale-out is for (at scale: 64 replicas x 64 adapters for 1000 adapters).

The last line of stdout is one JSON object with everything printed above it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
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
    warm_requests,
)
from grpc_server_run import free_port
from grpc_workload import bench_config, engine_config, server_flags, trace_adapters

REPO = Path(__file__).resolve().parent.parent
LORAPOOL = str(Path(sys.executable).with_name("lorapool"))
RUNS = ("serve", "affinity", "random")
TARGETS = {"loads_ratio": 0.60, "replicas_per_adapter": 1.3, "ttft_p50_ms": 50.0, "tok_s": 0.80}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=400, help="requests per run")
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop workers")
    p.add_argument("--adapters", type=int, default=200, help="adapters in the mix")
    p.add_argument("--zipf", type=float, default=1.0, help="popularity exponent")
    p.add_argument("--prompt", type=int_range, default=(16, 64), help="prompt tokens MIN:MAX")
    p.add_argument("--output", type=int_range, default=(16, 32), help="new tokens MIN:MAX")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--replica-cpus", type=float, default=1.0)
    p.add_argument(
        "--pool-mib", type=float, default=256.0, help="device pool per replica (serve: x replicas)"
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="short trace requests before measuring (default 4 x --requests)",
    )
    p.add_argument("--host-cache-mib", type=float, default=1024.0)
    p.add_argument("--max-running", type=int, default=32)
    p.add_argument("--max-batch-tokens", type=int, default=512)
    p.add_argument("--runs", default=",".join(RUNS), help="which runs, comma-separated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=REPO / ".cache")
    p.add_argument("--quick", action="store_true", help="small smoke-test run")
    args = p.parse_args(argv)
    args.text = False  # bench_config: token-id prompts
    if args.quick:
        args.requests, args.concurrency, args.adapters = 48, 8, 24
        args.prompt, args.output = (8, 24), (4, 12)
    args.warmup = 4 * args.requests if args.warmup is None else args.warmup
    args.runs = [r for r in args.runs.split(",") if r]
    if set(args.runs) - set(RUNS):
        p.error(f"--runs: choose from {','.join(RUNS)}")
    return args


def demo(args):
    """A bench demo with at least --adapters adapters (reused when cached)."""
    from lorapool.demo import STAMP_VERSION, make_demo

    for folder, params in bench_demos(args.cache_dir, "*/demo.json"):
        if params.get("version") == STAMP_VERSION and params.get("n_adapters", 0) >= args.adapters:
            return make_demo(folder, n_adapters=params["n_adapters"], **BENCH_DEMO)
    root = args.cache_dir / f"bench-cluster-{args.adapters}"
    return make_demo(root, n_adapters=args.adapters, **BENCH_DEMO)


# -- one server ------------------------------------------------------------------------------


def start(run: str, args, paths, log_path: Path) -> tuple[subprocess.Popen, str]:
    """The run's server in a subprocess (its own process group); (process, target)."""
    port = free_port()
    config = engine_config(args, paths)
    if run == "serve":  # the same total memory as the replicas together
        config.pool_mib = args.pool_mib * args.replicas
    flags = server_flags(config)
    env = dict(os.environ)
    if run == "serve":
        threads = max(1, round(args.replicas * args.replica_cpus))
        env["OMP_NUM_THREADS"] = str(threads)
        cmd = [LORAPOOL, "serve", *flags, "--metrics-port", "0", "--grace", "5"]
    else:
        cmd = [
            LORAPOOL, "serve-ray", *flags, "--replicas", str(args.replicas),
            "--replica-cpus", str(args.replica_cpus), "--routing", run,
            "--host", "127.0.0.1", "--http-port", str(free_port()), "--grace", "5",
        ]  # fmt: skip
    cmd += ["--port", str(port), "--log-level", "WARNING"]
    with open(log_path, "ab") as log:
        log.write(f"\n== {run}: {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return proc, f"127.0.0.1:{port}"


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def wait_serving(
    target: str, proc: subprocess.Popen, replicas: int, timeout: float = 300.0
) -> float:
    """Seconds until Health says SERVING and GetStats lists `replicas` replicas
    (0 for plain serve)."""
    from lorapool.client import AsyncLoraPoolClient, LoraPoolClientError

    t0 = time.monotonic()
    async with AsyncLoraPoolClient(target, timeout=5, retries=0) as client:
        while time.monotonic() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} (see the log)")
            try:
                if await client.health(timeout=2) == "SERVING":
                    if replicas == 0 or len(await _replica_ids(target)) >= replicas:
                        return time.monotonic() - t0
            except LoraPoolClientError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError(f"not SERVING after {timeout:.0f}s")


async def _replica_ids(target: str) -> list[str]:
    import grpc

    from lorapool.v1 import lorapool_pb2 as pb
    from lorapool.v1 import lorapool_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.LoraPoolServiceStub(channel)
        stats = await stub.GetStats(pb.GetStatsRequest(), timeout=30)
    return [r.replica_id for r in stats.replicas]


async def fleet_view(stub):
    from lorapool.v1 import lorapool_pb2 as pb

    stats = await stub.GetStats(pb.GetStatsRequest(), timeout=60)
    listed = await stub.ListAdapters(pb.ListAdaptersRequest(), timeout=60)
    return stats, listed


def per_replica(stats) -> dict[str, tuple[int, int]]:
    """replica id -> (generated tokens, adapter loads); one entry for plain serve."""
    if not stats.replicas:
        return {"serve": (stats.generated_tokens, stats.adapter_loads)}
    return {r.replica_id: (r.stats.generated_tokens, r.stats.adapter_loads) for r in stats.replicas}


async def measure(run: str, args, target: str, vocab: int) -> dict:
    import grpc

    from lorapool.client import AsyncLoraPoolClient
    from lorapool.client.bench import run_bench_async
    from lorapool.v1 import lorapool_pb2_grpc as pb_grpc

    async with AsyncLoraPoolClient(target, timeout=600, retries=0) as client:
        for _ in range(2):
            await asyncio.gather(*(_drain(client.generate(**w)) for w in warm_requests(vocab)))
    if args.warmup:  # the same popularity, another seed, 1-2 new tokens: steady state first
        warm = bench_config(args, vocab)
        warm.total, warm.seed, warm.max_new_tokens = args.warmup, args.seed + 1, (1, 2)
        await run_bench_async(target, warm)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.LoraPoolServiceStub(channel)
        stats0, _ = await fleet_view(stub)
        report = await run_bench_async(target, bench_config(args, vocab))
        stats1, listed = await fleet_view(stub)
    before, after = per_replica(stats0), per_replica(stats1)
    tokens = {r: after[r][0] - before.get(r, (0, 0))[0] for r in after}
    loads = sum(after[r][1] - before.get(r, (0, 0))[1] for r in after)
    used = set(trace_adapters(args))
    holders = [len(a.replicas) for a in listed.adapters if a.adapter_id in used and a.replicas]
    return {
        "run": run,
        "requests": report.count,
        "ok": report.status_codes.get("OK", 0),
        "tokens": report.generated_tokens,
        "tok_s": report.tokens_per_second,
        "ttft_ms": {k: None if v is None else v * 1e3 for k, v in report.ttft.items()},
        "itl_ms": {k: None if v is None else v * 1e3 for k, v in report.itl.items()},
        "adapter_loads": loads,
        "loads_per_request": loads / max(report.count, 1),
        "replica_tokens": tokens,
        "busiest_share": max(tokens.values()) / max(sum(tokens.values()), 1),
        "replicas_per_adapter": sum(holders) / len(holders) if holders else None,
    }


async def _drain(stream) -> None:
    async for _ in stream:
        pass


def one_run(run: str, args, paths, vocab: int, log_path: Path) -> dict:
    proc, target = start(run, args, paths, log_path)
    try:
        replicas = 0 if run == "serve" else args.replicas
        ready_s = asyncio.run(wait_serving(target, proc, replicas))
        result = asyncio.run(measure(run, args, target, vocab))
        result["ready_s"] = ready_s
        return result
    finally:
        stop(proc)


# -- report ----------------------------------------------------------------------------------


def print_rows(results: dict[str, dict]) -> None:
    head = (
        f"{'run':<9} {'ok':>5} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} "
        f"{'ITL p99':>8} {'loads/req':>9} {'busiest':>8} {'repl/adapter':>12}"
    )
    print_header(head)
    for run, r in results.items():
        print(
            f"{run:<9} {r['ok']:>5} {r['tok_s']:>7.1f} {fmt(r['ttft_ms'].get('p50')):>9} "
            f"{fmt(r['ttft_ms'].get('p99')):>9} {fmt(r['itl_ms'].get('p50')):>8} "
            f"{fmt(r['itl_ms'].get('p99')):>8} {r['loads_per_request']:>9.3f} "
            f"{r['busiest_share']:>8.0%} {fmt(r['replicas_per_adapter'], '.2f'):>12}"
        )


def judge(results: dict[str, dict]) -> dict:
    aff, rnd, srv = (results.get(r) for r in RUNS[1:] + RUNS[:1])
    out: dict = {}
    if aff and rnd and rnd["loads_per_request"]:
        ratio = aff["loads_per_request"] / rnd["loads_per_request"]
        out["loads_ratio"] = (ratio, ratio <= TARGETS["loads_ratio"])
    if aff and aff["replicas_per_adapter"] is not None:
        value = aff["replicas_per_adapter"]
        out["replicas_per_adapter"] = (value, value <= TARGETS["replicas_per_adapter"])
    if aff and srv and aff["ttft_ms"].get("p50") is not None and srv["ttft_ms"].get("p50"):
        gap = aff["ttft_ms"]["p50"] - srv["ttft_ms"]["p50"]
        out["ttft_p50_ms"] = (gap, gap <= TARGETS["ttft_p50_ms"])
    if aff and srv and srv["tok_s"]:
        ratio = aff["tok_s"] / srv["tok_s"]
        out["tok_s"] = (ratio, ratio >= TARGETS["tok_s"])
    return out


def print_verdicts(verdicts: dict) -> None:
    lines = {
        "loads_ratio": "affinity loads/request over random's: {:.2f} (target <= 0.60)",
        "replicas_per_adapter": "replicas per adapter after the run: {:.2f} (target <= 1.3)",
        "ttft_p50_ms": "affinity TTFT p50 minus serve's: {:+.1f} ms (target <= 50 ms)",
        "tok_s": "affinity tok/s over serve's: {:.2f} (target >= 0.80)",
    }
    for key, (value, ok) in verdicts.items():
        print(f"{verdict(ok)}  {lines[key].format(value)}")


def main(argv=None) -> int:
    args = parse_args(argv)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    paths = demo(args)
    from lorapool.server.model.checkpoint import load_spec

    vocab = load_spec(paths.model_dir).vocab_size
    log_path = args.cache_dir / "bench-cluster.log"
    print(
        f"bench demo {paths.model_dir.parent.name}: {args.requests} requests, concurrency "
        f"{args.concurrency}, {args.adapters} adapters (zipf {args.zipf}, "
        f"{len(trace_adapters(args))} used), prompt {args.prompt}, output {args.output}; "
        f"{args.replicas} replicas x {args.replica_cpus:g} CPU vs one serve with "
        f"{args.replicas * args.replica_cpus:g} threads; pool {args.pool_mib:g} MiB per replica, "
        f"{args.pool_mib * args.replicas:g} MiB for serve "
        f"(logs: {log_path})"
    )
    results = {}
    started = time.perf_counter()
    for run in [r for r in RUNS if r in args.runs]:
        results[run] = one_run(run, args, paths, vocab, log_path)
        print(f"  {run}: ready in {results[run]['ready_s']:.0f}s", file=sys.stderr, flush=True)
    print_rows(results)
    verdicts = judge(results)
    print_verdicts(verdicts)
    elapsed = time.perf_counter() - started
    print(f"({elapsed:.0f} s)", file=sys.stderr)
    print_json_line(
        {
            "args": args_json(args),
            "results": results,
            "verdicts": {k: {"value": v, "met": ok} for k, (v, ok) in verdicts.items()},
            "seconds": elapsed,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
