"""Shared fixtures: the tiny demo model with its adapters, and engines built on it."""

from __future__ import annotations

import pytest

DEMO_ADAPTERS = 20


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """The tiny demo model and DEMO_ADAPTERS adapters (adapter-000 ... adapter-019)."""
    from lorapool.server.demo import make_demo

    return make_demo(tmp_path_factory.mktemp("demo"), preset="tiny", n_adapters=DEMO_ADAPTERS)


@pytest.fixture
async def make_engine(tiny_demo):
    """Factory: `await make_engine(pool_pages=..., **EngineConfig fields)` returns a
    started Engine on the tiny demo; every engine is stopped at teardown. pool_pages
    sizes the pool in pages instead of MiB."""
    from lorapool.server.engine import Engine, EngineConfig

    engines = []

    async def factory(pool_pages: int | None = None, **overrides):
        overrides.setdefault("model_dir", str(tiny_demo.model_dir))
        overrides.setdefault("adapter_dirs", [str(tiny_demo.adapters_dir)])
        engine = Engine(EngineConfig(**overrides))
        if pool_pages is not None:
            page_bytes = engine.pool.page_bytes
            overrides["pool_mib"] = pool_pages * page_bytes / 2**20
            engine = Engine(EngineConfig(**overrides))
            assert engine.pool.num_pages == pool_pages
        await engine.start()
        engines.append(engine)
        return engine

    yield factory
    for engine in engines:
        await engine.stop()


@pytest.fixture(scope="session")
def tiny_qwen2_demo(tmp_path_factory):
    """The tiny demo as Qwen2 (q/k/v biases, tied embeddings) with 6 adapters."""
    from lorapool.server.demo import make_demo

    return make_demo(
        tmp_path_factory.mktemp("demo-qwen2"), preset="tiny", arch="qwen2", n_adapters=6
    )
