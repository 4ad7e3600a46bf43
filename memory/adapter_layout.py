"""How an adapter lives in pool pages: the packing format and the index math.

An adapter is packed into pages as, per (layer, module), A^T [in, r] followed by
(scale * B)^T [r, out]; scale is alpha/r, or alpha/sqrt(r) with rslora, folded into
B at load time. At placement we precompute, per matrix, the row indices of its
sub-rows in a zero-copy "rows view" of the pool (PagePool.rows_view): A^T is read in
sub-rows of width g = gcd(r, ALIGN), (sB)^T in sub-rows of width h (`site_width`).
Each matrix starts at a multiple of its sub-row width, and the LoRA kernels
(server/model/lora.py) gather those rows straight from the pages.

Modules that share an input form a *site* (q/k/v; gate/up; o; down): the kernels
run one expand per site, written into the site's fused output.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lorapool.errors import AdapterIncompatible
from lorapool.memory.pool import ALIGN, PageLayout, PagePool, alignment
from lorapool.spec import ModelSpec

if TYPE_CHECKING:
    import numpy as np

    from lorapool.memory.peft_adapter import AdapterWeights

log = logging.getLogger("lorapool.memory")

SITES = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
SITE_OF = {m: site for site, mods in SITES.items() for m in mods}


def shrink_width(rank: int) -> int:
    return math.gcd(rank, ALIGN)


def site_columns(spec: ModelSpec, site: str) -> dict[str, int]:
    """Column offset of each module inside the site's fused output."""
    cols, pos = {}, 0
    for m in SITES[site]:
        cols[m] = pos
        pos += spec.module_shape(m)[1]
    return cols


def site_width(spec: ModelSpec, site: str, page_elems: int) -> int:
    """Expand sub-row width of a site: divides every output width of the site and
    the page size, so sub-rows never straddle pages and tile the fused output."""
    h = page_elems
    for m in SITES[site]:
        h = math.gcd(h, spec.module_shape(m)[1])
    return h


@dataclass
class SiteIndex:
    """One adapter's indices for one site, every module it targets there."""

    rank: int
    modules: list[str]
    shrink: torch.Tensor  # [layers, bags * in]; bags = len(modules) * r/g, module-major
    expand: torch.Tensor  # [layers, sum over modules of (out/h) * r], module-, then d-major
    out_rows: torch.Tensor  # per expand bag: row in the [tokens * out/h, h] output view
    v_index: torch.Tensor  # per expand index: position in this token's v (module*r + j)
    chunk_len: torch.Tensor  # per h-wide chunk of the fused output: r if targeted, else 0
    per_module: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (shrink, expand)


@dataclass
class PlacedAdapter:
    """An adapter resident in pool pages, addressed for the LoRA kernels."""

    key: str  # content identity (name-independent)
    rank: int
    sites: dict[str, SiteIndex]
    pages: torch.Tensor = field(repr=False)

    @functools.cached_property
    def g(self) -> int:
        return shrink_width(self.rank)


