"""What both runs of bench_grpc.py share: the trace's parameters, the BenchConfig
that drives it, the engine settings (and the `lorapool serve` flags that rebuild
them), and the summary each run comes down to."""

from __future__ import annotations

from lorapool.client.bench import BenchConfig
from lorapool.client.report import BenchReport
from lorapool.client.trace import make_trace


def trace_kw(args) -> dict:
    return {
        "n_adapters": args.adapters,
        "zipf": args.zipf,
        "prompt_tokens": args.prompt,
        "max_new_tokens": args.output,
        "seed": args.seed,
    }


def trace_adapters(args) -> list[str]:
    """The adapters the trace asks for, in name order (the base model left out)."""
    ids = sorted({item.adapter_id for item in make_trace(args.requests, **trace_kw(args))})
    return [adapter_id for adapter_id in ids if adapter_id]


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
    from lorapool.server.engine.config import EngineConfig

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
