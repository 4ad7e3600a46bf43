"""Multi-LoRA math read straight from pool pages (the layout is
memory/adapter_layout.py).

- shrink (v = x A^T) is a weighted sum of A^T's rows with x's entries as weights:
  one embedding_bag over sub-rows of width g = gcd(r, ALIGN);
- expand (y += v (sB)^T) is a weighted sum of (sB)^T's rows with v's entries as
  weights: one embedding_bag over sub-rows of width h (see `site_width`).

embedding_bag gathers from arbitrary pages without copying the weights, so one call
serves every row of the batch whatever adapter it uses (Punica's BGMV, on CPU or
GPU): one shrink call per rank class and one expand call per site and layer,
written into the fused output. Long segments of one adapter (prefill chunks)
instead gather the adapter's matrices once and use dense matmuls (SGMV).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorapool.memory.adapter_layout import (
    SITES,
    PlacedAdapter,
    gather_weights,
    site_columns,
    site_width,
)
from lorapool.memory.pool import PagePool
from lorapool.spec import ModelSpec

# Segments with at least this many tokens of one adapter use the dense path. On a
# CPU the gathered path stays cheaper up to about 128 tokens (its weights are hot
# in cache after the first token; the dense path pays a gather and ~10 ops per
# module and layer): 8 prefill chunks of 64 tokens cost 30 ms of LoRA instead of 83.
DENSE_SEGMENT_TOKENS = 128

# (first token, number of tokens, adapter or None): a run of the step's tokens
Segment = tuple[int, int, PlacedAdapter | None]
AdaptedSegment = tuple[int, int, PlacedAdapter]  # a segment with an adapter


@dataclass
class _Group:
    g: int
    shrink: torch.Tensor  # [layers, bags * in]
    offsets: torch.Tensor  # [bags]
    bag_token: torch.Tensor | None  # [bags]; None when bags are exactly the tokens 0..T-1


@dataclass
class _SitePlan:
    h: int
    groups: list[_Group]
    expand: torch.Tensor | None  # [layers, indices]
    expand_offsets: torch.Tensor | None
    v_index: torch.Tensor | None  # per expand index, position in the concatenated v
    out_rows: torch.Tensor | None  # per expand bag, row of the [T * width/h, h] view
    dense: list[AdaptedSegment]


class LoraBatch:
    """The LoRA work of one step: built once, applied at every layer.

    segments: (first token, number of tokens, adapter or None) covering the step's
    flattened tokens. Index tensors are assembled on the host, vectorised, and moved
    to the device once per tensor."""

    def __init__(
        self,
        pool: PagePool,
        spec: ModelSpec,
        segments: list[Segment],
        num_tokens: int,
        dense_min_tokens: int = DENSE_SEGMENT_TOKENS,
    ):
        self.pool = pool
        self.dense_min_tokens = dense_min_tokens
        self.spec = spec
        self.plans: dict[str, _SitePlan] = {}
        self._views: dict[int, torch.Tensor] = {}
        present = {s for _, _, a in segments if a is not None for s in a.sites}
        for site in SITES:
            if site in present:
                self.plans[site] = self._plan(site, segments, num_tokens)

    def _plan(self, site: str, segments: list[Segment], num_tokens: int) -> _SitePlan:
        """One site's work: shrink groups and one expand for the gathered segments,
        and the segments long enough for dense matmuls."""
        h = site_width(self.spec, site, self.pool.page_elems)
        sparse, dense = self._split(site, segments)
        groups, order = self._shrink_groups(site, sparse, num_tokens)
        if not order:
            return _SitePlan(h, [], None, None, None, None, dense)
        return self._expand_plan(site, h, groups, order, dense)

    def _split(
        self, site: str, segments: list[Segment]
    ) -> tuple[list[AdaptedSegment], list[AdaptedSegment]]:
        """The segments whose adapter targets `site`: (gathered, dense) by length."""
        sparse, dense = [], []
        for s, n, a in segments:
            if a is None or site not in a.sites:
                continue
            (dense if n >= self.dense_min_tokens else sparse).append((s, n, a))
        return sparse, dense

    def _shrink_groups(
        self, site: str, sparse: list[AdaptedSegment], num_tokens: int
    ) -> tuple[list[_Group], list[AdaptedSegment]]:
        """One shrink group per sub-row width g, and the segments in the order
        their v values come out (the expand's order)."""
        dev = self.pool.device
        fan_in = self.spec.module_shape(SITES[site][0])[0]
        groups = []
        order = []  # (token start, n, adapter) in v order
        for g in sorted({a.g for _, _, a in sparse}):
            members = [(s, n, a) for s, n, a in sparse if a.g == g]
            order.extend(members)
            shrink = torch.cat(
                [_repeat(a.sites[site].shrink, n, dim=1) for _, n, a in members],
                dim=1,
            )
            tokens, bags = _tokens(members), []
            for _, n, a in members:
                bags.extend([len(a.sites[site].modules) * a.rank // g] * n)
            bags_t = torch.tensor(bags)
            n_bags = int(bags_t.sum())
            identity = n_bags == num_tokens and bool((bags_t == 1).all()) and _is_range(tokens)
            groups.append(
                _Group(
                    g=g,
                    shrink=shrink.to(dev),
                    offsets=(torch.arange(n_bags) * fan_in).to(dev),
                    bag_token=None if identity else tokens.repeat_interleave(bags_t).to(dev),
                )
            )
        return groups, order

    def _expand_plan(
        self,
        site: str,
        h: int,
        groups: list[_Group],
        order: list[AdaptedSegment],
        dense: list[AdaptedSegment],
    ) -> _SitePlan:
        """The expand indices of every gathered token, in v order, with the rows of
        the fused output each bag adds into."""
        dev = self.pool.device
        width = sum(self.spec.module_shape(m)[1] for m in SITES[site])
        chunks = width // h
        expand = torch.cat(
            [_repeat(a.sites[site].expand, n, dim=1) for _, n, a in order],
            dim=1,
        )
        tokens = _tokens(order)
        per_token = [(a.sites[site], n) for _, n, a in order]
        token_sites = [si for si, n in per_token for _ in range(n)]
        v_len = torch.tensor([len(si.modules) * si.rank for si in token_sites])
        v_start = torch.cumsum(v_len, 0) - v_len
        n_rows = torch.tensor([si.out_rows.numel() for si in token_sites])
        n_vidx = torch.tensor([si.v_index.numel() for si in token_sites])
        out_rows = torch.cat([_repeat(si.out_rows, n) for si, n in per_token])
        out_rows += (tokens * chunks).repeat_interleave(n_rows)
        v_index = torch.cat([_repeat(si.v_index, n) for si, n in per_token])
        v_index += v_start.repeat_interleave(n_vidx)
        bag_len = torch.tensor([si.rank for si in token_sites]).repeat_interleave(n_rows)
        return _SitePlan(
            h=h,
            groups=groups,
            expand=expand.to(dev),
            expand_offsets=(torch.cumsum(bag_len, 0) - bag_len).to(dev),
            v_index=v_index.to(dev),
            out_rows=out_rows.to(dev),
            dense=dense,
        )

    def _view(self, width: int) -> torch.Tensor:
        view = self._views.get(width)
        if view is None:
            view = self._views[width] = self.pool.rows_view(width)
        return view

    def apply(self, layer: int, site: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """y[t] += scale * B A x[t] for every module of `site` that token t's adapter
        targets; y is the site's fused output [tokens, width] (contiguous)."""
        plan = self.plans.get(site)
        if plan is None:
            return
        if plan.groups:
            vs = []
            for grp in plan.groups:
                weights = x if grp.bag_token is None else x.index_select(0, grp.bag_token)
                v = F.embedding_bag(
                    grp.shrink[layer],
                    self._view(grp.g),
                    grp.offsets,
                    mode="sum",
                    per_sample_weights=weights.reshape(-1),
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
            y.view(-1, plan.h).index_add_(0, plan.out_rows, delta)
        if plan.dense:
            cols = site_columns(self.spec, site)
            for start, n, adapter in plan.dense:
                xs = x[start : start + n]
                for m in adapter.sites[site].modules:
                    a_t, b_t = self.dense_weights(adapter, layer, m)
                    c = cols[m]
                    y[start : start + n, c : c + b_t.shape[1]] += (xs @ a_t) @ b_t

    def dense_weights(self, adapter: PlacedAdapter, layer: int, module: str):
        return gather_weights(self.pool, self.spec, adapter, layer, module, self._view)


def _tokens(members: list[AdaptedSegment]) -> torch.Tensor:
    return torch.tensor([t for s, n, _ in members for t in range(s, s + n)], dtype=torch.long)


def _repeat(t: torch.Tensor, n: int, dim: int = 0) -> torch.Tensor:
    """t repeated n times along dim (no copy for the common n == 1: decode rows)."""
    if n == 1:
        return t
    reps = [1] * t.dim()
    reps[dim] = n
    return t.repeat(*reps)


def _is_range(tokens: torch.Tensor) -> bool:
    return bool((tokens == torch.arange(tokens.numel())).all())
