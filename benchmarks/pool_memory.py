"""How well adapters fill pool pages: per adapter, its raw LoRA bytes against the
page bytes it holds (alignment padding and the last page's tail are the loss),
and what fixed slots sized for the largest adapter would take instead."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from lorapool.memory.adapter_layout import PackedAdapter
from lorapool.memory.peft_adapter import AdapterWeights
from lorapool.memory.pool import PagePool

SHORT = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"}
SHORT |= {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def modules_label(modules: list[str]) -> str:
    return ",".join(short for m, short in SHORT.items() if m in modules)


def adapter_facts(
    folder: Path, aw: AdapterWeights, packed: PackedAdapter, pages: int, item: int
) -> dict[str, Any]:
    """What memory_report needs of one placed adapter (item: bytes per pool element)."""
    return {
        "name": folder.name,
        "rank": aw.rank,
        "modules": modules_label(aw.target_modules),
        "raw_bytes": sum(t.numel() * item for ab in aw.weights.values() for t in ab),
        "packed_elems": packed.flat.numel(),
        "pages": pages,
    }


def memory_report(pool: PagePool, adapters: list[dict]) -> dict:
    item = pool.tensor.element_size()
    rows = []
    for a in adapters:
        raw, packed, pages = a["raw_bytes"], a["packed_elems"] * item, a["pages"]
        held = pages * pool.page_bytes
        rows.append(
            {
                "name": a["name"],
                "rank": a["rank"],
                "modules": a["modules"],
                "raw_bytes": raw,
                "align_pad_bytes": packed - raw,
                "tail_bytes": held - packed,
                "pages": pages,
                "page_bytes_held": held,
                "efficiency": raw / held,
            }
        )
    eff = [r["efficiency"] for r in rows]
    held = sum(r["page_bytes_held"] for r in rows)
    return {
        "page_bytes": pool.page_bytes,
        "page_elems": pool.page_elems,
        "block_size": pool.layout.block_size,
        "kv_bytes_per_token": pool.layout.kv_bytes_per_token(pool.dtype),
        "dtype": str(pool.dtype).removeprefix("torch."),
        "adapters": rows,
        "summary": {
            "count": len(rows),
            "efficiency_min": min(eff) if eff else None,
            "efficiency_avg": statistics.fmean(eff) if eff else None,
            "efficiency_max": max(eff) if eff else None,
            "efficiency_total": sum(r["raw_bytes"] for r in rows) / held if held else None,
            "pages_total": sum(r["pages"] for r in rows),
            "raw_bytes_total": sum(r["raw_bytes"] for r in rows),
            "align_pad_bytes_total": sum(r["align_pad_bytes"] for r in rows),
            "tail_bytes_total": sum(r["tail_bytes"] for r in rows),
            # For comparison: fixed slots, each sized for the largest adapter here.
            "fixed_slot_pages": len(rows) * max((r["pages"] for r in rows), default=0),
        },
    }


def print_memory(mem: dict) -> None:
    s = mem["summary"]
    print(
        f"\nPool: page = {mem['page_bytes']} bytes ({mem['page_elems']} {mem['dtype']} elements) "
        f"= one KV block of {mem['block_size']} tokens; KV bytes/token = "
        f"{mem['kv_bytes_per_token']}"
    )
    if not mem["adapters"]:
        return
    # Adapters of the same rank and modules pack identically: one line per kind
    # (every adapter is in the JSON).
    kinds: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for a in mem["adapters"]:
        kinds[(a["rank"], a["modules"])].append(a)
    print(
        f"{'rank':>4s} {'modules':24s} {'count':>5s} {'raw bytes':>10s} {'pages':>5s} "
        f"{'held bytes':>10s} {'align pad':>9s} {'tail':>8s} {'eff':>6s}"
    )
    for (rank, mods), group in sorted(kinds.items(), key=lambda kv: kv[1][0]["raw_bytes"]):
        a = group[0]
        print(
            f"{rank:4d} {mods:24s} {len(group):5d} {a['raw_bytes']:10d} {a['pages']:5d} "
            f"{a['page_bytes_held']:10d} {a['align_pad_bytes']:9d} {a['tail_bytes']:8d} "
            f"{a['efficiency']:6.1%}"
        )
    print(
        f"efficiency (raw / pages held): min {s['efficiency_min']:.1%}  avg "
        f"{s['efficiency_avg']:.1%}  max {s['efficiency_max']:.1%}  overall "
        f"{s['efficiency_total']:.1%}  ({s['count']} adapters, {s['pages_total']} pages, "
        f"align padding {s['align_pad_bytes_total']} B, page tails {s['tail_bytes_total']} B)"
    )
    print(
        f"fixed slots sized for the largest adapter would take {s['fixed_slot_pages']} pages "
        f"({s['raw_bytes_total'] / (s['fixed_slot_pages'] * mem['page_bytes']):.1%} efficiency)"
    )
