"""`make_demo`: the whole demo (model and adapters) in one directory, written once and
reused while its stamp matches, with a file lock for concurrent writers."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorapool.demo.adapters import MIXES, adapter_complete, adapter_name, make_adapters
from lorapool.demo.checkpoint import model_complete, write_model
from lorapool.demo.common import cache_root, check_choice, env_dir, locked, write_json
from lorapool.demo.presets import ARCHS, PRESETS

STAMP_NAME = "demo.json"
STAMP_VERSION = 2  # 2: the demo tokenizer has a chat template


@dataclass
class DemoPaths:
    root: Path
    model_dir: Path
    adapters_dir: Path
    adapter_dirs: list[Path] = field(default_factory=list)


def default_demo_dir() -> Path:
    """Where the server and benchmarks look for the demo when given no model.

    LORAPOOL_DEMO_DIR wins. Otherwise, in a source checkout (the editable install
    used for development) it is `<repo>/.cache/demo`, next to the code and already
    git-ignored; for an installed package it is `~/.cache/lorapool/demo`.
    """
    return env_dir("LORAPOOL_DEMO_DIR", cache_root() / "demo")


def make_demo(
    out_dir: str | os.PathLike[str],
    preset: str = "tiny",
    arch: str = "llama",
    n_adapters: int = 8,
    mix: str = "demo",
    seed: int = 0,
    shard_mib: float | None = None,
) -> DemoPaths:
    """Write (or reuse) a demo model and `n_adapters` adapters under `out_dir`.

    A directory whose stamp records the same parameters, with all files present, is
    returned untouched; anything else in model/ and adapters/ is replaced. A file lock
    makes concurrent callers (parallel test workers) wait for one writer.
    """
    params = _stamp(preset, arch, n_adapters, mix, seed, shard_mib)
    root = Path(out_dir).expanduser().resolve()
    paths = _demo_paths(root, n_adapters)
    if _is_complete(paths, params):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    with locked(root / ".lock"):
        if not _is_complete(paths, params):  # else another process finished it meanwhile
            _rewrite(paths, params)
    return paths


def _stamp(
    preset: str, arch: str, n_adapters: int, mix: str, seed: int, shard_mib: float | None
) -> dict[str, Any]:
    """The checked parameters, as the stamp records them."""
    check_choice("preset", preset, PRESETS)
    check_choice("arch", arch, ARCHS)
    check_choice("mix", mix, MIXES)
    if n_adapters < 0:
        raise ValueError("n_adapters must be >= 0")
    if shard_mib is not None and shard_mib <= 0:
        raise ValueError("shard_mib must be > 0")
    return {
        "version": STAMP_VERSION,
        "preset": preset,
        "arch": arch,
        "n_adapters": n_adapters,
        "mix": mix,
        "seed": seed,
        "shard_mib": shard_mib,
    }


def _demo_paths(root: Path, n_adapters: int) -> DemoPaths:
    adapters_dir = root / "adapters"
    return DemoPaths(
        root=root,
        model_dir=root / "model",
        adapters_dir=adapters_dir,
        adapter_dirs=[adapters_dir / adapter_name(i) for i in range(n_adapters)],
    )


def _is_complete(paths: DemoPaths, params: dict[str, Any]) -> bool:
    """True when the stamp matches and the files it promises are there."""
    try:
        stamp = json.loads((paths.root / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return False
    return (
        stamp == params
        and model_complete(paths.model_dir, sharded=bool(params["shard_mib"]))
        and all(adapter_complete(d) for d in paths.adapter_dirs)
    )


def _rewrite(paths: DemoPaths, params: dict[str, Any]) -> None:
    """Replace model/ and adapters/; the stamp goes last, so that an interrupted
    write is redone by the next call."""
    (paths.root / STAMP_NAME).unlink(missing_ok=True)
    for stale in (paths.model_dir, paths.adapters_dir):
        if stale.exists():
            shutil.rmtree(stale)
    write_model(
        paths.model_dir,
        preset=params["preset"],
        arch=params["arch"],
        seed=params["seed"],
        shard_mib=params["shard_mib"],
    )
    make_adapters(
        paths.model_dir,
        paths.adapters_dir,
        params["n_adapters"],
        mix=params["mix"],
        seed=params["seed"],
    )
    write_json(paths.root / STAMP_NAME, params)
