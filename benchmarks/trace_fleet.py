"""The fleet every bench_trace.py run shares: a bench demo with enough adapters
(any larger one is reused), each adapter's pages and packed bytes measured by
packing it exactly as the engine does (cached next to the demo), and the pool and
host cache sized from the largest fleet."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from common import BENCH_DEMO, bench_demos

from lorapool.memory.adapter_layout import pack_adapter
from lorapool.memory.peft_adapter import read_adapter
from lorapool.memory.pool import PageLayout
from lorapool.server.model.checkpoint import load_spec

DEMO_PREFIX = "bench-trace-"
PAGES_FILE = "bench-trace-pages.json"


def demo_for(n: int, cache: Path):
    """A bench demo with at least n adapters: reuse any larger one, else write one."""
    from lorapool.demo import make_demo

    best = None
    for folder, params in bench_demos(cache, f"{DEMO_PREFIX}*/demo.json"):
        if params.get("n_adapters", 0) >= n and (best is None or params["n_adapters"] < best[1]):
            best = (folder, params["n_adapters"])
    root, count = best or (cache / f"{DEMO_PREFIX}{n}", n)
    t0 = time.perf_counter()
    paths = make_demo(root, n_adapters=count, **BENCH_DEMO)
    return paths, time.perf_counter() - t0


def adapter_pages(paths, n: int, block_size: int) -> tuple[list[dict], int, float]:
    """Pages and packed bytes of the first n adapters, packed as the engine packs
    them (fp32 pool). Cached next to the demo."""
    spec = load_spec(paths.model_dir)
    layout = PageLayout(spec.num_layers, block_size, spec.num_kv_heads, spec.head_dim)
    page_elems = layout.page_elems
    cache_file = paths.root / PAGES_FILE
    cached: dict = {}
    if cache_file.is_file():
        try:
            cached = json.loads(cache_file.read_text())
        except ValueError:
            cached = {}
    if cached.get("page_elems") != page_elems:
        cached = {"page_elems": page_elems, "adapters": {}}
    rows = cached["adapters"]
    t0 = time.perf_counter()
    changed = False
    for d in paths.adapter_dirs[:n]:
        if d.name in rows:
            continue
        aw = read_adapter(d, spec)
        packed = pack_adapter(spec, aw, torch.float32, page_elems)
        rows[d.name] = {
            "rank": aw.rank,
            "modules": len(aw.target_modules),
            "pages": packed.num_pages(page_elems),
            "packed_bytes": packed.flat.numel() * 4,
        }
        changed = True
    if changed:
        cache_file.write_text(json.dumps(cached))
    out = [rows[d.name] | {"name": d.name} for d in paths.adapter_dirs[:n]]
    return out, page_elems * 4, time.perf_counter() - t0


def size_memory(args, pages: list[dict], page_bytes: int) -> dict:
    """Pool and host cache of every run, sized from the largest fleet."""
    total_pages = sum(a["pages"] for a in pages)
    total_bytes = sum(a["packed_bytes"] for a in pages)
    max_len = args.prompt[1] + args.output[1]
    kv_pages = args.max_running * -(-max_len // 16)
    adapter_room = max(
        math.ceil(args.adapter_fraction * total_pages), 2 * max(a["pages"] for a in pages)
    )
    pool_pages = math.ceil((kv_pages + adapter_room) / (1 - 0.02))  # engine watermark 2%
    return {
        "pool_mib": (pool_pages + 0.5) * page_bytes / 2**20,
        "pool_pages": pool_pages,
        "page_bytes": page_bytes,
        "adapter_room_pages": adapter_room,
        "kv_pages": kv_pages,
        "host_cache_mib": args.host_fraction * total_bytes / 2**20,
        "fleet_pages": total_pages,
        "fleet_packed_bytes": total_bytes,
        "mean_adapter_pages": total_pages / len(pages),
    }
