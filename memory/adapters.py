"""Adapter tiers: source -> host memory -> pool pages.

- Source: a directory, the hub, or an operator's registry (memory/sources.py).
- Host tier: packed adapters (ready to copy into pages), LRU, bounded in bytes.
- Device tier: adapters resident in pool pages, keyed by content hash, so the
  same weights under two names share one set of pages.

Loads (fetch, parse, validate, pack) run in a thread pool; concurrent requests
for one adapter share one load. The scheduler decides when to place and evict;
an adapter used by a running sequence is never evicted."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from lorapool.errors import AdapterNotFound, AdapterTooLarge, LoraPoolError
from lorapool.memory.adapter_layout import (
    PackedAdapter,
    PlacedAdapter,
    pack_adapter,
    place_adapter,
    verify_layout,
)
from lorapool.memory.peft_adapter import read_adapter
from lorapool.memory.pool import PagePool
from lorapool.memory.sources import SourceRegistry
from lorapool.types import AdapterInfo, AdapterState


@dataclass
class HostCopy:
    packed: PackedAdapter
    nbytes: int


@dataclass
class Resident:
    placed: PlacedAdapter
    last_used: float = field(default_factory=time.monotonic)


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
        self.host_cache_bytes = host_cache_bytes
        self.entries: dict[str, AdapterEntry] = {}
        self.host: OrderedDict[str, HostCopy] = OrderedDict()  # content hash -> copy, LRU first
        self.device: dict[str, Resident] = {}  # content hash -> resident
        self.loads = 0
        self.evictions = 0
        self._executor = ThreadPoolExecutor(load_threads, thread_name_prefix="adapter-load")
        self._unload_when_idle: set[str] = set()
        self.users: dict[str, int] = {}  # content hash -> running sequences using it
        self.on_load = None  # optional callback(seconds) per completed load, for metrics
        # Pages allocated for a placement that the step thread has not finished yet;
        # `place` moves an entry from here to `device` under the lock, so stats never
        # count an adapter twice or miss it.
        self.reserved: dict[str, tuple] = {}  # key -> (pages, HostCopy)
        self._lock = threading.Lock()

    # -- lookup ---------------------------------------------------------------------
    def entry(self, adapter_id: str, uri: str | None = None) -> AdapterEntry:
        """The entry for an id, creating it when a source knows the id."""
        e = self.entries.get(adapter_id)
        if e is not None and (uri is None or uri == e.uri):
            return e
        uri = uri or self.registry.uri_for(adapter_id)
        if uri is None:
            raise AdapterNotFound(
                f"adapter {adapter_id!r} is unknown: no adapter directory holds it and it "
                "was never loaded; call LoadAdapter with a source"
            )
        e = self.entries[adapter_id] = AdapterEntry(adapter_id, uri)
        return e

    def state(self, e: AdapterEntry) -> AdapterState:
        if e.content_hash and e.content_hash in self.device:
            return AdapterState.DEVICE
        if e.content_hash and e.content_hash in self.host:
            return AdapterState.HOST
        if e.loading is not None and not e.loading.done():
            return AdapterState.LOADING
        return AdapterState.KNOWN

    def needs_load(self, e: AdapterEntry) -> bool:
        """Neither in host memory, nor in the pool, nor loading: a request for it
        waits until ensure_host starts a load."""
        return self.state(e) is AdapterState.KNOWN

    def resident(self, e: AdapterEntry) -> Resident | None:
        return self.device.get(e.content_hash) if e.content_hash else None

    # -- host tier --------------------------------------------------------------------
    def ensure_host(self, e: AdapterEntry) -> asyncio.Future:
        """Start (or join) the load of e into host memory; the future resolves to e
        or raises the load's LoraPoolError."""
        if self.state(e) in (AdapterState.HOST, AdapterState.DEVICE):
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(e)
            return fut
        if e.loading is None or e.loading.done():
            e.loading = asyncio.ensure_future(self._load(e))
        return e.loading

    async def _load(self, e: AdapterEntry) -> AdapterEntry:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            weights, packed = await loop.run_in_executor(self._executor, self._read, e.uri)
        except LoraPoolError:
            raise
        except Exception as exc:  # a source plug-in failed in an unexpected way
            raise AdapterNotFound(f"adapter {e.adapter_id!r}: {exc}") from exc
        need = packed.num_pages(self.pool.page_elems)
        if need > self.pool.num_pages:
            raise AdapterTooLarge(
                f"adapter {e.adapter_id!r} (rank {weights.rank}) needs {need} pages but the pool "
                f"holds {self.pool.num_pages}; start the server with a larger --pool-mib"
            )
        if self.entries.get(e.adapter_id) is not e:  # unloaded while loading
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

    def _read(self, uri: str):
        path = self.registry.fetch(uri)
        weights = read_adapter(path, self.spec)
        packed = pack_adapter(
            self.spec,
            weights.rank,
            weights.scale,
            weights.weights,
            self.pool.dtype,
            self.pool.page_elems,
        )
        verify_layout(self.pool.layout, self.spec, packed, self.pool.dtype)
        return weights, packed

    def _touch_host(self, key: str) -> None:
        self.host.move_to_end(key)
        total = sum(c.nbytes for c in self.host.values())
        for old in list(self.host):
            if total <= self.host_cache_bytes or old == key:
                break
            total -= self.host.pop(old).nbytes

    @property
    def host_bytes(self) -> int:
        return sum(c.nbytes for c in self.host.values())

    # -- device tier --------------------------------------------------------------------
    def pages_needed(self, e: AdapterEntry) -> int:
        copy = self.host[e.content_hash]
        return copy.packed.num_pages(self.pool.page_elems)

    def reserve(self, key: str, pages) -> None:
        """Pages just allocated for placing `key` at the next step. The host copy is
        held with them: a load finishing meanwhile may push it out of the host LRU."""
        with self._lock:
            self.reserved[key] = (pages, self.host[key])

    def unreserve(self, key: str) -> None:
        """Give back the pages of a placement that did not happen."""
        with self._lock:
            held = self.reserved.pop(key, None)
        if held is not None:
            self.pool.allocator.free(held[0])

    def place(self, e: AdapterEntry, pages) -> None:
        """Copy e's packed weights into pages (run on the step thread)."""
        with self._lock:
            held = self.reserved.get(e.content_hash)
        copy = held[1] if held is not None else self.host[e.content_hash]
        placed = place_adapter(self.pool, self.spec, copy.packed, pages, e.content_hash)
        with self._lock:
            self.device[e.content_hash] = Resident(placed)
            self.reserved.pop(e.content_hash, None)

    def placed(self, key: str) -> PlacedAdapter | None:
        """The pages of the resident adapter with content `key`; None for "" (base)."""
        return self.device[key].placed if key else None

    @property
    def device_pages(self) -> int:
        with self._lock:
            placed = sum(r.placed.pages.numel() for r in self.device.values())
            return placed + sum(len(pages) for pages, _ in self.reserved.values())

    def pinned_keys(self) -> set[str]:
        return {e.content_hash for e in self.entries.values() if e.pinned and e.content_hash}

    def evict_idle(self, num_pages: int, keep: set[str] = frozenset()) -> int:
        """Free idle adapters (no running sequence, not pinned, not in keep), least
        recently used first, until num_pages pages were freed."""
        freed = 0
        pinned = self.pinned_keys()
        idle = [
            (r.last_used, key)
            for key, r in list(self.device.items())
            if key not in self.users and key not in pinned and key not in keep
        ]
        for _, key in sorted(idle):
            if freed >= num_pages:
                break
            freed += self._drop_device(key)
            self.evictions += 1
        return freed

    def idle_pages(self, keep: set[str] = frozenset()) -> int:
        pinned = self.pinned_keys()
        return sum(
            r.placed.pages.numel()
            for key, r in list(self.device.items())
            if key not in self.users and key not in pinned and key not in keep
        )

    def _drop_device(self, key: str) -> int:
        with self._lock:
            r = self.device.pop(key)
        self.pool.allocator.free(r.placed.pages.numpy())
        return r.placed.pages.numel()

    # -- use by sequences ---------------------------------------------------------------
    def acquire(self, key: str, entry: AdapterEntry | None) -> None:
        """A sequence using content `key` started running: its pages are pinned."""
        self.users[key] = self.users.get(key, 0) + 1
        if entry is not None:
            entry.requests_served += 1
            entry.last_used = time.time()
        r = self.device.get(key)
        if r is not None:
            r.last_used = time.monotonic()

    def release(self, key: str) -> None:
        n = self.users.get(key, 0) - 1
        if n > 0:
            self.users[key] = n
            return
        self.users.pop(key, None)
        r = self.device.get(key)
        if r is not None:
            r.last_used = time.monotonic()
            if key in self._unload_when_idle:
                self._unload_when_idle.discard(key)
                self._drop_device(key)

    def in_use(self) -> set[str]:
        return set(self.users)

    # -- admin ------------------------------------------------------------------------
    def unload(self, adapter_id: str) -> None:
        """Forget the name; free its host copy and pages unless another name shares
        the same content (pages in use are freed when the last sequence ends)."""
        e = self.entries.pop(adapter_id, None)
        if e is None:
            raise AdapterNotFound(f"adapter {adapter_id!r} is not loaded")
        self.registry.known.pop(adapter_id, None)
        key = e.content_hash
        if not key or any(o.content_hash == key for o in self.entries.values()):
            return
        self.host.pop(key, None)
        r = self.device.get(key)
        if r is not None:
            if key in self.users:
                self._unload_when_idle.add(key)
            else:
                self._drop_device(key)

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
        self._executor.shutdown(wait=False, cancel_futures=True)
