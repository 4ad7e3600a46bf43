"""The table bench_peers.py prints and report.py puts in docs/benchmarks.md,
rendered from bench_peers' JSON alone (so a saved result renders the same
table later): one row per system, generated tokens/s base-only and with every
adapter, and each run's share of the dense-matmul limit counting prompt and
generated tokens."""

from __future__ import annotations

SYSTEMS = {
    "lorapool": "lorapool, through gRPC, {streams} streams",
    "vllm": "vLLM {vllm} CPU build, offline `generate` (LoRA: max_loras {max_loras}, "
    "max_lora_rank {max_lora_rank})",
    "hf": "HF transformers static batch {batch} / PEFT mixed-adapter batch {batch}",
}


def _num(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def system_label(key: str, result: dict) -> str:
    cfg = result["config"]
    return SYSTEMS[key].format(
        streams=cfg["streams"],
        vllm=result.get("vllm", {}).get("version", "?"),
        max_loras=cfg["max_loras"],
        max_lora_rank=cfg["max_lora_rank"],
        batch=cfg["hf_batch"],
    )


def caption(result: dict) -> str:
    """What was run: the trace, the model and the limit."""
    cfg, t, lim = result["config"], result["trace"], result["limit"]
    m = result["model"]
    return (
        f"One seeded trace of {t['requests']} requests (seed {cfg['seed']}), power-law "
        f"popularity (zipf {cfg['zipf']:g}) over {cfg['adapters']} adapters of ranks "
        f"{'/'.join(str(r) for r in cfg['ranks'])} on q,v / attention / all-linear targets "
        f"({t['distinct_adapters']} of them used, the most popular taking "
        f"{t['top_adapter_share']:.0%} of requests); prompts {cfg['prompt'][0]}-"
        f"{cfg['prompt'][1]} and outputs {cfg['output'][0]}-{cfg['output'][1]} tokens "
        f"({t['prompt_tokens']} prompt + {t['generated_tokens']} generated), greedy, "
        f"ignore_eos. Model: {m['arch']}, hidden {m['hidden']}, {m['layers']} layers, GQA "
        f"{m['heads']}/{m['kv_heads']}, vocab {m['vocab']}, float32. Limit: bare dense matmuls "
        f"of this model (x W^T over Model.dense_weights(), the engine's kernel) at batch {lim['batch']}, "
        f"{lim['tok_s']:.0f} tok/s, the best of measurements taken before each system and "
        f"after the last ({', '.join(f'{v:.0f}' for v in lim['samples'])} tok/s: other load "
        "only slows it down); share = (prompt + generated tokens) / wall seconds / limit."
    )


def rows(result: dict) -> list[list[str]]:
    """[system, base tok/s, adapters tok/s, base share, adapters share, adapters/base]."""
    out = []
    for key in SYSTEMS:
        runs = result["systems"].get(key)
        if runs is None:
            continue
        base, lora = runs.get("base"), runs.get("adapters")
        ratio = None
        if base and lora and base["tok_s"]:
            ratio = lora["tok_s"] / base["tok_s"]
        out.append(
            [
                system_label(key, result),
                _num(base and base["tok_s"], ".0f"),
                _num(lora and lora["tok_s"], ".0f"),
                _num(base and base["limit_share"], ".2f"),
                _num(lora and lora["limit_share"], ".2f"),
                _num(ratio, ".2f"),
            ]
        )
    return out


HEAD = [
    "system",
    "base only, tok/s",
    "{n} adapters, tok/s",
    "base, share of limit",
    "{n} adapters, share of limit",
    "adapters / base",
]


def markdown_table(result: dict) -> str:
    n = result["config"]["adapters"]
    head = [h.format(n=n) for h in HEAD]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(result)]
    return "\n".join(lines)


def ratios(result: dict) -> dict[str, float | None]:
    """lorapool over each peer, tokens/s, base and with adapters."""
    sys_ = result["systems"]
    out: dict[str, float | None] = {}
    ours = sys_.get("lorapool", {})
    for key, name in (("vllm", "vLLM"), ("hf", "HF/PEFT")):
        for run in ("base", "adapters"):
            a, b = ours.get(run), sys_.get(key, {}).get(run)
            out[f"lorapool / {name}, {run}"] = a["tok_s"] / b["tok_s"] if a and b else None
    return out


def text_table(result: dict) -> str:
    """The table as aligned text, with its caption and the ratios under it."""
    n = result["config"]["adapters"]
    head = [h.format(n=n) for h in HEAD]
    body = rows(result)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    fmt_row = lambda r: "  ".join(  # noqa: E731
        c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)
    )
    lines = [fmt_row(head), "-" * len(fmt_row(head)), *map(fmt_row, body), ""]
    lines.append(caption(result))
    lines.append("")
    lines += [f"  {k:34s} {_num(v, '.2f')}" for k, v in ratios(result).items()]
    return "\n".join(lines)
