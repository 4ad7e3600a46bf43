"""A C++-style page allocator: the free list is a stack in one preallocated int32
array, reference counts live in another. No Python object exists per page, every
operation is O(1) per page, and batches are numpy slices.

Invariants (checked by tests/test_allocator.py):
- a page is either on the free stack (refcount 0) or owned (refcount >= 1), never both;
- free_count + pages with refcount > 0 == num_pages;
- misuse (double free, foreign page id, sharing a free page) raises before any
  state changes, so a bad call never corrupts the pool.
"""

from __future__ import annotations

import numpy as np


class PageError(Exception):
    """Base class of allocator misuse and exhaustion."""


class OutOfPages(PageError):
    pass


class DoubleFree(PageError):
    pass


class ForeignPage(PageError):
    pass


class PageAllocator:
    def __init__(self, num_pages: int):
        if num_pages <= 0:
            raise ValueError(f"a pool needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        # Stack of free page ids; the top is self._top - 1. Low ids are handed out
        # first so that a fresh pool fills from the front (easier to read in tests).
        self._stack = np.arange(num_pages - 1, -1, -1, dtype=np.int32)
        self._top = num_pages
        self._refs = np.zeros(num_pages, dtype=np.int32)

    @property
    def free_count(self) -> int:
        return self._top

    @property
    def used_count(self) -> int:
        return self.num_pages - self._top

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= self._top

    def allocate(self, n: int) -> np.ndarray:
        """Take n pages, each with refcount 1. Raises OutOfPages and takes nothing
        when fewer than n are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > self._top:
            raise OutOfPages(f"need {n} pages, {self._top} free of {self.num_pages}")
        pages = self._stack[self._top - n : self._top][::-1].copy()
        self._top -= n
        self._refs[pages] = 1
        return pages

    def share(self, pages) -> None:
        """Add one reference to each owned page (a prefix-cache hit)."""
        pages = self._checked(pages)
        if pages.size and (self._refs[pages] <= 0).any():
            bad = pages[self._refs[pages] <= 0]
            raise DoubleFree(f"cannot share free pages {bad[:8].tolist()}")
        np.add.at(self._refs, pages, 1)

    def free(self, pages) -> np.ndarray:
        """Drop one reference from each page; pages that reach zero go back on
        the free stack and are returned. Repeated ids in one call count twice."""
        pages = self._checked(pages)
        if not pages.size:
            return pages
        ids, counts = np.unique(pages, return_counts=True)
        if (self._refs[ids] < counts).any():
            bad = ids[self._refs[ids] < counts]
            raise DoubleFree(f"pages {bad[:8].tolist()} freed more often than owned")
        self._refs[ids] -= counts.astype(np.int32)
        released = ids[self._refs[ids] == 0].astype(np.int32)
        n = released.size
        self._stack[self._top : self._top + n] = released[::-1]
        self._top += n
        return released

    def refcount(self, page: int) -> int:
        self._checked([page])
        return int(self._refs[page])

    def refcounts(self, pages) -> np.ndarray:
        return self._refs[self._checked(pages)]

    def _checked(self, pages) -> np.ndarray:
        raw = np.asarray(pages.cpu() if hasattr(pages, "cpu") else pages).reshape(-1)
        if raw.size and raw.dtype.kind not in "iu":
            raise ForeignPage(f"page ids must be integers, got {raw.dtype}")
        arr = raw.astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.num_pages):
            bad = arr[(arr < 0) | (arr >= self.num_pages)]
            raise ForeignPage(f"page ids {bad[:8].tolist()} not in pool of {self.num_pages}")
        return arr.astype(np.int32)
