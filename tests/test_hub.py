"""Hugging Face Hub ids for the model (`--model org/name[@revision]`) and adapters
(`hf://org/name`), resolved through a huggingface_hub cache laid out here the way
huggingface_hub writes it; the hub itself is offline, as on this machine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorapool.server.model.checkpoint import CheckpointError, resolve_model_dir
from lorapool.types import GenerationRequest, SamplingParams

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lay_out(cache: Path, repo: str, files_from: Path, kind: str = "models") -> Path:
    """models--org--name/{refs/main, snapshots/<commit>/...} as huggingface_hub has it."""
    root = cache / f"{kind}--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / COMMIT
    shutil.copytree(files_from, snapshot)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, tiny_demo, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    model = lay_out(cache, "test-org/tiny-llama", tiny_demo.model_dir)
    adapter = lay_out(cache, "test-org/tiny-adapter", tiny_demo.adapter_dirs[3])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache, model, adapter


def test_hub_ids_resolve_from_the_cache(hub_cache):
    _, model, _ = hub_cache
    assert resolve_model_dir("test-org/tiny-llama") == model
    assert resolve_model_dir(f"test-org/tiny-llama@{COMMIT}") == model


def test_a_local_folder_wins_over_a_hub_id(hub_cache, tmp_path, monkeypatch):
    local = tmp_path / "test-org" / "tiny-llama"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("test-org/tiny-llama") == Path("test-org/tiny-llama")


def test_an_unknown_id_offline_fails_fast_in_one_line(hub_cache):
    started = time.monotonic()
    with pytest.raises(CheckpointError) as exc:
        resolve_model_dir("nobody/nothing")
    assert time.monotonic() - started < 10
    message = str(exc.value)
    assert "\n" not in message and "nobody/nothing" in message
    assert "download it first" in message and exc.value.status == "FAILED_PRECONDITION"


async def test_an_engine_serves_a_hub_model_and_a_hub_adapter(hub_cache, make_engine):
    _, model, _ = hub_cache
    engine = await make_engine(model_dir="test-org/tiny-llama", adapter_dirs=[])
    assert engine.model_info()["model_path"] == str(model)
    info = await engine.load_adapter("from-hub", source="hf://test-org/tiny-adapter")
    assert info.rank > 0 and info.source == "hf://test-org/tiny-adapter"
    request = GenerationRequest(
        request_id="h1",
        input_ids=[5, 6, 7],
        adapter_id="from-hub",
        params=SamplingParams(max_new_tokens=4, ignore_eos=True),
    )
    events = [e async for e in engine.generate(request)]
    assert sum(len(e.token_ids) for e in events) == 4


def test_serve_with_an_unreachable_hub_model_is_one_line_and_exit_2(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    lorapool = str(Path(sys.executable).with_name("lorapool"))
    proc = subprocess.run(
        [lorapool, "serve", "--model", "nobody/nothing", "--port", "0", "--metrics-port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lorapool serve:")]
    assert len(errors) == 1 and "nobody/nothing" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
