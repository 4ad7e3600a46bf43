"""Multi-LoRA math read straight from pool pages.

An adapter is packed into pages as, per (layer, module), A^T [in, r] followed by
(scale * B)^T [r, out]; scale is alpha/r, or alpha/sqrt(r) with rslora, folded into
B at load time. At placement we precompute, per matrix, the row indices of its
sub-rows in a zero-copy "rows view" of the pool (see PagePool.rows_view):

- shrink (v = x A^T) is a weighted sum of A^T's rows with x's entries as weights:
  one embedding_bag over sub-rows of width g (a power of two dividing r);
- expand (y += v (sB)^T) is a weighted sum of (sB)^T's rows with v's entries as
  weights: one embedding_bag over sub-rows of width h = gcd(out, ALIGN).

embedding_bag gathers from arbitrary pages without copying the weights, so one call
serves every row of the batch whatever adapter it uses (Punica's BGMV, on CPU or
GPU). Long segments of one adapter (prefill chunks) instead gather the adapter's
two matrices once and use dense matmuls (SGMV).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from lorapool.memory.pool import ALIGN, PagePool

from .checkpoint import ModelSpec

# Segments with at least this many tokens of one adapter use the dense path.
DENSE_SEGMENT_TOKENS = 8


def shrink_width(rank: int) -> int:
    """Largest power of two dividing rank, at most 16 (wider gathers are faster)."""
    return math.gcd(rank, 16)


def expand_width(out_features: int) -> int:
    return math.gcd(out_features, ALIGN)


@dataclass
class ModuleIndex:
    """Pool row indices of one module's matrices, for every layer."""

    shrink: torch.Tensor  # [layers, (r/g) * in] rows of width g, bag-major
    expand: torch.Tensor  # [layers, (out/h) * r] rows of width h, bag-major


@dataclass
class PlacedAdapter:
    """An adapter resident in pool pages, addressed for the LoRA kernels."""

    key: str  # content identity (name-independent)
    rank: int
    modules: dict[str, ModuleIndex]
    pages: torch.Tensor = field(repr=False)

    @property
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
    spec: ModelSpec, rank: int, scale: float, weights: dict[tuple[int, str], tuple], dtype
) -> PackedAdapter:
    """weights: (layer, module) -> (A [r, in], B [out, r]) as PEFT stores them."""
    chunks, offsets, pos = [], {}, 0
    for (layer, module), (a, b) in sorted(weights.items()):
        a_t = a.t().contiguous().to(torch.float32).reshape(-1)
        b_t = (b.to(torch.float32) * scale).t().contiguous().reshape(-1)
        offsets[(layer, module)] = (pos, pos + _aligned(a_t.numel()))
        for m in (a_t, b_t):
            chunks.append(m)
            pad = _aligned(m.numel()) - m.numel()
            if pad:
                chunks.append(torch.zeros(pad))
            pos += m.numel() + pad
    flat = torch.cat(chunks).to(dtype)
    return PackedAdapter(flat=flat, rank=rank, offsets=offsets)


