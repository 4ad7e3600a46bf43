"""The plots of docs/benchmarks.md, each drawn from report.py's collected JSON
alone (matplotlib, Agg backend, small PNGs: 100 dpi, no transparency)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

SIZE = (6.4, 3.6)
DPI = 100


def _plain_log(axis) -> None:
    """Log-scale ticks as plain numbers (20, 50, 100), not powers of ten."""
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, pil_kwargs={"optimize": True})
    plt.close(fig)
    return path


def plot_adapters(engine: dict, path: Path) -> Path:
    """Decode tokens/s against distinct adapters in the batch, one line per batch
    size, with the dense-matmul limit of that batch dashed."""
    fig, ax = plt.subplots(figsize=SIZE)
    batches = sorted({r["batch"] for r in engine["results"]})
    for i, b in enumerate(batches):
        # adapters beyond the batch size add no distinct ones: one point per distinct count
        rows = sorted(
            (r for r in engine["results"] if r["batch"] == b and r["adapters"] <= b),
            key=lambda r: r["distinct"],
        )
        xs = [max(r["distinct"], 0) for r in rows]
        color = f"C{i}"
        ax.plot(xs, [r["engine_tok_s"] for r in rows], "o-", color=color, label=f"batch {b}")
        limit = sorted(r["limit_tok_s"] for r in rows)[len(rows) // 2]
        ax.axhline(limit, color=color, ls="--", lw=1, label=f"dense-matmul limit, batch {b}")
    ax.set_xscale("symlog", linthresh=1)
    ticks = sorted({max(r["distinct"], 0) for r in engine["results"]})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(-0.2, max(ticks) * 1.3 if ticks else 1)
    ax.set_xlabel("distinct adapters in the batch (0 = base model)")
    ax.set_ylabel("decode tokens/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return _save(fig, path)


def plot_peers(peers: dict, labels: dict[str, str], path: Path) -> Path:
    """Generated tokens/s of each system on the trace, base only and with adapters."""
    systems = [k for k in labels if k in peers["systems"]]
    n = peers["config"]["adapters"]
    fig, ax = plt.subplots(figsize=SIZE)
    width = 0.38
    for j, (run, name) in enumerate((("base", "base model only"), ("adapters", f"{n} adapters"))):
        vals = [peers["systems"][s].get(run, {}).get("tok_s", 0.0) for s in systems]
        xs = [i + (j - 0.5) * width for i in range(len(systems))]
        bars = ax.bar(xs, vals, width, label=name, color=f"C{j}")
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(range(len(systems)), [labels[s] for s in systems], fontsize=8)
    ax.set_ylabel("generated tokens/s")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_load(load: dict, path: Path) -> Path:
    """TTFT and ITL percentiles against offered load (open loop, Poisson)."""
    levels = load["levels"]
    xs = [lv["rps"] for lv in levels]
    fig, (a, b) = plt.subplots(1, 2, figsize=(SIZE[0], SIZE[1]))
    for key, ax, title in (("ttft_ms", a, "time to first token"), ("itl_ms", b, "inter-token")):
        for p, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            if not any(p in lv[key] for lv in levels):
                continue
            ys = [lv[key].get(p) for lv in levels]
            ax.plot(xs, [float("nan") if y is None else y for y in ys], style, label=p)
        ax.set_yscale("log")
        _plain_log(ax.yaxis)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("offered load, requests/s")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    a.set_ylabel("ms")
    return _save(fig, path)


def plot_pool(pool: dict, path: Path) -> Path:
    """Share of the page bytes an adapter holds that are its own LoRA weights,
    per adapter shape (rank x target set), against fixed slots for the largest."""
    kinds: dict[tuple[int, str], dict] = {}
    for a in pool["adapters"]:
        kinds.setdefault((a["rank"], a["modules"]), a)
    keys = sorted(kinds, key=lambda k: kinds[k]["raw_bytes"])
    largest = max(kinds[k]["page_bytes_held"] for k in keys)
    fig, ax = plt.subplots(figsize=SIZE)
    xs = range(len(keys))
    paged = [kinds[k]["efficiency"] for k in keys]
    slots = [kinds[k]["raw_bytes"] / largest for k in keys]
    ax.bar([x - 0.2 for x in xs], paged, 0.4, label="pool pages", color="C0")
    ax.bar([x + 0.2 for x in xs], slots, 0.4, label="fixed slot for the largest", color="C7")
    names = [f"r{r}\n{_short(m)}" for r, m in keys]
    ax.set_xticks(list(xs), names, fontsize=7)
    ax.set_ylabel("LoRA bytes / bytes held")
    ax.set_ylim(0, 1.3)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    return _save(fig, path)


def _short(modules: str) -> str:
    return {"q,v": "q,v", "q,k,v,o": "attn", "q,k,v,o,gate,up,down": "all"}.get(modules, modules)
