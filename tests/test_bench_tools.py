"""The pure parts of the peer benchmark and the benchmark report: the seeded
trace and fleet every system is given, and the table and page rendered from
saved results (so a broken renderer shows up here, not after an hour of
measuring)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import peer_table  # noqa: E402
import peer_workload  # noqa: E402

TRACE = {"requests": 40, "adapters": 32, "zipf": 1.0, "prompt": (8, 64), "output": (8, 64)}


def _trace(seed: int = 0, base: bool = False):
    t = TRACE
    return peer_workload.peer_trace(
        t["requests"], t["adapters"], t["zipf"], t["prompt"], t["output"], seed, base=base
    )


def test_trace_is_seeded_and_reproducible():
    a, b = _trace(seed=3), _trace(seed=3)
    assert a == b
    assert a != _trace(seed=4)
    lengths = [(it.prompt_tokens, it.max_new_tokens) for it in a]
    assert all(8 <= p <= 64 and 8 <= o <= 64 for p, o in lengths)
    assert all(it.adapter_id for it in a)
    assert {it.adapter_id for it in a} <= {f"adapter-{i:03d}" for i in range(32)}
    # power law: the most popular adapter is asked for more than a uniform share
    ids = [it.adapter_id for it in a]
    assert ids.count("adapter-000") > len(ids) / 32


def test_base_trace_is_the_same_work_without_adapters():
    lora, base = _trace(), _trace(base=True)
    assert all(it.adapter_id == "" for it in base)
    strip = lambda t: [(i.prompt_tokens, i.max_new_tokens, i.prompt_seed) for i in t]  # noqa: E731
    assert strip(lora) == strip(base)
    facts = peer_workload.trace_facts(lora)
    assert facts["generated_tokens"] == sum(it.max_new_tokens for it in lora)
    assert peer_workload.trace_facts(base)["distinct_adapters"] == 0


def test_fleet_covers_every_rank_and_target_pairing():
    specs = peer_workload.fleet_specs(32)
    assert [s["name"] for s in specs[:2]] == ["adapter-000", "adapter-001"]
    pairs = {(s["rank"], tuple(s["targets"])) for s in specs[:12]}
    assert len(pairs) == len(peer_workload.RANKS) * len(peer_workload.TARGETS)
    assert {s["rank"] for s in specs} == {8, 16, 32, 64}


def test_job_requests_carry_exact_prompts():
    trace = _trace()[:3]
    reqs = peer_workload.job_requests(trace, 8192)
    assert [len(r["prompt_ids"]) for r in reqs] == [it.prompt_tokens for it in trace]
    assert reqs == peer_workload.job_requests(trace, 8192)
    assert all(100 <= t < 8192 for r in reqs for t in r["prompt_ids"])


def _run(tok_s: float, share: float) -> dict:
    return {
        "tok_s": tok_s,
        "limit_share": share,
        "limit_tok_s": 2000.0,
        "tokens": 100,
        "wall_s": 100 / tok_s,
    }


PEERS = {
    "config": {
        "adapters": 32,
        "streams": 128,
        "hf_batch": 16,
        "max_loras": 32,
        "max_lora_rank": 64,
        "seed": 0,
        "zipf": 1.0,
        "ranks": [8, 16, 32, 64],
        "prompt": [8, 64],
        "output": [8, 64],
        "quick": False,
    },
    "machine": {"cpu": "Test CPU", "cores": 2, "torch": "2.13.0+cpu", "date": "2026-12-01"},
    "model": {
        "arch": "llama",
        "hidden": 512,
        "layers": 8,
        "heads": 8,
        "kv_heads": 2,
        "vocab": 8192,
    },
    "trace": {
        "requests": 128,
        "prompt_tokens": 4600,
        "generated_tokens": 4700,
        "distinct_adapters": 30,
        "top_adapter_share": 0.25,
    },
    "limit": {"batch": 128, "tok_s": 2000.0, "samples": [1900.0, 2000.0, 2100.0]},
    "systems": {
        "lorapool": {"base": _run(800.0, 0.8), "adapters": _run(600.0, 0.6)},
        "vllm": {"base": _run(400.0, 0.4), "adapters": _run(40.0, 0.04)},
        "hf": {"base": _run(320.0, 0.3), "adapters": _run(160.0, 0.15)},
    },
    "vllm": {"version": "0.32.0", "torch": "2.13.0+cpu", "engine": {"dtype": "float32"}},
    "agreement_vllm_hf": {"base": {"identical": 120, "compared": 128, "mean_prefix": 0.97}},
}


def test_peer_table_shows_each_system_and_the_ratios():
    text = peer_table.text_table(PEERS)
    lines = text.splitlines()
    row = next(line for line in lines if line.startswith("lorapool"))
    assert row.split()[-5:] == ["800", "600", "0.80", "0.60", "0.75"]
    assert "vLLM 0.32.0 CPU build" in text and "max_lora_rank 64" in text
    assert "128 requests" in text and "4600 prompt + 4700 generated" in text
    r = peer_table.ratios(PEERS)
    assert r["lorapool / vLLM, adapters"] == pytest.approx(15.0)
    assert r["lorapool / HF/PEFT, base"] == pytest.approx(2.5)
    md = peer_table.markdown_table(PEERS).splitlines()
    assert md[0].startswith("| system |") and len(md) == 2 + 3


def test_peer_table_marks_a_system_that_did_not_run():
    partial = copy.deepcopy(PEERS)
    del partial["systems"]["vllm"]
    partial["systems"]["hf"].pop("adapters")
    text = peer_table.text_table(partial)
    assert "vLLM" not in text.split("\n\n")[0]
    hf = next(line for line in text.splitlines() if line.startswith("HF"))
    assert hf.split()[-5:] == ["320", "-", "0.30", "-", "-"]
    assert peer_table.ratios(partial)["lorapool / vLLM, base"] is None


def _report_data() -> dict:
    engine = {
        "config": {"steps": 4, "repeats": 2, "prompt_len": 16},
        "results": [
            {
                "batch": 16,
                "adapters": n,
                "distinct": min(16, n),
                "engine_tok_s": 900.0 - 10 * n,
                "limit_tok_s": 1200.0,
                "ratio_limit": (900.0 - 10 * n) / 1200.0,
                "ratio_base": None if n == 0 else (900.0 - 10 * n) / 900.0,
                "other_load": 0.05,
            }
            for n in (0, 1, 4, 16)
        ],
    }
    level = {"ok": 8, "tok_s": 100.0, "mean_batch": 3.0}
    levels = [
        level
        | {
            "rps": rps,
            "requests": 8,
            "ttft_ms": {"p50": 20.0 * rps, "p90": 30.0 * rps, "p99": 40.0 * rps},
            "itl_ms": {"p50": 5.0, "p99": None},
        }
        for rps in (2.0, 4.0)
    ]
    adapters = [
        {
            "name": f"adapter-{i:03d}",
            "rank": r,
            "modules": m,
            "raw_bytes": 1000 * r * (1 + len(m)),
            "pages": r,
            "page_bytes_held": 1100 * r * (1 + len(m)),
            "efficiency": 1 / 1.1,
        }
        for i, (r, m) in enumerate([(8, "q,v"), (64, "q,k,v,o,gate,up,down")])
    ]
    pool = {
        "page_bytes": 32768,
        "block_size": 16,
        "dtype": "float32",
        "adapters": adapters,
        "summary": {
            "count": 2,
            "efficiency_total": 0.9,
            "pages_total": 72,
            "raw_bytes_total": 10**6,
            "fixed_slot_pages": 128,
        },
    }
    m = PEERS["machine"]
    return {
        "engine": {"command": "python benchmarks/bench_engine.py", "data": engine, "machine": m},
        "peers": {"command": "python benchmarks/bench_peers.py", "data": PEERS, "machine": m},
        "load": {
            "command": "python benchmarks/report.py --rps 2,4",
            "setup": {
                "adapters": 32,
                "prompt": [8, 64],
                "output": [8, 64],
                "zipf": 1.0,
                "server": "lorapool serve --pool-mib 512",
            },
            "levels": levels,
            "machine": m,
        },
        "pool": {"command": "python benchmarks/report.py", "data": pool, "machine": m},
    }


def test_report_renders_every_section_with_command_and_machine(tmp_path):
    pytest.importorskip("matplotlib")
    import report

    data = _report_data()
    images = report.draw(data, tmp_path)
    assert set(images) == {"engine", "peers", "load", "pool"}
    for rel in images.values():
        png = tmp_path / rel
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size < 100_000
    page = report.render(data, images)
    for title in ("distinct adapters", "peers on one trace", "offered load", "page efficiency"):
        assert title in page
    assert page.count("Machine: Test CPU, 2 cores, torch 2.13.0+cpu") == 4
    assert "`python benchmarks/bench_peers.py`" in page
    assert "| 16 | 4 | 4 | 860 | 1200 | 0.72 | 0.96 | 5% |" in page
    assert "| 4 | 8 | 8 | 100 | 80 | 120 | 160 | 5.0 | - | 3.0 |" in page
    assert "shared with other work" in page
    for rel in images.values():
        assert f"]({rel})" in page
