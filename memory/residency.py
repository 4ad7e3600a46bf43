"""The device tier: adapters resident in pool pages, keyed by content hash, so
the same weights under two names share one set of pages.

A placement is reserved first (pages allocated by the scheduler, the host copy
held with them), then placed on the step thread (weights copied into the pages).
Running sequences acquire and release the adapter they use: one in use is never
evicted, and an unloaded one is dropped when its last user releases it."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Set
from dataclasses import dataclass, field

from lorapool.memory.adapter_cache import HostCopy
from lorapool.memory.adapter_layout import PlacedAdapter, place_adapter
from lorapool.memory.pool import PagePool


@dataclass
class Resident:
    placed: PlacedAdapter
    last_used: float = field(default_factory=time.monotonic)


class Residency:
    def __init__(self, pool: PagePool, spec):
        self.pool = pool
        self.spec = spec
        self.device: dict[str, Resident] = {}  # content hash -> resident
        self.users: dict[str, int] = {}  # content hash -> running sequences using it
        self.evictions = 0
        self._unload_when_idle: set[str] = set()
        # Pages allocated for a placement that the step thread has not finished yet;
        # `place` moves an entry from here to `device` under the lock, so stats never
        # count an adapter twice or miss it.
        self.reserved: dict[str, tuple] = {}  # key -> (pages, HostCopy)
        self._lock = threading.Lock()

    def resident(self, key: str) -> Resident | None:
        return self.device.get(key) if key else None

    # -- placement ----------------------------------------------------------------------
    def reserve(self, key: str, pages, copy: HostCopy) -> None:
        """Pages just allocated for placing `key` at the next step. The host copy is
        held with them: a load finishing meanwhile may push it out of the host LRU."""
        with self._lock:
            self.reserved[key] = (pages, copy)

    def unreserve(self, key: str) -> None:
        """Give back the pages of a placement that did not happen."""
        with self._lock:
            held = self.reserved.pop(key, None)
        if held is not None:
            self.pool.allocator.free(held[0])

    def place(self, key: str, pages, host: Mapping[str, HostCopy]) -> None:
        """Copy the packed weights of `key` into pages (run on the step thread): the
        reserved copy, else the one in `host`."""
        with self._lock:
            held = self.reserved.get(key)
        copy = held[1] if held is not None else host[key]
        placed = place_adapter(self.pool, self.spec, copy.packed, pages, key)
        with self._lock:
            self.device[key] = Resident(placed)
            self.reserved.pop(key, None)

    def placed(self, key: str) -> PlacedAdapter | None:
        """The pages of the resident adapter with content `key`; None for "" (base)."""
        return self.device[key].placed if key else None

    @property
    def device_pages(self) -> int:
        with self._lock:
            placed = sum(r.placed.pages.numel() for r in self.device.values())
            return placed + sum(len(pages) for pages, _ in self.reserved.values())

    # -- eviction -------------------------------------------------------------------------
    def evict_idle(self, num_pages: int, keep: Set[str] = frozenset()) -> int:
        """Free idle adapters (no running sequence, not in keep), least recently used
        first, until num_pages pages were freed."""
        freed = 0
        idle = [
            (r.last_used, key)
            for key, r in list(self.device.items())
            if key not in self.users and key not in keep
        ]
        for _, key in sorted(idle):
            if freed >= num_pages:
                break
            freed += self.drop(key)
            self.evictions += 1
        return freed

    def idle_pages(self, keep: Set[str] = frozenset()) -> int:
        return sum(
            r.placed.pages.numel()
            for key, r in list(self.device.items())
            if key not in self.users and key not in keep
        )

    def drop(self, key: str) -> int:
        """Free the pages of a resident adapter; returns how many."""
        with self._lock:
            r = self.device.pop(key)
        self.pool.allocator.free(r.placed.pages.numpy())
        return r.placed.pages.numel()

    def unload(self, key: str) -> None:
        """Drop `key` now, or when its last running sequence releases it."""
        if key not in self.device:
            return
        if key in self.users:
            self._unload_when_idle.add(key)
        else:
            self.drop(key)

    # -- use by sequences ---------------------------------------------------------------
    def acquire(self, key: str) -> None:
        """A sequence using content `key` started running: its pages are pinned."""
        self.users[key] = self.users.get(key, 0) + 1
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
                self.drop(key)

    def in_use(self) -> set[str]:
        return set(self.users)
