"""docs/benchmarks.md and its plots, measured on this machine.

Four figures, each measured here by the command shown beside it:
1. decode tokens/s against distinct adapters in the batch: bench_engine.py in a
   subprocess (its JSON line), at --engine-batches over --engine-adapters;
2. lorapool against vLLM's CPU build and HF transformers / PEFT on one trace:
   bench_peers.py's JSON (run first when --peers is missing or --rerun-peers);
3. TTFT and ITL percentiles against offered load: `lorapool serve` through gRPC,
   open loop (Poisson arrivals) at each of --rps, on bench_peers' fleet;
4. pool page efficiency per adapter shape: every shape of bench_peers' fleet
   packed as the engine packs it (pool_memory.py's memory_report).

Everything measured goes to --data (.cache/bench/report.json) first; the
markdown and PNGs are drawn from that file alone, so `--from-data` redraws them
without measuring, and `--only engine,load` measures those parts again and keeps
the rest.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import int_list, machine

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
CACHE = REPO / ".cache"
PEER_LABELS = {"lorapool": "lorapool (gRPC)", "vllm": "vLLM CPU", "hf": "HF / PEFT"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=Path, default=REPO / "docs", help="where benchmarks.md goes")
    p.add_argument("--data", type=Path, default=CACHE / "bench" / "report.json")
    p.add_argument("--from-data", action="store_true", help="redraw from --data, measure nothing")
    p.add_argument("--peers", type=Path, default=CACHE / "bench" / "peers.json")
    p.add_argument(
        "--rerun-peers", action="store_true", help="run bench_peers.py even if --peers exists"
    )
    p.add_argument("--engine-batches", type=int_list, default=[16, 64])
    p.add_argument("--engine-adapters", type=int_list, default=[0, 1, 4, 16, 64])
    p.add_argument(
        "--rps", type=lambda s: [float(v) for v in s.split(",")], default=[2, 4, 6, 8, 12]
    )
    p.add_argument("--load-seconds", type=float, default=10.0, help="arrivals per load level")
    p.add_argument(
        "--only",
        type=lambda s: [v for v in s.split(",") if v],
        default=None,
        help="measure only these parts (engine,peers,load,pool), keep the rest from --data",
    )
    p.add_argument("--quick", action="store_true", help="small smoke-test run")
    args = p.parse_args(argv)
    unknown = set(args.only or ()) - set(PARTS)
    if unknown:
        p.error(f"unknown parts: {', '.join(sorted(unknown))}")
    return args


# -- measuring -------------------------------------------------------------------------------


def run_json(cmd: list[str]) -> dict:
    """Run a benchmark script; its last stdout line is its JSON."""
    print("$ " + " ".join(cmd), flush=True)
    out = subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_engine(args) -> dict:
    cmd = [
        "benchmarks/bench_engine.py",
        "--batches", ",".join(map(str, args.engine_batches)),
        "--adapters", ",".join(map(str, args.engine_adapters)),
    ]  # fmt: skip
    cmd += (
        ["--steps", "4", "--repeats", "2", "--prompt-len", "16"]
        if args.quick
        else ["--steps", "8", "--repeats", "3"]
    )
    data = run_json([sys.executable, *cmd])
    return {"command": "python " + " ".join(cmd), "data": data, "machine": machine()}


def measure_peers(args) -> dict:
    if args.rerun_peers or not args.peers.is_file():
        cmd = [sys.executable, "benchmarks/bench_peers.py", "--out", str(args.peers)]
        if args.quick:
            cmd.append("--quick")
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)
    data = json.loads(args.peers.read_text())
    cmd = "python benchmarks/bench_peers.py" + (" --quick" if data["config"]["quick"] else "")
    return {"command": cmd, "data": data, "machine": data["machine"]}


def measure_load(args) -> dict:
    """Open-loop runs at each rate against one server, on the peers' fleet."""
    from grpc_load import serve_and_measure, server_settings, trace_config
    from peer_workload import make_fleet

    from lorapool.server.model.checkpoint import load_spec

    n, prompt, output = 32, (8, 64), (8, 64)
    if args.quick:
        n, prompt, output = 8, (8, 24), (4, 12)
    model_dir, adapters_dir, adapters = make_fleet(CACHE / "bench-peers", n)
    vocab = load_spec(model_dir).vocab_size
    configs = {}
    for rps in args.rps:
        total = max(8, round(rps * args.load_seconds))
        configs[f"{rps:g} req/s"] = trace_config(
            f"load-{rps:g}", total, n, 1.0, prompt, output, 0, vocab, rps=rps
        )
    settings = server_settings(512.0, 128, 512)
    log = CACHE / "bench" / "report-serve.log"
    runs = serve_and_measure(model_dir, adapters_dir, list(adapters), vocab, settings, configs, log)
    levels = [
        {"rps": rps, "requests": configs[name].total} | runs[name]
        for rps, name in zip(args.rps, configs, strict=True)
    ]
    flags = " ".join(f"--{k} {v}" for k, v in settings.items()).replace("_", "-")
    return {
        "command": f"python benchmarks/report.py --rps {','.join(f'{r:g}' for r in args.rps)} "
        f"--load-seconds {args.load_seconds:g}",
        "setup": {
            "adapters": n,
            "prompt": prompt,
            "output": output,
            "zipf": 1.0,
            "server": f"lorapool serve {flags}",
        },
        "levels": levels,
        "machine": machine(),
    }


