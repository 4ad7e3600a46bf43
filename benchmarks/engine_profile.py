"""Where a decode step's time goes, for bench_engine.py --profile: region timers
around the runner's parts (fastest of three passes), the LoRA plan's build time,
and op self time by region from one pass under torch.profiler."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch
from common import RegionTimer, fmt
from cpu_time import OtherLoad
from engine_decode import DecodeBench

from lorapool.server.engine import runner as runner_mod
from lorapool.server.engine.runner import ModelRunner
from lorapool.server.model.attention import PagedAttention
from lorapool.server.model.linear import Linear
from lorapool.server.model.lora import LoraBatch
from lorapool.server.model.model import Model

REGIONS = [
    (ModelRunner, "step", "step"),
    (PagedAttention, "build_meta", "attention metadata (build_meta)"),
    (ModelRunner, "_lora_batch", "LoRA plan lookup/build"),
    (Model, "forward", "forward"),
    (Linear, "__call__", "dense matmuls (Linear)"),
    (LoraBatch, "apply", "LoRA apply"),
    (PagedAttention, "__call__", "decode + prefill attention"),
    (PagedAttention, "write", "KV write"),
    (runner_mod, "sample", "sampling"),
]


def plan_build_seconds(bench: DecodeBench, rows, batch: int) -> list[float]:
    """LoRA plan construction only happens when the batch's composition changes;
    time it directly since unchanged decode steps reuse it."""
    segments = [(i, 1, a) for i, (_, a) in enumerate(rows)]
    build = []
    for _ in range(5):
        t0 = time.perf_counter()
        LoraBatch(bench.pool, bench.spec, segments, batch)
        build.append(time.perf_counter() - t0)
    return build


def timed_passes(bench: DecodeBench, rows, steps: int):
    """Decode with REGIONS timed: (wall ms/step, region ms/step) of the fastest of
    three passes (interference only ever adds time), then one pass under
    torch.profiler."""
    timer = RegionTimer()
    timer.wrap_all(REGIONS)
    try:
        bench.decode(rows)
        passes = []
        for _ in range(3):
            timer.clear()
            wall = bench.decode(rows) / steps
            passes.append((wall, {k: 1e3 * v / steps for k, v in timer.total.items()}))
        wall, regions = min(passes, key=lambda p: p[0])
        timer.record_for_profiler()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            bench.decode(rows)
    finally:
        timer.restore()
    return wall, regions, prof


def ops_by_region(prof, steps: int) -> list[dict]:
    """Op self time grouped by the innermost named region each op ran in."""
    labels = {label for _, _, label in REGIONS}
    by_region: dict[tuple[str, str], float] = defaultdict(float)
    for evt in prof.events():
        if evt.name in labels or evt.device_type != torch.autograd.DeviceType.CPU:
            continue
        parent, region = evt.cpu_parent, "(outside regions)"
        while parent is not None:
            if parent.name in labels:
                region = parent.name
                break
            parent = parent.cpu_parent
        by_region[(region, evt.name)] += evt.self_cpu_time_total / 1e3 / steps
    return sorted(
        ({"region": r, "op": o, "ms_step": v} for (r, o), v in by_region.items()),
        key=lambda d: -d["ms_step"],
    )


def profile(bench: DecodeBench, batch: int, n_adapters: int) -> dict:
    steps = bench.args.steps
    load = OtherLoad()
    rows = bench.make_rows(batch, n_adapters)
    bench.decode(rows)
    build = plan_build_seconds(bench, rows, batch)
    plain = min(bench.decode(rows) for _ in range(3)) / steps
    wall, regions, prof = timed_passes(bench, rows, steps)
    bench.free(rows)
    busy = load.share()
    ops = ops_by_region(prof, steps)
    return {
        "batch": batch,
        "adapters": n_adapters,
        "steps": steps,
        "ms_step_unpatched": 1e3 * plain,
        "ms_step_timed": 1e3 * wall,
        "regions_ms_step": regions,
        "lora_plan_build_ms": 1e3 * statistics.median(build),
        "top_ops": ops[:25],
        "other_load": None if busy is None else busy["other"],
    }


def print_profile(p: dict) -> None:
    r = p["regions_ms_step"]
    get = r.get
    step = get("step", 0.0)
    fwd = get("forward", 0.0)
    inner = ["dense matmuls (Linear)", "LoRA apply"]
    inner += ["decode + prefill attention", "KV write"]
    outer = ["attention metadata (build_meta)", "LoRA plan lookup/build", "sampling"]
    print(
        f"\nProfile: batch {p['batch']}, {p['adapters']} adapters, {p['steps']} decode steps "
        f"(best of 3 passes: {p['ms_step_unpatched']:.1f} ms/step unpatched, "
        f"{p['ms_step_timed']:.1f} with region timers; "
        f"other load {fmt(p['other_load'], '.0%')})"
    )
    print(f"  {'region':44s} {'ms/step':>8s} {'share':>6s}")
    for label in inner:
        print(f"  {label:44s} {get(label, 0.0):8.2f} {get(label, 0.0) / step:6.1%}")
    rest = fwd - sum(get(k, 0.0) for k in inner)
    print(f"  {'rest of forward (norms, rope, silu, ...)':44s} {rest:8.2f} {rest / step:6.1%}")
    for label in outer:
        print(f"  {label:44s} {get(label, 0.0):8.2f} {get(label, 0.0) / step:6.1%}")
    other = step - fwd - sum(get(k, 0.0) for k in outer)
    print(f"  {'runner Python (inputs, sort, tensors)':44s} {other:8.2f} {other / step:6.1%}")
    print(f"  {'step total':44s} {step:8.2f}")
    print(
        f"  LoRA plan construction when the batch changes: {p['lora_plan_build_ms']:.1f} ms "
        "(reused across unchanged decode steps)"
    )
    print("  top ops by self CPU time (torch.profiler, inflated by its overhead):")
    for op in p["top_ops"][:15]:
        print(f"    {op['ms_step']:7.2f} ms  {op['op']:36s} in {op['region']}")
