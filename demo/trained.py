"""`make_trained_demo`: SmolLM2-135M-Instruct with LoRA adapters trained to visible
styles, built once into a cache folder and reused.

Steps, each cached in `root/`::

    model/             the converted checkpoint (lorapool.demo.real_model)
    trained/<style>/   every trained adapter, PEFT layout, written atomically
    adapters/<style>/  the adapters that took: what `lorapool serve` is given
    training.json      the record: parameters, the base model's answers, and per
                       style the training time, losses and held-out answers

The base model answers the training questions once; each style's adapter is trained
on those answers rewritten by the style's rule (lorapool.demo.train). Then all
adapters are reloaded from disk into one PEFT model and answer the held-out
questions in one mixed batch (float32, greedy); a style whose every answer shows it
is shipped in adapters/, any other is left in trained/ and named in the record.
The record's parameters are its stamp: changing them retrains.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorapool.demo import real_model, train
from lorapool.demo.common import locked
from lorapool.demo.styles import HELD_OUT_QUESTIONS, STYLES, TRAIN_QUESTIONS

RECORD_NAME = "training.json"
RECORD_VERSION = 1
CHECK_TOKENS = 80  # held-out answers are generated up to this many tokens


@dataclass
class TrainedDemo:
    root: Path
    model_dir: Path
    adapters_dir: Path
    record: dict[str, Any]

    @property
    def shipped(self) -> list[str]:
        return [name for name, s in self.record["styles"].items() if s.get("took")]

    @property
    def adapter_dirs(self) -> list[Path]:
        return [self.adapters_dir / name for name in self.shipped]


def answer_parameters() -> dict[str, Any]:
    """What the base model's answers depend on; other recorded answers are redone."""
    return {
        "version": RECORD_VERSION,
        "train_questions": TRAIN_QUESTIONS,
        "answer_tokens": train.ANSWER_TOKENS,
        "answer_sentences": train.ANSWER_SENTENCES,
    }


def parameters() -> dict[str, Any]:
    """What the adapters depend on; a record with other parameters is redone (its
    base answers are kept when answer_parameters() still match)."""
    return {
        **answer_parameters(),
        "styles": sorted(STYLES),
        "held_out_questions": HELD_OUT_QUESTIONS,
        "rank": train.RANK,
        "alpha": train.ALPHA,
        "target_modules": train.TARGET_MODULES,
        "trained_layers": train.TRAINED_LAYERS,
        "steps": train.STEPS,
        "batch": train.BATCH,
        "lr": train.LR,
        "seed": train.SEED,
        "check_tokens": CHECK_TOKENS,
    }


def make_trained_demo(
    root: str | os.PathLike[str] | None = None, progress: bool | None = None
) -> TrainedDemo:
    """The converted model and its trained style adapters under `root` (default:
    real_model.default_real_dir()), built first where missing or stale."""
    root = Path(root).expanduser().resolve() if root is not None else real_model.default_real_dir()
    model_dir = real_model.convert(root, progress=progress)
    demo = TrainedDemo(root, model_dir, root / "adapters", _read_record(root))
    if _is_complete(demo):
        return demo
    with locked(root / ".train.lock"):
        demo.record = _read_record(root)
        if not _is_complete(demo):  # else another process finished it meanwhile
            _build(demo, progress)
    return demo


def _read_record(root: Path) -> dict[str, Any]:
    try:
        record = json.loads((root / RECORD_NAME).read_text())
    except (OSError, ValueError):
        record = {}
    if not isinstance(record, dict):
        record = {}
    if record.get("parameters") == parameters():
        return record
    fresh: dict[str, Any] = {"parameters": parameters(), "styles": {}}
    if record.get("answer_parameters") == answer_parameters() and "base_answers" in record:
        for key in ("answer_parameters", "base_answers", "base_answers_seconds"):
            fresh[key] = record[key]
    return fresh


def _write_record(root: Path, record: dict[str, Any]) -> None:
    partial = root / (RECORD_NAME + ".partial")
    partial.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    os.replace(partial, root / RECORD_NAME)


