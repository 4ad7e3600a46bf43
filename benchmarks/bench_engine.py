"""Engine decode throughput against the dense-matmul limit, and pool memory use.

Drives ModelRunner directly (no scheduler, no event loop) on the bench demo model:
for every (batch, adapter count) it prefills each row with a random prompt, then
times decode steps. Adapters are assigned to rows round-robin, so 64 adapters in a
batch of 16 means 16 distinct ones.

Each row's pages (prompt + every decode token) are allocated before timing, so a
timed step is runner.step plus the scheduler's bookkeeping (append the sampled
token, advance num_computed); block allocation is not in it. Every repeat rewinds
the rows to the end of their prompt, so all repeats do the same work.

The limit is the same model's bare weight matmuls for that batch: x @ W.T for
every W in Model.dense_weights(), x of shape [batch, in]. Because the machine is
noisy, every configuration of one batch size (one runner each, so each keeps its
own LoRA plan) and the limit take turns step by step, E(0) L E(8) L E(64) L ...,
and each figure is the median of its step times. The "other load" column is the
share of this machine's CPU time that other processes used meanwhile; above ~10%
the figures are unreliable (neighbours outside the machine are not seen).

The last line of stdout is one JSON object with everything printed above it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from common import RegionTimer, fmt, int_list, print_header, print_json_line

from lorapool.memory.adapter_layout import pack_adapter, place_adapter
from lorapool.memory.block_manager import BlockManager
from lorapool.memory.peft_adapter import read_adapter
from lorapool.memory.pool import PageLayout, PagePool
from lorapool.server.engine import runner as runner_mod
from lorapool.server.engine.runner import ModelRunner, ScheduledSeq
from lorapool.server.engine.sequence import Sequence
from lorapool.server.model.attention import PagedAttention
from lorapool.server.model.lora import LoraBatch
from lorapool.server.model.model import Model
from lorapool.types import GenerationRequest, SamplingParams

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DEMO = REPO / ".cache" / "bench-demo"
DEMO_ADAPTERS = 64
SHORT = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"}
SHORT |= {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}

# (label, batch, adapters, key, threshold): what the project aims at.
TARGETS = [
    ("batch 64, 0 adapters: engine/limit >= 0.75", 64, 0, "ratio_limit", 0.75),
    ("batch 64, 64 adapters: engine/limit >= 0.55", 64, 64, "ratio_limit", 0.55),
    ("batch 64, 64 adapters: vs 0 adapters >= 0.70", 64, 64, "ratio_base", 0.70),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int_list, default=[1, 16, 64, 128], help="e.g. 1,16,64,128")
    p.add_argument("--adapters", type=int_list, default=[0, 8, 64], help="distinct adapter counts")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per repeat")
    p.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="passes over the timed steps; figures are medians of step times",
    )
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--demo-dir", type=Path, default=DEFAULT_DEMO)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small smoke-test run")
    p.add_argument(
        "--profile",
        metavar="BATCH:ADAPTERS",
        nargs="?",
        const="64:64",
        default=None,
        help="also break down where a decode step's time goes (default case 64:64)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.adapters = [1, 8], [0, 4]
        args.steps, args.repeats, args.prompt_len = 4, 2, 16
        if args.profile:
            args.profile = "8:4"
    if args.profile:
        b, a = args.profile.split(":")
        args.profile = (int(b), int(a))
    if min(args.batches) < 1 or min(args.adapters) < 0 or args.steps < 1 or args.repeats < 1:
        p.error("batches >= 1, adapters >= 0, steps >= 1 and repeats >= 1 are required")
    if max(args.adapters) > DEMO_ADAPTERS:
        p.error(f"the bench demo has {DEMO_ADAPTERS} adapters")
    return args


# --------------------------------------------------------------------------- setup


class OtherLoad:
    """Share of the machine's CPU time used by other processes since creation
    (Linux /proc/stat minus this process's own CPU time): a noisy-neighbour meter."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError, IndexError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        own = os.times()
        busy = (v[0] + v[1] + v[2] + v[5] + v[6]) / hz  # user nice system irq softirq
        total = sum(v) / hz
        return busy, total, own.user + own.system, v[7] / hz

    def share(self) -> dict | None:
        end = self._sample()
        if self.start is None or end is None or end[1] <= self.start[1]:
            return None
        busy, total, own, steal = (e - s for e, s in zip(end, self.start, strict=True))
        return {"other": max(0.0, (busy - own) / total), "steal": steal / total}


def load_demo(demo_dir: Path):
    from lorapool.demo import make_demo

    t0 = time.perf_counter()
    paths = make_demo(demo_dir, preset="bench", n_adapters=DEMO_ADAPTERS, mix="bench", seed=0)
    return paths, time.perf_counter() - t0


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


def modules_label(modules: list[str]) -> str:
    return ",".join(short for m, short in SHORT.items() if m in modules)


class Bench:
    def __init__(self, args, model_dir: Path, adapter_dirs: list[Path]):
        self.args = args
        self.model = Model.from_pretrained(model_dir)
        spec = self.model.spec
        self.spec = spec
        layout = PageLayout(spec.num_layers, args.block_size, spec.num_kv_heads, spec.head_dim)
        n_adapters = max(args.adapters)
        reads = [read_adapter(d, spec) for d in adapter_dirs[:n_adapters]]
        page_elems = layout.page_elems
        packs = [pack_adapter(spec, aw, torch.float32, page_elems) for aw in reads]
        self.max_len = args.prompt_len + args.steps + 1
        # Every adapter count of the largest batch is resident at once.
        rows = max(args.batches) * max(len(args.adapters), 1)
        kv_pages = rows * -(-self.max_len // args.block_size)
        adapter_pages = sum(p.num_pages(page_elems) for p in packs)
        self.pool = PagePool(layout, kv_pages + adapter_pages + 8, torch.float32, "cpu")
        self.blocks = BlockManager(self.pool.allocator, args.block_size, enable_prefix_cache=False)
        self.placed, self.adapter_info = [], []
        for d, aw, packed in zip(adapter_dirs, reads, packs, strict=False):
            pages = self.pool.allocator.allocate(packed.num_pages(page_elems))
            self.placed.append(place_adapter(self.pool, spec, packed, pages, aw.content_hash))
            self.adapter_info.append(
                {
                    "name": d.name,
                    "rank": aw.rank,
                    "modules": modules_label(aw.target_modules),
                    "raw_bytes": sum(
                        t.numel() * self.pool.tensor.element_size()
                        for ab in aw.weights.values()
                        for t in ab
                    ),
                    "packed_elems": packed.flat.numel(),
                    "pages": len(pages),
                }
            )
        self.runner = ModelRunner(self.model, self.pool)
        self.gen = torch.Generator().manual_seed(args.seed)

    # -- one configuration ------------------------------------------------------------
    def make_rows(self, batch: int, n_adapters: int, runner: ModelRunner | None = None):
        runner = runner or self.runner
        params = SamplingParams(max_new_tokens=self.max_len, ignore_eos=True)
        rows = []
        for i in range(batch):
            ids = torch.randint(
                3, self.spec.vocab_size, (self.args.prompt_len,), generator=self.gen
            )
            ids = ids.tolist()
            seq = Sequence(GenerationRequest(request_id=str(i), input_ids=ids, params=params), ids)
            self.blocks.allocate(seq, self.max_len)
            adapter = self.placed[i % n_adapters] if n_adapters else None
            rows.append((seq, adapter))
        # Prefill in groups so that one step stays a few thousand tokens.
        group = max(1, 2048 // self.args.prompt_len)
        for g in range(0, batch, group):
            part = rows[g : g + group]
            res = runner.step([ScheduledSeq(s, s.num_pending, a) for s, a in part])
            for s, tok, _ in res.sampled:
                s.num_computed = s.num_tokens
                s.output_ids.append(tok)
        return rows

    def rewind(self, rows) -> None:
        for seq, _ in rows:
            del seq.output_ids[1:]
            seq.num_computed = self.args.prompt_len

    @staticmethod
    def decode_step(runner: ModelRunner, rows) -> float:
        t0 = time.perf_counter()
        res = runner.step([ScheduledSeq(s, 1, a) for s, a in rows])
        for s, tok, _ in res.sampled:
            s.num_computed += 1
            s.output_ids.append(tok)
        return time.perf_counter() - t0

    def decode(self, rows, runner: ModelRunner | None = None) -> float:
        """All steps of one repeat, from the end of the prompt."""
        runner = runner or self.runner
        self.rewind(rows)
        return sum(self.decode_step(runner, rows) for _ in range(self.args.steps))

    def limit_inputs(self, batch: int):
        mats = self.model.dense_weights()
        xs = {w.shape[1]: torch.randn(batch, w.shape[1], generator=self.gen) for w in mats}
        return [(xs[w.shape[1]], w) for w in mats]

    @staticmethod
    def limit_step(pairs) -> float:
        t0 = time.perf_counter()
        for x, w in pairs:
            x @ w.T
        return time.perf_counter() - t0

    def free(self, rows) -> None:
        for seq, _ in rows:
            self.blocks.free(seq)

    def measure_batch(self, batch: int, counts: list[int]) -> list[dict]:
        """Every adapter count of one batch size, interleaved step by step with each
        other and with the limit: E(a0) L E(a8) L E(a64) L, then the next step."""
        # One runner per configuration: each keeps its own reusable LoRA plan.
        load = OtherLoad()
        configs = []
        for n in counts:
            runner = ModelRunner(self.model, self.pool)
            configs.append((n, runner, self.make_rows(batch, n, runner)))
        pairs = self.limit_inputs(batch)
        eng = {n: [] for n in counts}
        lim: list[float] = []
        for rep in range(self.args.repeats + 1):  # the first repeat is a warm-up
            for _, _, rows in configs:
                self.rewind(rows)
            for _ in range(self.args.steps):
                for n, runner, rows in configs:
                    e = self.decode_step(runner, rows)
                    m = self.limit_step(pairs)
                    if rep:
                        eng[n].append(e)
                        lim.append(m)
        for _, _, rows in configs:
            self.free(rows)
        busy = load.share()
        m = statistics.median(lim)
        base = statistics.median(eng[0]) if 0 in eng else None
        out = []
        for n in counts:
            e = statistics.median(eng[n])
            out.append(
                {
                    "batch": batch,
                    "adapters": n,
                    "distinct": min(batch, n),
                    "engine_tok_s": batch / e,
                    "limit_tok_s": batch / m,
                    "ratio_limit": m / e,
                    "ratio_base": base / e if n and base is not None else None,
                    "engine_ms_step": 1e3 * e,
                    "limit_ms_step": 1e3 * m,
                    "engine_iqr": _iqr(eng[n]) / e,
                    "limit_iqr": _iqr(lim) / m,
                    "samples": len(eng[n]),
                    "other_load": None if busy is None else busy["other"],
                }
            )
        return out


def _iqr(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


# --------------------------------------------------------------------------- profile


REGIONS = [
    (ModelRunner, "step", "step"),
    (runner_mod, "build_meta", "attention metadata (build_meta)"),
    (ModelRunner, "_lora_batch", "LoRA plan lookup/build"),
    (Model, "forward", "forward"),
    (torch.nn.functional, "linear", "dense matmuls (F.linear)"),
    (LoraBatch, "apply", "LoRA apply"),
    (PagedAttention, "__call__", "attention (embedding_bag + softmax)"),
    (PagedAttention, "write", "KV write"),
    (runner_mod, "sample", "sampling"),
]


def plan_build_seconds(bench: Bench, rows, batch: int) -> list[float]:
    """LoRA plan construction only happens when the batch's composition changes;
    time it directly since unchanged decode steps reuse it."""
    segments = [(i, 1, a) for i, (_, a) in enumerate(rows)]
    build = []
    for _ in range(5):
        t0 = time.perf_counter()
        LoraBatch(bench.pool, bench.spec, segments, batch)
        build.append(time.perf_counter() - t0)
    return build


def timed_passes(bench: Bench, rows, steps: int):
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


def profile(bench: Bench, batch: int, n_adapters: int) -> dict:
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
    inner = ["dense matmuls (F.linear)", "LoRA apply"]
    inner += ["attention (embedding_bag + softmax)", "KV write"]
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


# --------------------------------------------------------------------------- output


def print_table(results: list[dict]) -> None:
    head = (
        f"{'batch':>5s} {'adapters':>8s} {'distinct':>8s} {'engine tok/s':>12s} "
        f"{'limit tok/s':>12s} {'eng/limit':>9s} {'vs 0-ad':>7s} "
        f"{'eng ms/step':>11s} {'lim ms/step':>11s} {'IQR e/l':>11s} {'other load':>10s}"
    )
    print_header(head)
    for r in results:
        print(
            f"{r['batch']:5d} {r['adapters']:8d} {r['distinct']:8d} {r['engine_tok_s']:12.0f} "
            f"{r['limit_tok_s']:12.0f} {r['ratio_limit']:9.2f} {fmt(r['ratio_base'], '.2f'):>7s} "
            f"{r['engine_ms_step']:11.2f} {r['limit_ms_step']:11.2f} "
            f"{r['engine_iqr']:5.0%}/{r['limit_iqr']:<5.0%} {fmt(r['other_load'], '.0%'):>10s}"
        )


def evaluate_targets(results: list[dict]) -> list[dict]:
    out = []
    for label, batch, adapters, key, threshold in TARGETS:
        row = next((r for r in results if r["batch"] == batch and r["adapters"] == adapters), None)
        value = None if row is None else row[key]
        status = "n/a" if value is None else ("PASS" if value >= threshold else "FAIL")
        out.append({"target": label, "value": value, "threshold": threshold, "status": status})
    return out


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


def print_targets(targets: list[dict]) -> None:
    print("\nTargets:")
    for t in targets:
        print(f"  [{t['status']:4s}] {t['target']:48s} measured {fmt(t['value'], '.2f')}")


def print_setup(bench: Bench, paths, demo_s: float) -> None:
    args, spec = bench.args, bench.spec
    print(
        f"bench_engine: {spec.arch}, hidden {spec.hidden_size}, intermediate "
        f"{spec.intermediate_size}, {spec.num_layers} layers, {spec.num_heads}/"
        f"{spec.num_kv_heads} heads, vocab {spec.vocab_size}, float32, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(
        f"prompt {args.prompt_len} tokens, {args.steps} decode steps x {args.repeats} "
        "repeats; median step times; pages allocated before timing; limit = x @ W.T "
        "over Model.dense_weights(); engine (every adapter count) and limit steps "
        "take turns one by one"
    )
    print(f"demo: {paths.root} (ready in {demo_s:.1f} s)\n")


def measure(bench: Bench) -> list[dict]:
    """Every batch size and adapter count, with a progress line each on stderr."""
    results = []
    for batch in bench.args.batches:
        for r in bench.measure_batch(batch, bench.args.adapters):
            results.append(r)
            print(
                f"  measured batch {batch} adapters {r['adapters']}: {r['engine_tok_s']:.0f} tok/s",
                file=sys.stderr,
                flush=True,
            )
    return results


def print_total(elapsed: float, busy: dict | None) -> None:
    print(f"\ntotal {elapsed:.0f} s", end="")
    if busy is not None:
        print(
            f"; other processes used {busy['other']:.0%} of the machine's CPU time "
            f"(steal {busy['steal']:.0%})"
            + ("; above ~10% the figures are unreliable" if busy["other"] > 0.1 else ""),
            end="",
        )
    print()


def config_json(args, paths) -> dict:
    return {
        "batches": args.batches,
        "adapters": args.adapters,
        "steps": args.steps,
        "repeats": args.repeats,
        "prompt_len": args.prompt_len,
        "block_size": args.block_size,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "demo": str(paths.root),
        "timed": "runner.step + token bookkeeping; pages allocated before timing",
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    paths, demo_s = load_demo(args.demo_dir)
    t_start = time.perf_counter()
    load = OtherLoad()
    with torch.inference_mode():
        bench = Bench(args, paths.model_dir, paths.adapter_dirs)
        print_setup(bench, paths, demo_s)
        results = measure(bench)
        print_table(results)
        targets = evaluate_targets(results)
        print_targets(targets)
        mem = memory_report(bench.pool, bench.adapter_info)
        print_memory(mem)
        prof = None
        if args.profile:
            batch, n = args.profile
            prof = profile(bench, batch, n)
            with contextlib.suppress(ZeroDivisionError):
                print_profile(prof)
    elapsed = time.perf_counter() - t_start
    busy = load.share()
    print_total(elapsed, busy)
    report = {
        "config": config_json(args, paths),
        "results": results,
        "targets": targets,
        "memory": mem,
        "profile": prof,
        "seconds": elapsed,
        "other_load": busy,
    }
    print_json_line(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
