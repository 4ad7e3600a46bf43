"""The adapter tiers outside the engine: host LRU and device placement interplay."""

from __future__ import annotations

import pytest
import torch

from lorapool.memory.adapters import AdapterManager, AdapterState
from lorapool.memory.pool import PageLayout, PagePool
from lorapool.memory.sources import SourceRegistry
from lorapool.server.model.checkpoint import load_spec


@pytest.fixture(scope="module")
def spec(tiny_demo):
    return load_spec(tiny_demo.model_dir)


@pytest.fixture
def pool(spec):
    layout = PageLayout(spec.num_layers, 16, spec.num_kv_heads, spec.head_dim)
    return PagePool(layout, 96, torch.float32, "cpu")


async def test_placement_survives_host_eviction_of_its_copy(spec, pool, tiny_demo):
    """A copy reserved for placement may leave the host LRU (another load finished
    meanwhile) before the step thread places it; the placement must still happen."""
    manager = AdapterManager(SourceRegistry(), pool, spec, host_cache_bytes=1)  # one copy
    try:
        a = manager.entry("a", str(tiny_demo.adapter_dirs[1]))
        await manager.ensure_host(a)
        pages = pool.allocator.allocate(manager.pages_needed(a))
        manager.reserve(a.content_hash, pages)
        b = manager.entry("b", str(tiny_demo.adapter_dirs[2]))
        await manager.ensure_host(b)
        assert a.content_hash not in manager.host, "the host LRU should have dropped a"
        manager.place(a, pages)
        assert manager.state(a) is AdapterState.DEVICE and not manager.reserved
        assert manager.device_pages == len(pages)
        assert pool.allocator.free_count == pool.num_pages - len(pages)
    finally:
        manager.shutdown()


def test_adapter_roots_never_resolve_paths_outside_them(tiny_demo):
    registry = SourceRegistry([tiny_demo.adapters_dir])
    name = tiny_demo.adapter_dirs[0].name
    assert registry.uri_for(name) == str(tiny_demo.adapter_dirs[0])
    for sneaky in (f"../{tiny_demo.adapters_dir.name}/{name}", f"./{name}", "..", f"{name}/"):
        assert registry.uri_for(sneaky) is None, sneaky


async def test_load_threads_run_torch_on_one_thread_at_low_priority(spec, pool, tiny_demo):
    """Loads run beside the step on the same cores: a load thread must not start an
    OpenMP team of its own (the two teams would wait on each other's displaced
    threads), must leave the other threads' team sizes as they were, and yields
    the cores to the step's threads."""
    import os
    import sys
    import threading

    from lorapool.memory.adapter_cache import LOAD_NICE

    manager = AdapterManager(SourceRegistry(), pool, spec, host_cache_bytes=1 << 30)
    try:
        seen = {}

        def probe():
            seen["threads"] = torch.get_num_threads()
            if sys.platform == "linux":
                seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        manager.cache._executor.submit(probe).result()
        assert seen["threads"] == 1
        if sys.platform == "linux":
            assert seen["nice"] >= min(19, os.getpriority(os.PRIO_PROCESS, 0) + LOAD_NICE)
        before = torch.get_num_threads()
        e = manager.entry("a", str(tiny_demo.adapter_dirs[1]))
        await manager.cache.ensure_host(e)  # a load ran on such a thread
        assert torch.get_num_threads() == before
    finally:
        manager.shutdown()