def place_adapter(
    pool: PagePool, spec: ModelSpec, packed: PackedAdapter, pages, key: str
) -> PlacedAdapter:
    """Copy the packed adapter into `pages` and compute its pool row indices."""
    p = pool.page_elems
    pages_t = torch.as_tensor(pages, dtype=torch.long)
    n = pages_t.numel()
    buf = torch.zeros(n * p, dtype=pool.dtype)
    buf[: packed.flat.numel()] = packed.flat
    pool.pages_view()[pages_t.to(pool.device)] = buf.view(n, p).to(pool.device)

    def to_pool(e: torch.Tensor) -> torch.Tensor:
        return pages_t[e // p] * p + e % p

    r, g = packed.rank, shrink_width(packed.rank)
    per_module: dict[str, tuple[list, list]] = {}
    for (_layer, module), (off_a, off_b) in sorted(packed.offsets.items()):  # layer order
        fan_in, fan_out = spec.module_shape(module)
        h = expand_width(fan_out)
        c = torch.arange(r // g).view(-1, 1)
        i = torch.arange(fan_in).view(1, -1)
        shrink = to_pool(off_a + i * r + c * g).reshape(-1) // g
        d = torch.arange(fan_out // h).view(-1, 1)
        j = torch.arange(r).view(1, -1)
        expand = to_pool(off_b + j * fan_out + d * h).reshape(-1) // h
        lists = per_module.setdefault(module, ([], []))
        lists[0].append(shrink)
        lists[1].append(expand)
    modules = {}
    for module, (shrinks, expands) in per_module.items():
        if len(shrinks) != spec.num_layers:
            raise ValueError(f"adapter must target {module} in every layer")
        modules[module] = ModuleIndex(
            shrink=torch.stack(shrinks).to(pool.device),
            expand=torch.stack(expands).to(pool.device),
        )
    return PlacedAdapter(key=key, rank=r, modules=modules, pages=pages_t)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass
class _Group:
    g: int
    shrink: torch.Tensor  # [layers, bags * in]
    offsets: torch.Tensor  # [bags]
    bag_token: torch.Tensor  # [bags]


@dataclass
class _Dense:
    start: int
    n: int
    adapter: PlacedAdapter


@dataclass
class _ModulePlan:
    in_features: int
    out_features: int
    h: int
    groups: list[_Group]
    tokens: torch.Tensor  # output row per v-segment, in v order
    expand: torch.Tensor  # [layers, n]
    expand_offsets: torch.Tensor
    v_index: torch.Tensor  # per expand index, position in the concatenated v
    dense: list[_Dense]


class LoraBatch:
    """The LoRA work of one step: built once, applied at every layer.

    segments: (first token, number of tokens, adapter or None) covering the step's
    flattened tokens. The index tensors are assembled here, on the host, and moved
    to the device in one go per tensor."""

    def __init__(self, pool: PagePool, spec: ModelSpec, segments):
        self.pool = pool
        self.spec = spec
        self.plans: dict[str, _ModulePlan] = {}
        dev = pool.device
        for module in {m for _, _, a in segments if a is not None for m in a.modules}:
            fan_in, fan_out = spec.module_shape(module)
            h = expand_width(fan_out)
            sparse = [
                (s, n, a)
                for s, n, a in segments
                if a is not None and module in a.modules and n < DENSE_SEGMENT_TOKENS
            ]
            dense = [
                _Dense(s, n, a)
                for s, n, a in segments
                if a is not None and module in a.modules and n >= DENSE_SEGMENT_TOKENS
            ]
            groups, tokens, expand, e_counts, v_index, v_pos = [], [], [], [], [], 0
            for g in sorted({a.g for _, _, a in sparse}):
                shr, bag_tok = [], []
                for s, n, a in sparse:
                    if a.g != g:
                        continue
                    idx = a.modules[module]
                    shr.append(idx.shrink.repeat(1, n) if n > 1 else idx.shrink)
                    toks = torch.arange(s, s + n)
                    bag_tok.append(toks.repeat_interleave(a.rank // g))
                    tokens.append(toks)
                    expand.append(idx.expand.repeat(1, n) if n > 1 else idx.expand)
                    nb = fan_out // h
                    e_counts.append(torch.full((n * nb,), a.rank))
                    base = v_pos + torch.arange(n).view(n, 1, 1) * a.rank
                    v_index.append(
                        (base + torch.arange(a.rank).view(1, 1, -1))
                        .expand(n, nb, a.rank)
                        .reshape(-1)
                    )
                    v_pos += n * a.rank
                bag_token = torch.cat(bag_tok)
                groups.append(
                    _Group(
                        g=g,
                        shrink=torch.cat(shr, dim=1),
                        offsets=(torch.arange(bag_token.numel()) * fan_in).to(dev),
                        bag_token=bag_token.to(dev),
                    )
                )
            if groups:
                counts = torch.cat(e_counts)
                plan_expand = torch.cat(expand, dim=1)
                offsets = torch.cumsum(counts, 0) - counts
                tokens_t = torch.cat(tokens).to(dev)
                v_index_t = torch.cat(v_index).to(dev)
                offsets = offsets.to(dev)
            else:
                plan_expand = offsets = tokens_t = v_index_t = None
            self.plans[module] = _ModulePlan(
                fan_in, fan_out, h, groups, tokens_t, plan_expand, offsets, v_index_t, dense
            )
        self._views: dict[int, torch.Tensor] = {}

    def _view(self, width: int) -> torch.Tensor:
        view = self._views.get(width)
        if view is None:
            view = self._views[width] = self.pool.rows_view(width)
        return view

    def apply(self, layer: int, module: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """y[t] += scale * B A x[t] for every token t whose adapter targets module."""
        plan = self.plans.get(module)
        if plan is None:
            return
        if plan.groups:
            vs = []
            for grp in plan.groups:
                weights = x.index_select(0, grp.bag_token).reshape(-1)
                v = F.embedding_bag(
                    grp.shrink[layer],
                    self._view(grp.g),
                    grp.offsets,
                    mode="sum",
                    per_sample_weights=weights,
                )
                vs.append(v.reshape(-1))
            v = vs[0] if len(vs) == 1 else torch.cat(vs)
            delta = F.embedding_bag(
                plan.expand[layer],
                self._view(plan.h),
                plan.expand_offsets,
                mode="sum",
                per_sample_weights=v.index_select(0, plan.v_index),
            )
            y.index_add_(0, plan.tokens, delta.view(-1, plan.out_features))
        for seg in plan.dense:
            a_t, b_t = self.dense_weights(seg.adapter, layer, module)
            y[seg.start : seg.start + seg.n] += (x[seg.start : seg.start + seg.n] @ a_t) @ b_t

    def dense_weights(self, adapter: PlacedAdapter, layer: int, module: str):
        """Gather A^T [in, r] and (sB)^T [r, out] of one matrix pair into dense tensors."""
        fan_in, fan_out = self.spec.module_shape(module)
        r, g, h = adapter.rank, adapter.g, expand_width(fan_out)
        idx = adapter.modules[module]
        a = self._view(g).index_select(0, idx.shrink[layer])  # [(r/g) * in, g]
        a_t = a.view(r // g, fan_in, g).permute(1, 0, 2).reshape(fan_in, r)
        b = self._view(h).index_select(0, idx.expand[layer])  # [(out/h) * r, h]
        b_t = b.view(fan_out // h, r, h).permute(1, 0, 2).reshape(r, fan_out)
        return a_t, b_t
