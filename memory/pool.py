"""The one pool: a single tensor preallocated per device at start, cut into
fixed-size pages that hold either a KV block or a slice of an adapter.

Page layout (see docs/memory.md for the measured waste):
- A page holds `page_elems` elements of the model dtype. Its size is set by the KV
  cache: one block of `block_size` tokens for every layer, K and V, at the model's
  KV width (num_kv_heads * head_dim). GQA models simply have smaller pages; nothing
  assumes the KV width equals the hidden size. Within a page, per layer and KV
  head, K is stored transposed [head_dim, block] and V as [block, head_dim], so
  decode attention reads both straight from the pages (server/attention.py).
- An adapter is packed into a flat sequence of elements (each matrix aligned to
  the lcm of ALIGN and the width of the sub-rows it is read in) and that sequence is cut into however many pages it needs. A
  matrix may span pages; pages need not be contiguous. MLP matrices wider than the
  hidden size are just longer runs. Waste per adapter: alignment padding plus the
  unused tail of its last page.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorapool.memory.allocator import PageAllocator

# Pages and packed adapter matrices start at multiples of ALIGN elements (cache
# lines and vector loads stay aligned). Whatever must also hold for another width
# (a head dim, a block size, an expand sub-row) aligns to the lcm, never the max:
# widths such as 48, 80 or 96 are not powers of two.
ALIGN = 128


def alignment(*widths: int) -> int:
    """The smallest alignment that is a multiple of ALIGN and of every width."""
    return math.lcm(ALIGN, *widths)


@dataclass(frozen=True)
class PageLayout:
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def kv_elems(self) -> int:
        """Elements of one KV block: layers x (K, V) x tokens x kv width."""
        return self.num_layers * 2 * self.block_size * self.kv_width

    @property
    def page_elems(self) -> int:
        """kv_elems rounded up to a multiple of ALIGN, block_size and head_dim.

        Attention addresses a page as rows of block_size (K^T) and of head_dim (V)
        elements counted from the pool's start, so the page must hold whole rows of
        both; adapter sub-rows (widths dividing ALIGN or the page) never straddle it."""
        align = alignment(self.block_size, self.head_dim)
        return -(-self.kv_elems // align) * align

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return self.num_layers * 2 * self.kv_width * _itemsize(dtype)


class PagePool:
    """Owns the pool tensor and its allocator. Callers own what pages mean."""

    def __init__(self, layout: PageLayout, num_pages: int, dtype: torch.dtype, device):
        self.layout = layout
        self.dtype = dtype
        self.device = torch.device(device)
        self.page_elems = layout.page_elems
        self.num_pages = num_pages
        self.tensor = torch.zeros(num_pages * self.page_elems, dtype=dtype, device=self.device)
        self.allocator = PageAllocator(num_pages)
        L, bs, nkv, hd = layout.num_layers, layout.block_size, layout.num_kv_heads, layout.head_dim
        kv = self.tensor.view(num_pages, self.page_elems)[:, : layout.kv_elems].view(
            num_pages, L, 2, nkv, bs * hd
        )
        self.k = kv[:, :, 0].unflatten(-1, (hd, bs))  # [page, layer, kv head, head dim, slot]
        self.v = kv[:, :, 1].unflatten(-1, (bs, hd))  # [page, layer, kv head, slot, head dim]

    @classmethod
    def from_budget(cls, layout: PageLayout, pool_bytes: int, dtype, device) -> PagePool:
        page_bytes = layout.page_elems * _itemsize(dtype)
        num_pages = pool_bytes // page_bytes
        if num_pages < 1:
            raise ValueError(
                f"pool budget {pool_bytes} bytes is smaller than one page ({page_bytes} bytes)"
            )
        return cls(layout, int(num_pages), dtype, device)

    @property
    def page_bytes(self) -> int:
        return self.page_elems * _itemsize(self.dtype)

    @property
    def index_dtype(self) -> torch.dtype:
        """The dtype of row indices into the pool's rows views: int32 when every
        element index fits (half the bytes for the LoRA and attention index tensors
        built every step), else int64."""
        return torch.int32 if self.tensor.numel() < 2**31 else torch.int64

    def pages_view(self) -> torch.Tensor:
        """[num_pages, page_elems] view for page-granular copies."""
        return self.tensor.view(self.num_pages, self.page_elems)

    def rows_view(self, width: int, offset: int = 0) -> torch.Tensor:
        """The pool (from element `offset`) as rows of `width` elements, zero-copy,
        so that embedding_bag can gather sub-rows straight from the pages."""
        rows = (self.tensor.numel() - offset) // width
        return self.tensor.as_strided((rows, width), (width, 1), offset)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
