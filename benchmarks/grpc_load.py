"""`lorapool serve` driven through gRPC by `lorapool bench`'s run_bench, several
workloads against one server: the closed-loop trace runs of bench_peers.py and
the open-loop offered-load sweep of report.py.

One server (grpc_server_run's start_server, the same subprocess bench_grpc.py
uses) serves every workload in turn: every adapter is loaded (into host memory)
and a few base-model requests warm the model before the first, so no workload
pays for a cold start. Each workload is measured as `lorapool bench` measures it
(BenchReport: tokens/s over the wall span, TTFT from send, ITL between tokens),
with the server's and this process's CPU seconds and the server's step counts
around it (grpc_workload.summary)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

from common import warm_requests
from cpu_time import proc_cpu_s, self_cpu_s
from grpc_server_run import start_server, stop_server, wait_serving
from grpc_workload import summary

from lorapool.client.bench import BenchConfig, run_bench_async


def server_settings(
    pool_mib: float, max_running: int, max_batch_tokens: int, host_cache_mib: float = 1024.0
) -> dict:
    """The engine settings start_server turns into `lorapool serve` flags."""
    return {
        "pool_mib": pool_mib,
        "host_cache_mib": host_cache_mib,
        "max_running": max_running,
        "max_batch_tokens": max_batch_tokens,
    }


async def _measure(client, target: str, pid: int, config: BenchConfig) -> dict:
    stats0 = await client.stats()
    cpu0, server0 = self_cpu_s(), proc_cpu_s(pid)
    report = await run_bench_async(target, config)
    cpu, server1 = self_cpu_s() - cpu0, proc_cpu_s(pid)
    stats1 = await client.stats()
    both = None if server0 is None or server1 is None else cpu + server1 - server0
    out = summary(report, stats0, stats1, both)
    out["config"] = {"concurrency": config.concurrency, "rps": config.rps}
    return out


async def _drive(target: str, proc, adapters: list[str], vocab: int, configs: dict) -> dict:
    from lorapool.client import AsyncLoraPoolClient

    async with AsyncLoraPoolClient(target, timeout=600, retries=0) as client:
        await wait_serving(client, proc)
        for adapter_id in adapters:
            await client.load_adapter(adapter_id)

        async def warm(kwargs: dict) -> None:
            async for _ in client.generate(**kwargs):
                pass

        await asyncio.gather(*(warm(w) for w in warm_requests(vocab)))
        results = {}
        for name, config in configs.items():
            results[name] = await _measure(client, target, proc.pid, config)
            print(f"  lorapool {name}: {results[name]['tok_s']:.1f} tok/s", flush=True)
        return results


def serve_and_measure(
    model_dir: Path,
    adapters_dir: Path,
    adapters: list[str],
    vocab: int,
    settings: dict,
    configs: dict[str, BenchConfig],
    log_path: Path,
) -> dict:
    """Every workload of `configs` (name -> BenchConfig), in order, against one
    `lorapool serve`; returns name -> summary. The server is stopped after."""
    requests = max(c.total or 0 for c in configs.values())
    args = SimpleNamespace(requests=requests, **settings)
    paths = SimpleNamespace(model_dir=model_dir, adapters_dir=adapters_dir)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc, target = start_server(args, paths, log_path)
    try:
        return asyncio.run(_drive(target, proc, adapters, vocab, configs))
    finally:
        stop_server(proc)


def trace_config(
    name: str,
    requests: int,
    adapters: int,
    zipf: float,
    prompt: tuple[int, int],
    output: tuple[int, int],
    seed: int,
    vocab: int,
    *,
    base: bool = False,
    concurrency: int | None = None,
    rps: float | None = None,
) -> BenchConfig:
    """The BenchConfig that sends peer_workload.peer_trace's requests: closed loop
    with `concurrency` streams, or open loop at `rps` (Poisson arrivals)."""
    return BenchConfig(
        call="generate",
        total=requests,
        concurrency=concurrency,
        rps=rps,
        adapters=adapters,
        zipf=zipf,
        base_fraction=1.0 if base else 0.0,
        prompt_tokens=prompt,
        max_new_tokens=output,
        input_ids=True,
        vocab_size=vocab,
        ignore_eos=True,
        temperature=0.0,
        seed=seed,
        timeout=600.0,
        details=False,
        name=name,
    )
