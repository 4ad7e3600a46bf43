"""What `lorapool serve` serves when given no model: SmolLM2-135M-Instruct with the
trained style adapters where its wheel is installed (a real model answering real
questions), else the embedded random-init tiny model with its random adapters.
LORAPOOL_DEMO_MODEL=smollm2 or tiny chooses explicitly."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lorapool.demo import real_model

ENV = "LORAPOOL_DEMO_MODEL"
CHOICES = ("smollm2", "tiny")


@dataclass
class DefaultModel:
    model_dir: Path
    adapters_dir: Path | None  # None: no adapters to serve yet
    adapters: list[str]  # the adapter ids in adapters_dir
    description: str  # what is served, for the start-up line


def choice() -> str:
    """LORAPOOL_DEMO_MODEL when set (ValueError unless smollm2 or tiny), else smollm2
    when its wheel and the gguf reader are installed, else tiny."""
    value = os.environ.get(ENV, "").strip().lower()
    if value and value not in CHOICES:
        raise ValueError(f"{ENV}={value!r} is not one of {', '.join(CHOICES)}")
    return value or ("smollm2" if real_model.available() else "tiny")


def default_model(which: str | None = None) -> DefaultModel:
    """The chosen default, built first where missing (the conversion takes about half
    a minute once; the tiny demo a second). Adapters are not trained here: serving
    starts with those `lorapool make-demo --train-adapters` shipped."""
    which = which or choice()
    if which == "tiny":
        from lorapool.demo.maker import default_demo_dir, make_demo

        demo = make_demo(default_demo_dir(), preset="tiny", n_adapters=8)
        return DefaultModel(
            demo.model_dir,
            demo.adapters_dir,
            [d.name for d in demo.adapter_dirs],
            f"the embedded random-init demo model from {demo.root}",
        )
    root = real_model.default_real_dir()
    model_dir = real_model.convert(root)
    adapters_dir = root / "adapters"
    adapters = (
        sorted(d.name for d in adapters_dir.iterdir() if (d / "adapter_config.json").is_file())
        if adapters_dir.is_dir()
        else []
    )
    return DefaultModel(
        model_dir,
        adapters_dir if adapters else None,
        adapters,
        f"{real_model.NAME} from {model_dir}",
    )
