"""`lorapool make-demo`: write (or reuse) a demo model and adapters from the command line."""

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
        help="output directory (default: $LORAPOOL_DEMO_DIR or <repo>/.cache/demo)",
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
