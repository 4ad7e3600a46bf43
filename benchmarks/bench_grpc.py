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
import functools
import os
import resource
import signal
import socket
import statistics
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
    warm_engine,
    warm_requests,
)

from lorapool.client.bench import BenchConfig, read_stream, run_bench_async, timed_call
from lorapool.client.report import BenchReport
from lorapool.client.stats import CallResult
from lorapool.client.trace import iter_trace, make_trace, prompt_ids, prompt_text
from lorapool.types import GenerationRequest, SamplingParams

REPO = Path(__file__).resolve().parent.parent
LORAPOOL = str(Path(sys.executable).with_name("lorapool"))
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


def bench_config(args, vocab: int) -> BenchConfig:
    return BenchConfig(
        call="generate",
        total=args.requests,
        concurrency=args.concurrency,
        adapters=args.adapters,
        zipf=args.zipf,
        prompt_tokens=args.prompt,
        max_new_tokens=args.output,
        input_ids=not args.text,
        vocab_size=vocab,
        ignore_eos=True,
        temperature=0.0,
        seed=args.seed,
        timeout=600.0,
        details=False,
        name="bench-grpc",
    )


def engine_config(args, paths):
    from lorapool.server.engine.engine import EngineConfig

    return EngineConfig(
        model_dir=str(paths.model_dir),
        adapter_dirs=[str(paths.adapters_dir)],
        pool_mib=args.pool_mib,
        host_cache_mib=args.host_cache_mib,
        max_running=args.max_running,
        max_batch_tokens=args.max_batch_tokens,
        max_waiting=max(1024, args.requests + 16),
    )


def server_flags(cfg) -> list[str]:
    """`lorapool serve` flags that rebuild this EngineConfig."""
    return [
        "--model", cfg.model_dir, "--adapters", cfg.adapter_dirs[0],
        "--pool-mib", str(cfg.pool_mib), "--host-cache-mib", str(cfg.host_cache_mib),
        "--max-running", str(cfg.max_running), "--max-batch-tokens", str(cfg.max_batch_tokens),
        "--max-waiting", str(cfg.max_waiting), "--block-size", str(cfg.block_size),
        "--dtype", cfg.dtype, "--device", cfg.device,
    ]  # fmt: skip


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of another process (Linux /proc), None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(report: BenchReport, stats0, stats1, cpu_s: float | None) -> dict:
    steps = stats1.steps - stats0.steps
    tokens = stats1.generated_tokens - stats0.generated_tokens
    return {
        "requests": report.count,
        "ok": report.status_codes.get("OK", 0),
        "errors": report.errors,
        "tokens": report.generated_tokens,
        "span_s": report.total_s,
        "tok_s": report.tokens_per_second,
        "ttft_ms": {k: None if v is None else v * 1e3 for k, v in report.ttft.items()},
        "itl_ms": {k: None if v is None else v * 1e3 for k, v in report.itl.items()},
        "latency_ms_p50": dict(report.latency_distribution).get(50, 0.0) * 1e3,
        "steps": steps,
        "mean_batch": tokens / steps if steps else 0.0,
        "preemptions": stats1.preemptions - stats0.preemptions,
        "adapter_loads": stats1.adapter_loads - stats0.adapter_loads,
        "cpu_s": cpu_s,
        "tok_per_cpu_s": report.generated_tokens / cpu_s if cpu_s else None,
    }


# --------------------------------------------------------------------------- engine only


def trace_adapters(args) -> list[str]:
    """The adapters the trace asks for, in name order (the base model left out)."""
    ids = sorted({item.adapter_id for item in make_trace(args.requests, **_trace_kw(args))})
    return [adapter_id for adapter_id in ids if adapter_id]


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
    items = iter_trace(**_trace_kw(args))
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


def _trace_kw(args) -> dict:
    return {
        "n_adapters": args.adapters,
        "zipf": args.zipf,
        "prompt_tokens": args.prompt,
        "max_new_tokens": args.output,
        "seed": args.seed,
    }


# --------------------------------------------------------------------------- end to end


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, paths, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        LORAPOOL, "serve", *server_flags(engine_config(args, paths)),
        "--port", str(port), "--metrics-port", "0", "--grace", "5", "--log-level", "WARNING",
    ]  # fmt: skip
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"127.0.0.1:{port}"


async def wait_serving(client, proc, timeout: float = 300.0) -> None:
    from lorapool.client import LoraPoolClientError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lorapool serve exited with {proc.returncode}")
        try:
            if await client.health(timeout=2) == "SERVING":
                return
        except LoraPoolClientError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"lorapool serve not SERVING after {timeout:.0f}s")


async def server_run(args, target: str, proc, vocab: int) -> dict:
    from lorapool.client import AsyncLoraPoolClient

    async with AsyncLoraPoolClient(target, timeout=600, retries=0) as client:
        await wait_serving(client, proc)
        for adapter_id in trace_adapters(args):
            await client.load_adapter(adapter_id)

        async def warm(kwargs: dict) -> None:
            async for _ in client.generate(**kwargs):
                pass

        await asyncio.gather(*(warm(w) for w in warm_requests(vocab)))
        stats0 = await client.stats()
        cpu0, server0 = self_cpu_s(), proc_cpu_s(proc.pid)
        report = await run_bench_async(target, bench_config(args, vocab))
        cpu, server1 = self_cpu_s() - cpu0, proc_cpu_s(proc.pid)
        stats1 = await client.stats()
    both = None if server0 is None or server1 is None else cpu + server1 - server0
    return summary(report, stats0, stats1, both)


def stop_server(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return -9
    return proc.returncode


# --------------------------------------------------------------------------- report


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
    trace = make_trace(args.requests, **_trace_kw(args))
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
