"""Progress bars where a user waits (model loading, hub downloads, `lorapool
bench`), drawn only for someone watching: stderr a terminal, LORAPOOL_PROGRESS=1
or an explicit flag; never in logs, pipes or these tests' captured output."""

from __future__ import annotations

import argparse
import io
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorapool import progress
from lorapool.client.bench import BenchConfig, add_arguments, config_from_args, run_bench_async
from lorapool.memory import sources
from lorapool.server.model.checkpoint import load_tensors


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def no_setting(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)


def test_wanted_follows_flag_then_setting_then_terminal(monkeypatch):
    assert progress.wanted(stream=Terminal()) and not progress.wanted(stream=io.StringIO())
    monkeypatch.setenv(progress.ENV, "1")
    assert progress.wanted(stream=io.StringIO())
    assert not progress.wanted(False, stream=Terminal())  # the flag wins
    monkeypatch.setenv(progress.ENV, "off")
    assert not progress.wanted(stream=Terminal())
    assert progress.wanted(True, stream=io.StringIO())


def test_a_bar_draws_only_when_wanted():
    quiet, shown = io.StringIO(), io.StringIO()
    with progress.bar(3, "work", "it", stream=quiet) as bar:
        bar.update(3)
    with progress.bar(3, "work", "it", flag=True, stream=shown) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""
    assert "work" in shown.getvalue() and "3/3" in shown.getvalue()


# -- model loading -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded(tiny_demo, tmp_path_factory):
    """The tiny demo's weights split over two shards with an index."""
    tensors = load_file(str(tiny_demo.model_dir / "model.safetensors"))
    names = sorted(tensors)
    folder = tmp_path_factory.mktemp("sharded")
    halves = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    weight_map = {}
    for shard, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(folder / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder, tensors


def test_model_loading_shows_a_bar_over_every_shards_tensors(sharded, monkeypatch, capsys):
    folder, expected = sharded
    assert load_tensors(folder).keys() == expected.keys()
    assert capsys.readouterr().err == ""  # captured stderr is no terminal: no bar
    monkeypatch.setenv(progress.ENV, "1")
    loaded = load_tensors(folder)
    err = capsys.readouterr().err
    assert f"loading {folder.name}" in err and f"{len(expected)}/{len(expected)}" in err
    assert all(torch.equal(loaded[n], expected[n]) for n in expected)


# -- hub downloads -------------------------------------------------------------------------


def test_hub_downloads_keep_the_hubs_bars_only_for_someone_watching(monkeypatch, tmp_path):
    asked = []

    def fake_snapshot_download(repo, **kwargs):
        asked.append(kwargs["tqdm_class"])
        return str(tmp_path)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    sources.hub_snapshot("org/adapter", None)  # stderr captured: no terminal
    monkeypatch.setenv(progress.ENV, "1")
    sources.hub_snapshot("org/adapter", None)
    quiet, interactive = asked
    assert interactive is None  # huggingface_hub's own bars
    drawn = io.StringIO()
    bar = quiet(total=5, file=drawn, desc="Fetching 5 files")
    bar.update(5)
    bar.close()
    assert drawn.getvalue() == ""


# -- lorapool bench ------------------------------------------------------------------------


def bench_config(**fields) -> BenchConfig:
    return BenchConfig(
        total=6,
        concurrency=2,
        adapters=2,
        prompt_tokens=(4, 4),
        max_new_tokens=(2, 2),
        input_ids=True,
        **fields,
    )


async def test_bench_shows_requests_done(start_server):
    server = start_server()
    shown, quiet = io.StringIO(), io.StringIO()
    report = await run_bench_async(server.target, bench_config(progress=True), shown)
    assert report.status_codes == {"OK": 6}
    assert "bench" in shown.getvalue() and "6/6" in shown.getvalue()
    assert "0 errors" in shown.getvalue()
    await run_bench_async(server.target, bench_config(progress=None), quiet)
    assert quiet.getvalue() == ""  # not a terminal, nothing asked


def test_bench_progress_flags():
    parser = argparse.ArgumentParser()
    add_arguments(parser, "bench")
    assert config_from_args(parser.parse_args([])).progress is None
    assert config_from_args(parser.parse_args(["--progress"])).progress is True
    assert config_from_args(parser.parse_args(["--no-progress"])).progress is False
