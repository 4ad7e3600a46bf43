"""What every system of bench_peers.py is given: one fleet of adapters on the
bench model, and one seeded trace in two forms (with adapters, base model only).

The fleet is S-LoRA's kind of mix: ranks 8, 16, 32 and 64 crossed with three
target sets (q,v; the four attention projections; all seven linear layers),
cycled with co-prime periods so the first twelve adapters hold every pairing.
The trace is client/trace.py's: power-law popularity over the fleet, seeded
prompt and output lengths, every request asking for an exact number of new
tokens. The base-only form is the same trace with every adapter dropped
(base_fraction 1 draws the same random numbers), so both forms do the same
token work."""

from __future__ import annotations

import json
from pathlib import Path

from lorapool.client.trace import TraceItem, make_trace, prompt_ids
from lorapool.demo.presets import ALL_MODULES, ATTN_MODULES

RANKS = (8, 16, 32, 64)
TARGETS = (("q_proj", "v_proj"), ATTN_MODULES, ALL_MODULES)
FLEET_STAMP = "fleet.json"


def fleet_specs(n: int) -> list[dict]:
    """Rank, alpha and targets of adapters adapter-000 .. adapter-(n-1)."""
    return [
        {
            "name": f"adapter-{i:03d}",
            "rank": RANKS[i % len(RANKS)],
            "alpha": 2 * RANKS[i % len(RANKS)],
            "targets": list(TARGETS[i % len(TARGETS)]),
            "seed": i + 1,
        }
        for i in range(n)
    ]


def make_fleet(root: Path, n: int) -> tuple[Path, Path, dict[str, Path]]:
    """The bench model (lorapool's demo, `bench` preset) and n adapters of
    fleet_specs under root, written once and reused while the stamp matches:
    (model folder, adapters folder, adapter name -> folder)."""
    from lorapool.demo import make_demo
    from lorapool.demo.adapters import adapter_complete, write_adapter

    demo = make_demo(root / "demo", preset="bench", n_adapters=0, mix="bench", seed=0)
    adapters_dir = root / "adapters"
    adapters_dir.mkdir(parents=True, exist_ok=True)
    stamp = adapters_dir / FLEET_STAMP
    specs = fleet_specs(n)
    try:
        written = {s["name"]: s for s in json.loads(stamp.read_text())}
    except (OSError, ValueError):
        written = {}
    for s in specs:
        folder = adapters_dir / s["name"]
        if written.get(s["name"]) != s or not adapter_complete(folder):
            write_adapter(
                demo.model_dir, folder, s["rank"], s["alpha"], s["targets"], seed=s["seed"]
            )
            written[s["name"]] = s
    stamp.write_text(json.dumps(sorted(written.values(), key=lambda s: s["name"]), indent=1))
    return demo.model_dir, adapters_dir, {s["name"]: adapters_dir / s["name"] for s in specs}


def peer_trace(
    requests: int,
    adapters: int,
    zipf: float,
    prompt: tuple[int, int],
    output: tuple[int, int],
    seed: int,
    base: bool = False,
) -> list[TraceItem]:
    """The trace all systems replay; `base` drops every adapter, nothing else."""
    return make_trace(
        requests,
        adapters,
        zipf,
        None,
        prompt,
        output,
        seed,
        base_fraction=1.0 if base else 0.0,
    )


def trace_facts(trace: list[TraceItem]) -> dict:
    """Token counts and adapter spread of a trace, for the table's caption."""
    used = [it.adapter_id for it in trace if it.adapter_id]
    return {
        "requests": len(trace),
        "prompt_tokens": sum(it.prompt_tokens for it in trace),
        "generated_tokens": sum(it.max_new_tokens for it in trace),
        "distinct_adapters": len(set(used)),
        "top_adapter_share": max(used.count(a) for a in set(used)) / len(used) if used else 0.0,
    }


def job_requests(trace: list[TraceItem], vocab: int) -> list[dict]:
    """The trace as plain JSON for a peer in another environment."""
    return [
        {
            "prompt_ids": prompt_ids(it, vocab),
            "adapter": it.adapter_id,
            "max_new_tokens": it.max_new_tokens,
        }
        for it in trace
    ]
