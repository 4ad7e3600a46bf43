"""KV block tables and the prefix cache (vLLM / nano-vllm style).

A sequence owns one page per block_size tokens. A full block's identity is an
xxhash chained over (adapter content identity, previous block's hash, its token
ids): equal chains mean equal K/V, so such blocks are shared by refcount. The
adapter's *content* hash is part of the key, so reloading a name with new weights
can never reuse stale KV, and different adapters never share.

Accounting (what stats report):
- a cached block holds one allocator reference of its own;
- kv pages = pages referenced by at least one live sequence;
- cached pages = cached blocks no live sequence references (refcount == 1): the
  first memory reclaimed under pressure, least recently used first.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import xxhash

from lorapool.memory.allocator import PageAllocator


def block_hash(prev: int, adapter_key: str, tokens) -> int:
    h = xxhash.xxh3_64()
    h.update(prev.to_bytes(8, "little"))
    h.update(adapter_key.encode())
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return h.intdigest()


class BlockManager:
    def __init__(self, allocator: PageAllocator, block_size: int, enable_prefix_cache: bool = True):
        self.allocator = allocator
        self.block_size = block_size
        self.enable_prefix_cache = enable_prefix_cache
        self.cache: dict[int, int] = {}  # block hash -> page
        self.page_hash: dict[int, int] = {}  # page -> block hash (cached pages only)
        self.idle: OrderedDict[int, None] = (
            OrderedDict()
        )  # cached pages no sequence uses, LRU first

    # -- sizing ---------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq, num_new_tokens: int) -> int:
        return max(0, self.blocks_for(seq.num_computed + num_new_tokens) - len(seq.block_table))

    @property
    def cached_pages(self) -> int:
        """Idle cached blocks: what evict_cached can free now."""
        return len(self.idle)

    # -- prefix cache ------------------------------------------------------------
    def match_prefix(self, seq) -> None:
        """Attach cached full blocks of a sequence that has no pages yet. At least
        one token is always left to compute, so the step yields logits."""
        assert not seq.block_table and seq.num_computed == 0
        if not self.enable_prefix_cache:
            return
        ids = seq.all_ids
        prev = 0
        hits: list[int] = []
        hashes: list[int] = []
        for b in range((len(ids) - 1) // self.block_size):
            tokens = ids[b * self.block_size : (b + 1) * self.block_size]
            prev = block_hash(prev, seq.adapter_key, tokens)
            page = self.cache.get(prev)
            if page is None:
                break
            hits.append(page)
            hashes.append(prev)
        if not hits:
            return
        self.allocator.share(hits)
        for page in hits:
            self.idle.pop(page, None)
        seq.block_table = hits
        seq.block_hashes = hashes
        seq.num_computed = len(hits) * self.block_size
        seq.num_cached_prompt = min(seq.num_computed, len(seq.prompt_ids))

    def commit(self, seq) -> None:
        """Register the sequence's newly full blocks in the prefix cache."""
        if not self.enable_prefix_cache:
            return
        full = seq.num_computed // self.block_size
        ids = seq.all_ids
        while len(seq.block_hashes) < full:
            b = len(seq.block_hashes)
            prev = seq.block_hashes[-1] if seq.block_hashes else 0
            h = block_hash(
                prev, seq.adapter_key, ids[b * self.block_size : (b + 1) * self.block_size]
            )
            seq.block_hashes.append(h)
            page = seq.block_table[b]
            if h not in self.cache and page not in self.page_hash:
                self.cache[h] = page
                self.page_hash[page] = h
                self.allocator.share([page])

    # -- allocation ----------------------------------------------------------------
    def can_allocate(self, num_blocks: int) -> bool:
        return self.allocator.can_allocate(num_blocks)

    def allocate(self, seq, num_new_tokens: int) -> None:
        """Give seq pages for num_new_tokens more tokens (caller checked the room)."""
        n = self.blocks_needed(seq, num_new_tokens)
        if n:
            seq.block_table.extend(self.allocator.allocate(n).tolist())

    def free(self, seq) -> None:
        """Release every page of the sequence; cached blocks stay cached (idle)."""
        if seq.block_table:
            pages = seq.block_table
            self.allocator.free(pages)
            for page in pages:
                if page in self.page_hash and self.allocator.refcount(page) == 1:
                    self.idle[page] = None
                    self.idle.move_to_end(page)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed = 0

    def evict_cached(self, num_pages: int) -> int:
        """Free up to num_pages idle cached blocks, least recently used first."""
        freed = 0
        while freed < num_pages and self.idle:
            page, _ = self.idle.popitem(last=False)
            h = self.page_hash.pop(page)
            del self.cache[h]
            self.allocator.free([page])
            freed += 1
        return freed

    def clear_cache(self) -> int:
        return self.evict_cached(len(self.idle))

    def live_pages(self, sequences) -> int:
        pages = set()
        for seq in sequences:
            pages.update(seq.block_table)
        return len(pages)