@dataclass
class PackedAdapter:
    """Host-side flat packing of an adapter: what goes into its pages."""

    flat: torch.Tensor
    rank: int
    # (layer, module) -> (offset of A^T, offset of (sB)^T) in `flat`
    offsets: dict[tuple[int, str], tuple[int, int]]

    def num_pages(self, page_elems: int) -> int:
        return -(-self.flat.numel() // page_elems)


def pack_adapter(
    spec: ModelSpec, adapter: AdapterWeights, dtype: torch.dtype, page_elems: int
) -> PackedAdapter:
    """The flat run of an adapter read by memory/peft_adapter.py, for pages of
    page_elems elements of dtype."""
    rank, scale, weights = adapter.rank, adapter.scale, adapter.weights
    chunks, offsets, pos = [], {}, 0

    def put(m: torch.Tensor, align: int) -> int:
        nonlocal pos
        pad = -pos % align
        if pad:
            chunks.append(torch.zeros(pad))
            pos += pad
        start = pos
        chunks.append(m)
        pos += m.numel()
        return start

    g = shrink_width(rank)
    for (layer, module), (a, b) in sorted(weights.items()):
        a_t = a.t().contiguous().to(torch.float32).reshape(-1)
        b_t = (b.to(torch.float32) * scale).t().contiguous().reshape(-1)
        h = site_width(spec, SITE_OF[module], page_elems)
        # Each matrix is gathered as sub-rows of its own width (g for A^T, h for
        # (sB)^T), counted from the pool's start: it must start at a multiple of it.
        offsets[(layer, module)] = (put(a_t, alignment(g)), put(b_t, alignment(h)))
    flat = torch.cat(chunks).to(dtype)
    return PackedAdapter(flat=flat, rank=rank, offsets=offsets)


def place_adapter(
    pool: PagePool, spec: ModelSpec, packed: PackedAdapter, pages: list[int] | np.ndarray, key: str
) -> PlacedAdapter:
    """Copy the packed adapter into `pages` and compute its pool row indices."""
    pages_t = torch.as_tensor(pages, dtype=torch.long)
    _copy_into_pages(pool, packed, pages_t)
    rows = _matrix_rows(pool, spec, packed, pages_t)
    sites = {}
    for site, site_modules in SITES.items():
        mods = [m for m in site_modules if m in rows]
        if mods:
            sites[site] = _site_index(pool, spec, site, mods, rows, packed.rank)
    return PlacedAdapter(key=key, rank=packed.rank, sites=sites, pages=pages_t)


# module -> (shrink, expand) row indices of its A^T and (sB)^T, [layers, ...] each
_MatrixRows = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _copy_into_pages(pool: PagePool, packed: PackedAdapter, pages_t: torch.Tensor) -> None:
    """The packed run, zero-padded to whole pages, written to the pages in one copy."""
    p = pool.page_elems
    n = pages_t.numel()
    buf = torch.zeros(n * p, dtype=pool.dtype)
    buf[: packed.flat.numel()] = packed.flat
    pool.pages_view()[pages_t.to(pool.device)] = buf.view(n, p).to(pool.device)


def _matrix_rows(
    pool: PagePool, spec: ModelSpec, packed: PackedAdapter, pages_t: torch.Tensor
) -> _MatrixRows:
    """Each matrix's sub-rows as row indices of the pool's rows views (width g
    for A^T, h for (sB)^T), for every layer at once: a module's matrices differ
    from layer to layer only by their offset in the packed run."""
    p = pool.page_elems

    def to_pool(e: torch.Tensor) -> torch.Tensor:
        return pages_t[e // p] * p + e % p

    r, g = packed.rank, shrink_width(packed.rank)
    by_module: dict[str, list[tuple[int, int, int]]] = {}
    for (layer, module), (off_a, off_b) in packed.offsets.items():
        by_module.setdefault(module, []).append((layer, off_a, off_b))
    rows: _MatrixRows = {}
    for module, offs in by_module.items():
        if len(offs) != spec.num_layers:
            raise ValueError(f"adapter must target {module} in every layer")
        offs.sort()
        off_a = torch.tensor([a for _, a, _ in offs]).view(-1, 1)
        off_b = torch.tensor([b for _, _, b in offs]).view(-1, 1)
        fan_in, fan_out = spec.module_shape(module)
        h = site_width(spec, SITE_OF[module], p)
        c = torch.arange(r // g).view(-1, 1)
        i = torch.arange(fan_in).view(1, -1)
        shrink = to_pool(off_a + (i * r + c * g).view(1, -1)) // g
        d = torch.arange(fan_out // h).view(-1, 1)
        j = torch.arange(r).view(1, -1)
        expand = to_pool(off_b + (j * fan_out + d * h).view(1, -1)) // h
        rows[module] = (shrink, expand)
    return rows


def _site_index(
    pool: PagePool,
    spec: ModelSpec,
    site: str,
    mods: list[str],
    rows: _MatrixRows,
    r: int,
) -> SiteIndex:
    """One site's indices: every targeted module's rows side by side per layer,
    and the bags of the site's fused output they fill."""
    dev = pool.device
    h = site_width(spec, site, pool.page_elems)
    cols = site_columns(spec, site)
    width = sum(spec.module_shape(m)[1] for m in SITES[site])
    chunk_len = torch.zeros(width // h, dtype=torch.long)
    out_rows, v_index = [], []
    for k, m in enumerate(mods):
        nb = spec.module_shape(m)[1] // h
        out_rows.append(cols[m] // h + torch.arange(nb))
        chunk_len[cols[m] // h : cols[m] // h + nb] = r
        v_index.append((k * r + torch.arange(r)).repeat(nb))
    idx = pool.index_dtype

    def on_device(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=dev, dtype=idx)

    return SiteIndex(
        rank=r,
        modules=mods,
        shrink=on_device(torch.cat([rows[m][0] for m in mods], dim=1)),
        expand=on_device(torch.cat([rows[m][1] for m in mods], dim=1)),
        out_rows=torch.cat(out_rows),
        v_index=torch.cat(v_index).to(idx),
        chunk_len=chunk_len,
        per_module={m: (on_device(rows[m][0]), on_device(rows[m][1])) for m in mods},
    )


def gather_weights(pool: PagePool, spec: ModelSpec, adapter: PlacedAdapter, layer, module, view):
    """Gather A^T [in, r] and (sB)^T [r, out] of one matrix pair into dense tensors,
    through the same pool rows and indices the kernels read; layer None gathers
    every layer in one read ([layers, in, r], [layers, r, out]). view(width) is the
    pool as rows of `width` elements."""
    fan_in, fan_out = spec.module_shape(module)
    r, g = adapter.rank, adapter.g
    h = site_width(spec, SITE_OF[module], pool.page_elems)
    shrink, expand = adapter.sites[SITE_OF[module]].per_module[module]
    if layer is not None:
        shrink, expand = shrink[layer : layer + 1], expand[layer : layer + 1]
    n = shrink.shape[0]
    a = view(g).index_select(0, shrink.reshape(-1))  # [n * (r/g) * in, g]
    a_t = a.view(n, r // g, fan_in, g).permute(0, 2, 1, 3).reshape(n, fan_in, r)
    b = view(h).index_select(0, expand.reshape(-1))  # [n * (out/h) * r, h]
    b_t = b.view(n, fan_out // h, r, h).permute(0, 2, 1, 3).reshape(n, r, fan_out)
    if layer is not None:
        return a_t[0], b_t[0]
    return a_t, b_t


# Layout signatures whose every matrix read back exactly: the check runs once per
# signature (a few hundred at most in practice: ranks x target sets), not per load.
_VERIFIED: OrderedDict[tuple, None] = OrderedDict()
_VERIFIED_MAX = 1024
_verified_lock = threading.Lock()


def layout_signature(layout: PageLayout, spec: ModelSpec, packed: PackedAdapter) -> tuple:
    """Everything the index math of a packed adapter depends on: the page size, the
    rank, the run's length, each targeted module's shape and every matrix's offset.
    Weight values and page ids never enter it."""
    modules = sorted({m for _, m in packed.offsets})
    return (
        layout.page_elems,
        packed.rank,
        packed.flat.numel(),
        tuple((m, spec.module_shape(m)) for m in modules),
        tuple(sorted(packed.offsets.items())),
    )


def verify_layout(layout: PageLayout, spec: ModelSpec, packed: PackedAdapter, dtype) -> None:
    """Place a probe of `packed`'s layout into scratch pages in scattered
    (descending) order and read every matrix back through the kernels' index path;
    any difference raises AdapterIncompatible naming the layer and module.

    The probe holds each element's own index (float64, exact), not the adapter's
    weights, so a misread can never hide behind equal values (an untrained LoRA's
    B is all zeros); the index math counts elements, so `dtype` does not enter
    it. Page ids enter it only as `page * page_elems`, so a layout that reads back
    exactly from scattered scratch pages reads back exactly from any pages; and
    since nothing else enters it, a signature (`layout_signature`) checked once
    is not checked again. The check runs where adapters load (a loader thread), so
    a mismatch is refused like any other bad adapter and costs the step thread
    nothing."""
    key = layout_signature(layout, spec, packed)
    with _verified_lock:
        if key in _VERIFIED:
            _VERIFIED.move_to_end(key)
            return
    probe = PackedAdapter(
        flat=torch.arange(packed.flat.numel(), dtype=torch.float64),
        rank=packed.rank,
        offsets=packed.offsets,
    )
    _read_back(layout, spec, probe)
    with _verified_lock:
        _VERIFIED[key] = None
        while len(_VERIFIED) > _VERIFIED_MAX:
            _VERIFIED.popitem(last=False)


def _read_back(layout: PageLayout, spec: ModelSpec, packed: PackedAdapter) -> None:
    n = packed.num_pages(layout.page_elems)
    scratch = PagePool(layout, n + 1, packed.flat.dtype, "cpu")
    placed = place_adapter(scratch, spec, packed, list(range(n, 0, -1)), key="verify")
    views: dict[int, torch.Tensor] = {}

    def view(width: int) -> torch.Tensor:
        if width not in views:
            views[width] = scratch.rows_view(width)
        return views[width]

    for (layer, module), (off_a, off_b) in sorted(packed.offsets.items()):
        fan_in, fan_out = spec.module_shape(module)
        r = packed.rank
        a_t, b_t = gather_weights(scratch, spec, placed, layer, module, view)
        want_a = packed.flat[off_a : off_a + fan_in * r].view(fan_in, r)
        want_b = packed.flat[off_b : off_b + r * fan_out].view(r, fan_out)
        if not (torch.equal(a_t, want_a) and torch.equal(b_t, want_b)):
            log.error(
                "adapter layout self-check failed: layer %d %s (rank %d) reads back "
                "different weights from pages; the adapter is refused",
                layer,
                module,
                r,
            )
            raise AdapterIncompatible(
                f"internal layout check failed for layer {layer} {module} (rank {r}): "
                "the weights read back from pool pages differ from the adapter's; "
                "the adapter is refused rather than served wrong"
            )