def _adapter_complete(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() and (
        path / "adapter_model.safetensors"
    ).is_file()


def _is_complete(demo: TrainedDemo) -> bool:
    styles = demo.record["styles"]
    return (
        set(styles) == set(STYLES)
        and all("took" in s for s in styles.values())
        and all(_adapter_complete(d) for d in demo.adapter_dirs)
    )


def _build(demo: TrainedDemo, progress: bool | None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, record = demo.root, demo.record
    tokenizer = AutoTokenizer.from_pretrained(str(demo.model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(demo.model_dir), dtype=torch.float32)
    model.eval()
    if "base_answers" not in record:
        start = time.perf_counter()
        _say(f"the base model answers {len(TRAIN_QUESTIONS)} training questions")
        pairs = train.base_answers(model, tokenizer, TRAIN_QUESTIONS)
        record["answer_parameters"] = answer_parameters()
        record["base_answers"] = [list(p) for p in pairs]
        record["base_answers_seconds"] = round(time.perf_counter() - start, 1)
        _write_record(root, record)
    pairs = [(q, a) for q, a in record["base_answers"]]
    trained_dir = root / "trained"
    for name, style in STYLES.items():
        done = record["styles"].get(name)
        if done and _adapter_complete(trained_dir / name):
            continue
        peft_model = train.train_style(model, tokenizer, pairs, style, progress=progress)
        _save_adapter(peft_model, name, trained_dir)
        result = peft_model.trained
        record["styles"][name] = {
            "description": style.description,
            "train_seconds": round(result.seconds, 1),
            "first_loss": round(result.losses[0], 4),
            "last_loss": round(result.losses[-1], 4),
        }
        _write_record(root, record)
        model = peft_model.unload()
    _check_and_ship(demo, model, tokenizer)


def _save_adapter(peft_model: Any, name: str, trained_dir: Path) -> None:
    """PEFT's own save (a named adapter goes into a subfolder of the path given),
    then one rename into trained/<name>."""
    partial = trained_dir / f".{name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    peft_model.save_pretrained(str(partial), selected_adapters=[name])
    saved = partial / name if (partial / name).is_dir() else partial
    target = trained_dir / name
    if target.exists():
        shutil.rmtree(target)
    os.replace(saved, target)
    shutil.rmtree(partial, ignore_errors=True)


def _check_and_ship(demo: TrainedDemo, model: Any, tokenizer: Any) -> None:
    """Reload every trained adapter from disk into one PEFT model, answer the held-out
    questions with each in one mixed batch, and ship the styles that show."""
    from peft import PeftModel

    root, record = demo.root, demo.record
    names = list(STYLES)
    trained_dir = root / "trained"
    start = time.perf_counter()
    _say(f"checking {len(names)} adapters on {len(HELD_OUT_QUESTIONS)} held-out questions")
    peft_model = PeftModel.from_pretrained(model, str(trained_dir / names[0]), names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(trained_dir / name), adapter_name=name)
    peft_model.eval()
    questions = [q for _ in names for q in HELD_OUT_QUESTIONS]
    rows = [n for n in names for _ in HELD_OUT_QUESTIONS]
    answers = train.greedy_answers(
        peft_model, tokenizer, questions, CHECK_TOKENS, adapter_names=rows
    )
    record["check_seconds"] = round(time.perf_counter() - start, 1)
    demo.adapters_dir.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        held = answers[i * len(HELD_OUT_QUESTIONS) : (i + 1) * len(HELD_OUT_QUESTIONS)]
        took = all(STYLES[name].shows(a) for a in held)
        entry = record["styles"][name]
        entry["held_out"] = [list(p) for p in zip(HELD_OUT_QUESTIONS, held, strict=True)]
        entry["took"] = took
        shipped = demo.adapters_dir / name
        if shipped.exists():
            shutil.rmtree(shipped)
        if took:
            partial = root / f".{name}.shipping"  # outside adapters/, which is served
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(trained_dir / name, partial)
            os.replace(partial, shipped)
        else:
            _say(f"style {name!r} did not take; not shipped (see {root / RECORD_NAME})")
    _write_record(root, record)
    peft_model.unload()


def _say(text: str) -> None:
    print(f"lorapool make-demo: {text}", file=sys.stderr, flush=True)