def measure_pool(args) -> dict:
    """Every adapter shape of the peers' fleet (ranks x target sets), packed as
    the engine packs it into pages of the bench model's pool."""
    import torch
    from peer_workload import RANKS, TARGETS, make_fleet
    from pool_memory import adapter_facts, memory_report

    from lorapool.memory.adapter_layout import pack_adapter
    from lorapool.memory.peft_adapter import read_adapter
    from lorapool.memory.pool import PageLayout, PagePool
    from lorapool.server.model.checkpoint import load_spec

    shapes = len(RANKS) * len(TARGETS)
    model_dir, _, adapters = make_fleet(CACHE / "bench-peers", max(shapes, 32))
    spec = load_spec(model_dir)
    layout = PageLayout(spec.num_layers, 16, spec.num_kv_heads, spec.head_dim)
    pool = PagePool(layout, 1, torch.float32, "cpu")
    facts = []
    for folder in list(adapters.values())[:shapes]:
        aw = read_adapter(folder, spec)
        packed = pack_adapter(spec, aw, torch.float32, pool.page_elems)
        pages = packed.num_pages(pool.page_elems)
        facts.append(adapter_facts(folder, aw, packed, pages, pool.tensor.element_size()))
    return {
        "command": "python benchmarks/report.py",
        "data": memory_report(pool, facts),
        "machine": machine(),
    }


PARTS = {
    "engine": measure_engine,
    "peers": measure_peers,
    "load": measure_load,
    "pool": measure_pool,
}


def collect(args) -> dict:
    """Measure the parts named by --only (all by default); the others are kept
    from --data."""
    data = json.loads(args.data.read_text()) if args.only and args.data.is_file() else {}
    missing = [p for p in PARTS if p not in data and p not in (args.only or PARTS)]
    if missing:
        raise SystemExit(f"{args.data} lacks {', '.join(missing)}: measure them too")
    for name, fn in PARTS.items():
        if args.only and name not in args.only:
            continue
        print(f"== {name}", flush=True)
        data[name] = fn(args)
    return data


# -- writing ---------------------------------------------------------------------------------


def machine_line(m: dict) -> str:
    return f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}"


def draw(data: dict, docs: Path) -> dict[str, str]:
    """The PNGs under docs/benchmarks/; returns name -> path relative to docs."""
    from report_plots import plot_adapters, plot_load, plot_peers, plot_pool

    folder = docs / "benchmarks"
    out = {
        "engine": plot_adapters(data["engine"]["data"], folder / "adapters.png"),
        "peers": plot_peers(data["peers"]["data"], PEER_LABELS, folder / "peers.png"),
        "load": plot_load(data["load"], folder / "load.png"),
        "pool": plot_pool(data["pool"]["data"], folder / "pool.png"),
    }
    return {k: str(v.relative_to(docs)) for k, v in out.items()}


def render(data: dict, images: dict[str, str]) -> str:
    """docs/benchmarks.md from the collected data and the plots' paths."""
    from report_text import engine_section, load_section, peers_section, pool_section

    parts = [
        "# Benchmarks",
        "",
        "Measured by `make bench-report` (benchmarks/report.py), which wrote this page and "
        "its plots. The machine is shared with other work (tests and benchmarks run on "
        "the same cores), so absolute figures move from run to run; systems compared in "
        "one table or plot ran back to back in one run, and their ratios are what to "
        "read. Every figure below says the command that measured it and the machine.",
        "",
        engine_section(data["engine"], images["engine"], machine_line),
        peers_section(data["peers"], images["peers"], machine_line),
        load_section(data["load"], images["load"], machine_line),
        pool_section(data["pool"], images["pool"], machine_line),
    ]
    return "\n".join(parts).rstrip() + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_data:
        data = json.loads(args.data.read_text())
    else:
        data = collect(args)
        args.data.parent.mkdir(parents=True, exist_ok=True)
        args.data.write_text(json.dumps(data, indent=1))
    images = draw(data, args.docs)
    page = args.docs / "benchmarks.md"
    page.write_text(render(data, images))
    print(f"wrote {page} and {', '.join(images.values())} (data: {args.data})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
