"""Adapter entries and the host tier: source -> host memory.

- Entries: one per adapter name, created when a source knows the name; a load
  fills in the content identity (hash of the weights), rank and modules.
- Host tier: packed adapters (ready to copy into pages), LRU, bounded in bytes.

Loads (fetch, parse, validate, pack) run in a thread pool; concurrent requests
for one adapter share one load. Which adapters sit in pool pages is
memory/residency.py's business; memory/adapters.py joins the two tiers."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from lorapool.errors import AdapterNotFound, AdapterTooLarge, LoraPoolError
from lorapool.memory.adapter_layout import PackedAdapter
from lorapool.memory.pool import PagePool
from lorapool.memory.sources import SourceRegistry

LOAD_NICE = 10  # load threads run this much nicer: they yield the cores to the step's


def one_thread_per_load() -> None:
    """A load thread runs its torch ops (checks, packing) on itself alone: with an
    OpenMP team of its own, each load would compete with the step's team for the
    cores and both would wait at their barriers for threads the other displaced
    (measured: steps twice as long while 1000 adapters churn on 2 cores). OpenMP
    team sizes are per thread; torch sets this thread's on its first parallel op,
    so that op runs first and the size is then lowered to 1 in the runtime torch
    loaded (where there is none, torch runs single-threaded anyway). On Linux the
    thread also runs nicer, so a load takes the cores the step leaves idle instead
    of displacing its threads (1000-adapter trace: 0.47 -> about 1.0 of the
    100-adapter throughput on 2 cores)."""
    if sys.platform == "linux":  # threads have their own nice value there
        with contextlib.suppress(OSError):
            tid = threading.get_native_id()
            nice = os.getpriority(os.PRIO_PROCESS, tid)
            os.setpriority(os.PRIO_PROCESS, tid, min(19, nice + LOAD_NICE))
    torch.ones(2).sum()
    for name in ("libgomp.so.1", "libiomp5.so", "libomp.so"):
        try:
            runtime = ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except (OSError, AttributeError):
            continue
        runtime.omp_set_num_threads(1)


@dataclass
class HostCopy:
    packed: PackedAdapter
    nbytes: int


@dataclass
class AdapterEntry:
    adapter_id: str
    uri: str
    content_hash: str = ""
    rank: int = 0
    alpha: float = 0.0
    target_modules: list[str] = field(default_factory=list)
    nbytes: int = 0
    pinned: bool = False
    requests_served: int = 0
    last_used: float = 0.0  # unix time
    load_ms: float = 0.0
    loading: asyncio.Future | None = None
    staged: bool = False  # loading under its name without being visible (see stage)


class AdapterCache:
    """Entries by name and packed copies by content hash (LRU, at most
    host_cache_bytes). `read(uri)` fetches, parses, validates and packs one
    adapter, returning (AdapterWeights, PackedAdapter); it runs on a load thread."""

    def __init__(
        self,
        registry: SourceRegistry,
        pool: PagePool,
        host_cache_bytes: int,
        read: Callable[[str], tuple],
        load_threads: int = 2,
    ):
        self.registry = registry
        self.pool = pool
        self.host_cache_bytes = host_cache_bytes
        self.read = read
        self.entries: dict[str, AdapterEntry] = {}
        self.host: OrderedDict[str, HostCopy] = OrderedDict()  # content hash -> copy, LRU first
        self.loads = 0
        self.on_load = None  # optional callback(seconds) per completed load, for metrics
        self._executor = ThreadPoolExecutor(
            load_threads, thread_name_prefix="adapter-load", initializer=one_thread_per_load
        )

    # -- entries ----------------------------------------------------------------------
    def entry(self, adapter_id: str, uri: str | None = None) -> AdapterEntry:
        """The entry for an id, creating it when a source knows the id."""
        e = self.entries.get(adapter_id)
        if e is not None and (uri is None or uri == e.uri):
            return e
        uri = uri or self.registry.uri_for(adapter_id)
        if uri is None:
            raise AdapterNotFound(
                f"adapter {adapter_id!r} is unknown: no adapter directory holds it and it "
                "was never loaded; call LoadAdapter with a source",
                adapter_id=adapter_id,
            )
        e = self.entries[adapter_id] = AdapterEntry(adapter_id, uri)
        return e

    def stage(self, adapter_id: str, uri: str) -> AdapterEntry:
        """An entry for a new source of a name, invisible until `adopt`: a load that
        fails leaves the name (and whatever it served) as it was."""
        return AdapterEntry(adapter_id, uri, staged=True)

    def adopt(self, e: AdapterEntry) -> None:
        """Make a staged entry the name's entry."""
        e.staged = False
        self.entries[e.adapter_id] = e

    def forget(self, adapter_id: str) -> AdapterEntry:
        """Drop the name (and what the registry remembers of it); returns its entry."""
        e = self.entries.pop(adapter_id, None)
        if e is None:
            raise AdapterNotFound(f"adapter {adapter_id!r} is not loaded", adapter_id=adapter_id)
        self.registry.known.pop(adapter_id, None)
        return e

    def shared(self, key: str) -> bool:
        """Whether some entry still has content `key`."""
        return any(o.content_hash == key for o in self.entries.values())

    # -- host tier --------------------------------------------------------------------
    def in_host(self, e: AdapterEntry) -> bool:
        return bool(e.content_hash) and e.content_hash in self.host

    def is_loading(self, e: AdapterEntry) -> bool:
        return e.loading is not None and not e.loading.done()

    def ensure_host(self, e: AdapterEntry) -> asyncio.Future:
        """Start (or join) the load of e into host memory; the future resolves to e
        or raises the load's LoraPoolError."""
        if self.in_host(e):
            return done(e)
        if e.loading is None or e.loading.done():
            e.loading = asyncio.ensure_future(self._load(e))
        return e.loading

    async def _load(self, e: AdapterEntry) -> AdapterEntry:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            weights, packed = await loop.run_in_executor(self._executor, self.read, e.uri)
        except LoraPoolError as exc:
            exc.metadata.setdefault("adapter_id", e.adapter_id)
            raise
        except Exception as exc:  # a source plug-in failed in an unexpected way
            raise AdapterNotFound(f"adapter {e.adapter_id!r}: {exc}") from exc
        need = packed.num_pages(self.pool.page_elems)
        if need > self.pool.num_pages:
            raise AdapterTooLarge(
                f"adapter {e.adapter_id!r} (rank {weights.rank}) needs {need} pages but the pool "
                f"holds {self.pool.num_pages}; start the server with a larger --pool-mib"
            )
        if not e.staged and self.entries.get(e.adapter_id) is not e:  # unloaded meanwhile
            raise AdapterNotFound(f"adapter {e.adapter_id!r} was unloaded while loading")
        e.content_hash = weights.content_hash
        e.rank, e.alpha, e.nbytes = weights.rank, weights.alpha, weights.nbytes
        e.target_modules = weights.target_modules
        e.load_ms = (time.perf_counter() - t0) * 1000
        self.loads += 1
        if self.on_load is not None:
            self.on_load(e.load_ms / 1000)
        if e.content_hash not in self.host:
            self.host[e.content_hash] = HostCopy(
                packed, packed.flat.numel() * packed.flat.element_size()
            )
        self._touch_host(e.content_hash)
        return e

    def _touch_host(self, key: str) -> None:
        self.host.move_to_end(key)
        total = sum(c.nbytes for c in self.host.values())
        for old in list(self.host):
            if total <= self.host_cache_bytes or old == key:
                break
            total -= self.host.pop(old).nbytes

    def drop_host(self, key: str) -> None:
        self.host.pop(key, None)

    def pages_needed(self, e: AdapterEntry) -> int:
        """Pool pages of e's packed copy (which must be in host memory)."""
        copy = self.host[e.content_hash]
        return copy.packed.num_pages(self.pool.page_elems)

    @property
    def host_bytes(self) -> int:
        return sum(c.nbytes for c in self.host.values())

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def done(value) -> asyncio.Future:
    """A future of the running loop that already holds value."""
    fut = asyncio.get_running_loop().create_future()
    fut.set_result(value)
    return fut
