"""Adapter tiers: source -> host memory -> pool pages.

- Source: a directory, the hub, or an operator's registry (memory/sources.py).
- Host tier and entries: memory/adapter_cache.py (packed adapters, LRU, bounded
  in bytes; loads in a thread pool, concurrent requests for one adapter share one).
- Device tier: memory/residency.py (adapters resident in pool pages, keyed by
  content hash, so the same weights under two names share one set of pages).

AdapterManager joins the two: an adapter's state spans both tiers, pins are entry
flags the device tier must respect, and unloading a name touches both. The
scheduler decides when to place and evict; an adapter used by a running sequence
is never evicted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Set
from pathlib import Path

from lorapool.memory.adapter_cache import AdapterCache, AdapterEntry, HostCopy, done
from lorapool.memory.adapter_layout import (
    PlacedAdapter,
    pack_adapter,
    verify_layout,
)
from lorapool.memory.peft_adapter import read_adapter
from lorapool.memory.pool import PagePool
from lorapool.memory.residency import Residency, Resident
from lorapool.memory.sources import SourceRegistry
from lorapool.types import AdapterInfo, AdapterState

__all__ = ["AdapterEntry", "AdapterManager", "AdapterState", "HostCopy", "Resident"]


class AdapterManager:
    def __init__(
        self,
        registry: SourceRegistry,
        pool: PagePool,
        spec,
        host_cache_bytes: int,
        load_threads: int = 2,
    ):
        self.registry = registry
        self.pool = pool
        self.spec = spec
        # The reader is looked up on every load, so that wrapping the method (as
        # benchmarks/bench_trace.py does to time it) takes effect.
        self.cache = AdapterCache(
            registry, pool, host_cache_bytes, lambda uri: self._read(uri), load_threads
        )
        self.residency = Residency(pool, spec)

    # -- the tiers' tables and counters, under their historical names -------------------
    @property
    def entries(self) -> dict[str, AdapterEntry]:
        return self.cache.entries

    @property
    def host(self):
        return self.cache.host

    @property
    def host_cache_bytes(self) -> int:
        return self.cache.host_cache_bytes

    @property
    def device(self) -> dict[str, Resident]:
        return self.residency.device

    @property
    def reserved(self) -> dict[str, tuple]:
        return self.residency.reserved

    @property
    def users(self) -> dict[str, int]:
        return self.residency.users

    @property
    def loads(self) -> int:
        return self.cache.loads

    @property
    def evictions(self) -> int:
        return self.residency.evictions

    @property
    def on_load(self):
        """Optional callback(seconds) per completed load, for metrics."""
        return self.cache.on_load

    @on_load.setter
    def on_load(self, callback) -> None:
        self.cache.on_load = callback

    # -- lookup ---------------------------------------------------------------------
    def entry(self, adapter_id: str, uri: str | None = None) -> AdapterEntry:
        """The entry for an id, creating it when a source knows the id."""
        return self.cache.entry(adapter_id, uri)

    async def load(self, adapter_id: str, source: str | None = None) -> AdapterEntry:
        """The name's entry with its weights in host memory (or the pool), loading
        them from `source` (default: what a source knows of the name). A load that
        fails leaves no trace: a served name keeps serving what it served (a new
        source loads beside it, staged, and replaces it on success), and a new
        name's entry, visible while it loads so that requests join the load, is
        removed again."""
        old = self.entries.get(adapter_id)
        if source and old is not None and old.uri != source:
            staged = self.cache.stage(adapter_id, source)
            await self.ensure_host(staged)
            self.unload(adapter_id)
            self.cache.adopt(staged)
            self.registry.remember(adapter_id, source)
        entry = self.entry(adapter_id, source)
        try:
            await self.ensure_host(entry)
        except BaseException:
            if old is None and self.entries.get(adapter_id) is entry:
                self.unload(adapter_id)
            raise
        if source:
            self.registry.remember(adapter_id, source)
        return entry

    def knows(self, adapter_id: str) -> bool:
        """Loaded, or a source knows the name (nothing is fetched)."""
        return adapter_id in self.entries or self.registry.uri_for(adapter_id) is not None

    def list_infos(self) -> list[AdapterInfo]:
        """Every loaded adapter and every one a source lists, by name."""
        infos = {e.adapter_id: self.info(e) for e in self.entries.values()}
        for adapter_id, uri in self.registry.listable().items():
            if adapter_id not in infos:
                infos[adapter_id] = AdapterInfo(adapter_id, AdapterState.KNOWN, source=uri)
        return [infos[k] for k in sorted(infos)]

    def state(self, e: AdapterEntry) -> AdapterState:
        if e.content_hash and e.content_hash in self.residency.device:
            return AdapterState.DEVICE
        if self.cache.in_host(e):
            return AdapterState.HOST
        if self.cache.is_loading(e):
            return AdapterState.LOADING
        return AdapterState.KNOWN

    def needs_load(self, e: AdapterEntry) -> bool:
        """Neither in host memory, nor in the pool, nor loading: a request for it
        waits until ensure_host starts a load."""
        return self.state(e) is AdapterState.KNOWN

    def resident(self, e: AdapterEntry) -> Resident | None:
        return self.residency.resident(e.content_hash)

    # -- host tier --------------------------------------------------------------------
    def ensure_host(self, e: AdapterEntry) -> asyncio.Future:
        """Start (or join) the load of e into host memory; the future resolves to e
        or raises the load's LoraPoolError. Already resident in the pool: done."""
        if self.resident(e) is not None:
            return done(e)
        return self.cache.ensure_host(e)

    def _read(self, uri: str):
        """Fetch, parse, validate and pack one adapter (on a load thread)."""
        path = self.registry.fetch(uri)
        # Messages name the adapter by its folder or URI, never a server path.
        label = uri if "://" in uri else Path(path).name
        weights = read_adapter(path, self.spec, label=label)
        packed = pack_adapter(self.spec, weights, self.pool.dtype, self.pool.page_elems)
        verify_layout(self.pool.layout, self.spec, packed, self.pool.dtype)
        return weights, packed

    @property
    def host_bytes(self) -> int:
        return self.cache.host_bytes

    # -- device tier --------------------------------------------------------------------
    def pages_needed(self, e: AdapterEntry) -> int:
        return self.cache.pages_needed(e)

    def reserve(self, key: str, pages) -> None:
        """Pages just allocated for placing `key` at the next step. The host copy is
        held with them: a load finishing meanwhile may push it out of the host LRU."""
        self.residency.reserve(key, pages, self.cache.host[key])

    def unreserve(self, key: str) -> None:
        """Give back the pages of a placement that did not happen."""
        self.residency.unreserve(key)

    def place(self, e: AdapterEntry, pages) -> None:
        """Copy e's packed weights into pages (run on the step thread)."""
        self.residency.place(e.content_hash, pages, self.cache.host)

    def placed(self, key: str) -> PlacedAdapter | None:
        """The pages of the resident adapter with content `key`; None for "" (base)."""
        return self.residency.placed(key)

    @property
    def device_pages(self) -> int:
        return self.residency.device_pages

    def pinned_keys(self) -> set[str]:
        return {e.content_hash for e in self.entries.values() if e.pinned and e.content_hash}

    def pinned_pages(self, exclude: str = "") -> int:
        """Pool pages held by pinned resident adapters other than `exclude`: pages
        no request for another adapter can ever have."""
        pinned = self.pinned_keys() - {exclude}
        return sum(r.placed.pages.numel() for key, r in list(self.device.items()) if key in pinned)

    def evict_idle(self, num_pages: int, keep: Set[str] = frozenset()) -> int:
        """Free idle adapters (no running sequence, not pinned, not in keep), least
        recently used first, until num_pages pages were freed."""
        return self.residency.evict_idle(num_pages, keep | self.pinned_keys())

    def idle_pages(self, keep: Set[str] = frozenset()) -> int:
        return self.residency.idle_pages(keep | self.pinned_keys())

    # -- use by sequences ---------------------------------------------------------------
    def acquire(self, key: str, entry: AdapterEntry | None) -> None:
        """A sequence using content `key` started running: its pages are pinned."""
        self.residency.acquire(key)
        if entry is not None:
            entry.requests_served += 1
            entry.last_used = time.time()

    def release(self, key: str) -> None:
        self.residency.release(key)

    def in_use(self) -> set[str]:
        return self.residency.in_use()

    # -- admin ------------------------------------------------------------------------
    def unload(self, adapter_id: str) -> None:
        """Forget the name; free its host copy and pages unless another name shares
        the same content (pages in use are freed when the last sequence ends)."""
        e = self.cache.forget(adapter_id)
        key = e.content_hash
        if not key or self.cache.shared(key):
            return
        self.cache.drop_host(key)
        self.residency.unload(key)

    def info(self, e: AdapterEntry) -> AdapterInfo:
        r = self.resident(e)
        return AdapterInfo(
            adapter_id=e.adapter_id,
            state=self.state(e),
            source=e.uri,
            rank=e.rank,
            alpha=e.alpha,
            target_modules=list(e.target_modules),
            pages=r.placed.pages.numel() if r else 0,
            bytes=e.nbytes,
            content_hash=e.content_hash,
            pinned=e.pinned,
            requests_served=e.requests_served,
            running_requests=self.users.get(key, 0) if (key := e.content_hash) else 0,
            last_used=e.last_used,
            load_ms=e.load_ms,
        )

    def shutdown(self) -> None:
        self.cache.shutdown()
