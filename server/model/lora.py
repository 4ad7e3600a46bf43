"""Multi-LoRA math read straight from pool pages (the layout is
memory/adapter_layout.py).

A step's tokens come in runs: consecutive tokens of one adapter (the runner puts
a step's rows of one adapter side by side). Each run takes one of two paths:

- gathered (short runs: decode rows): shrink (v = x A^T) is a weighted sum of
  A^T's rows with x's entries as weights, one embedding_bag over sub-rows of width
  g = gcd(r, ALIGN); expand (y += v (sB)^T) is a weighted sum of (sB)^T's rows
  with v's entries as weights, one embedding_bag over sub-rows of width h (see
  `site_width`). embedding_bag gathers from arbitrary pages without copying the
  weights, so one call serves every row of the batch whatever adapter it uses
  (Punica's BGMV, on CPU or GPU). The expand has one bag per (token, h-wide chunk
  of the site's fused output), empty where the token's adapter does not target the
  chunk's module, so its output is added to the fused output as it is (no scatter).
  On a CPU with a float32 pool the short runs go to lora_kernels.c instead
  (native.py): the same rows and layout, but each row is read once per run and
  applied to all of the run's tokens, where embedding_bag reads it once per token.
- dense (runs of at least `dense_min_tokens` tokens: prefill chunks, or many
  decode rows of one adapter): the adapter's matrices are gathered from the pages
  once per step for every layer (one read per step, not one per token), and each
  layer runs one matmul for the site's shrink and one addmm per module (SGMV).
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
from lorapool.server.model import native
from lorapool.spec import ModelSpec

# Runs with at least this many tokens of one adapter use the dense path. Measured
# on a CPU (bench model, 16 runs of n tokens, plan build + every layer's apply):
# dense/gathered = 2.7 at n = 2, 1.5 at 4, 1.0 at 8, 0.75 at 16, 0.41 at 64.
DENSE_SEGMENT_TOKENS = 8
# With the C kernels (native.py), which read a run's rows once whatever its length,
# the dense path wins only on longer runs (bench model, one run of n tokens, every
# layer and site: native/dense = 0.36-0.47 at n = 8, 0.69 at 16, 1.05 at 32, 1.6
# at 64, for ranks 8-64).
NATIVE_DENSE_SEGMENT_TOKENS = 32

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
class _Dense:
    """One dense run of one site: its tokens and its adapter's matrices, gathered
    for every layer."""

    start: int
    n: int
    a: torch.Tensor  # [layers, in, modules * r]: every targeted module's A^T side by side
    b: list[tuple[int, torch.Tensor]]  # per module: (column in the fused output, [layers, r, out])
    rank: int


@dataclass
class _NativeRuns:
    """The short runs of one site for lora_kernels.c (native.py): one row per run,
    fields as the kernels number them; `keep` holds the tensors the rows point to."""

    shrink: torch.Tensor  # [runs, SHRINK_FIELDS] int64
    expand: torch.Tensor  # [runs, EXPAND_FIELDS] int64
    v_size: int  # floats of v over all runs
    fan_in: int
    keep: list[torch.Tensor]


@dataclass
class _SitePlan:
    h: int
    groups: list[_Group]
    rows: int  # the gathered expand covers fused-output rows [0, rows)
    expand: torch.Tensor | None  # [layers, indices]
    expand_offsets: torch.Tensor | None  # one bag per (row, chunk), empty ones included
    v_index: torch.Tensor | None  # per expand index, position in the concatenated v
    dense: list[_Dense]
    native: _NativeRuns | None = None  # the short runs, when the C kernels take them


def merge_runs(segments: list[Segment]) -> list[Segment]:
    """Adjacent segments of the same adapter as one run."""
    runs: list[Segment] = []
    for s, n, a in segments:
        if runs and runs[-1][2] is a and runs[-1][0] + runs[-1][1] == s:
            runs[-1] = (runs[-1][0], runs[-1][1] + n, a)
        else:
            runs.append((s, n, a))
    return runs


class LoraBatch:
    """The LoRA work of one step: built once, applied at every layer.

    segments: (first token, number of tokens, adapter or None) covering the step's
    flattened tokens; adjacent ones of one adapter are merged into runs. Index
    tensors are assembled on the host, vectorised, and moved to the device once
    per tensor."""

    def __init__(
        self,
        pool: PagePool,
        spec: ModelSpec,
        segments: list[Segment],
        num_tokens: int,
        dense_min_tokens: int | None = None,
    ):
        self.pool = pool
        self.spec = spec
        # int32 row indices are what the kernels read
        use_native = native.wanted(pool.tensor) and pool.index_dtype == torch.int32
        self.native = native.load() if use_native else None
        if dense_min_tokens is None:
            native_path = self.native is not None
            dense_min_tokens = NATIVE_DENSE_SEGMENT_TOKENS if native_path else DENSE_SEGMENT_TOKENS
        self.dense_min_tokens = dense_min_tokens
        self.plans: dict[str, _SitePlan] = {}
        self._views: dict[int, torch.Tensor] = {}
        runs = merge_runs(segments)
        present = {s for _, _, a in runs if a is not None for s in a.sites}
        for site in SITES:
            if site in present:
                self.plans[site] = self._plan(site, runs, num_tokens)

    def _plan(self, site: str, runs: list[Segment], num_tokens: int) -> _SitePlan:
        """One site's work: shrink groups and one expand for the gathered runs, and
        the dense runs with their gathered matrices."""
        h = site_width(self.spec, site, self.pool.page_elems)
        sparse, dense = self._split(site, runs)
        dense_plans = [self._dense(site, s, n, a) for s, n, a in dense]
        if sparse and self.native is not None:
            runs_native = self._native_runs(site, h, sparse)
            return _SitePlan(h, [], 0, None, None, None, dense_plans, runs_native)
        groups, order = self._shrink_groups(site, sparse, num_tokens)
        if not order:
            return _SitePlan(h, [], 0, None, None, None, dense_plans)
        return self._expand_plan(site, h, groups, order, sparse, dense_plans)

    def _split(
        self, site: str, runs: list[Segment]
    ) -> tuple[list[AdaptedSegment], list[AdaptedSegment]]:
        """The runs whose adapter targets `site`: (gathered, dense) by length."""
        sparse, dense = [], []
        for s, n, a in runs:
            if a is None or site not in a.sites:
                continue
            (dense if n >= self.dense_min_tokens else sparse).append((s, n, a))
        return sparse, dense

    def _shrink_groups(
        self, site: str, sparse: list[AdaptedSegment], num_tokens: int
    ) -> tuple[list[_Group], list[AdaptedSegment]]:
        """One shrink group per sub-row width g, and the runs in the order their v
        values come out."""
        dev, idx = self.pool.device, self.pool.index_dtype
        fan_in = self.spec.module_shape(SITES[site][0])[0]
        groups = []
        order = []  # (token start, n, adapter) in v order
        for g in sorted({a.g for _, _, a in sparse}):
            members = [(s, n, a) for s, n, a in sparse if a.g == g]
            order.extend(members)
            # a run of n tokens lists its adapter's indices n times: one cat, no repeats
            shrink = torch.cat(
                [a.sites[site].shrink for _, n, a in members for _ in range(n)], dim=1
            )
            ns = torch.tensor([n for _, n, _ in members])
            tokens = _tokens(torch.tensor([s for s, _, _ in members]), ns)
            bags_t = torch.tensor(
                [len(a.sites[site].modules) * a.rank // g for _, _, a in members]
            ).repeat_interleave(ns)
            n_bags = int(bags_t.sum())
            identity = n_bags == num_tokens and bool((bags_t == 1).all()) and _is_range(tokens)
            groups.append(
                _Group(
                    g=g,
                    shrink=shrink.to(dev),
                    offsets=(torch.arange(n_bags) * fan_in).to(device=dev, dtype=idx),
                    bag_token=None
                    if identity
                    else tokens.repeat_interleave(bags_t).to(device=dev, dtype=idx),
                )
            )
        return groups, order

    def _expand_plan(
        self,
        site: str,
        h: int,
        groups: list[_Group],
        order: list[AdaptedSegment],
        sparse: list[AdaptedSegment],
        dense: list[_Dense],
    ) -> _SitePlan:
        """The expand's bags: one per (token, chunk) of rows [0, last gathered
        token], in token order, each reading its token's v (in `order`)."""
        dev, idx = self.pool.device, self.pool.index_dtype
        width = sum(self.spec.module_shape(m)[1] for m in SITES[site])
        chunks = width // h
        # where each run's v starts in the concatenated v (runs in `order`)
        v_start, pos = {}, 0
        for s, n, a in order:
            v_start[s] = pos
            pos += n * len(a.sites[site].modules) * a.rank
        # per-chunk bag lengths of every row [0, rows): the runs', zeros in between
        lens, expand, v_index, at = [], [], [], 0
        for s, n, a in sparse:  # token order
            si = a.sites[site]
            if s > at:
                lens.append(torch.zeros((s - at) * chunks, dtype=torch.long))
            lens.extend([si.chunk_len] * n)
            expand.extend([si.expand] * n)
            v_index.extend([si.v_index] * n)
            at = s + n
        lens_t = torch.cat(lens)
        # each expand index reads its token's v: + the v start of its token
        ns = torch.tensor([n for _, n, _ in sparse])
        v_len = torch.tensor([len(a.sites[site].modules) * a.rank for _, _, a in sparse])
        per_token = torch.tensor([a.sites[site].v_index.numel() for _, _, a in sparse])
        first = torch.tensor([v_start[s] for s, _, _ in sparse])
        within = _tokens(torch.zeros_like(ns), ns)  # 0..n-1 in every run
        token_v = first.repeat_interleave(ns) + within * v_len.repeat_interleave(ns)
        v_index_t = torch.cat(v_index) + token_v.repeat_interleave(per_token.repeat_interleave(ns))
        return _SitePlan(
            h=h,
            groups=groups,
            rows=at,
            expand=torch.cat(expand, dim=1).to(dev),
            expand_offsets=(torch.cumsum(lens_t, 0) - lens_t).to(device=dev, dtype=idx),
            v_index=v_index_t.to(device=dev, dtype=idx),
            dense=dense,
        )

    def _native_runs(self, site: str, h: int, sparse: list[AdaptedSegment]) -> _NativeRuns:
        """The short runs as rows of run fields: where each run's indices, tokens
        and v are, and (expand) each targeted module's column and chunk count."""
        cols = site_columns(self.spec, site)
        shrink, expand, keep, v_off = [], [], [], 0
        for s, n, a in sparse:
            si = a.sites[site]
            mods, r, g = len(si.modules), a.rank, a.g
            table = torch.tensor(
                [x for m in si.modules for x in (cols[m], self.spec.module_shape(m)[1] // h)],
                dtype=torch.long,
            )
            keep.append(table)
            shrink.append(
                [s, n, g, mods * r // g, si.shrink.data_ptr(), si.shrink.stride(0), v_off]
            )
            expand.append(
                [s, n, r, mods, si.expand.data_ptr(), si.expand.stride(0), v_off, table.data_ptr()]
            )
            v_off += n * mods * r
        return _NativeRuns(
            shrink=torch.tensor(shrink, dtype=torch.long),
            expand=torch.tensor(expand, dtype=torch.long),
            v_size=v_off,
            fan_in=self.spec.module_shape(SITES[site][0])[0],
            keep=keep,
        )

    def _dense(self, site: str, start: int, n: int, adapter: PlacedAdapter) -> _Dense:
        """One dense run: its adapter's matrices for every layer, gathered once."""
        si = adapter.sites[site]
        cols = site_columns(self.spec, site)
        a_parts, b_parts = [], []
        for m in si.modules:
            a_t, b_t = self.dense_weights(adapter, None, m)
            a_parts.append(a_t)
            b_parts.append((cols[m], b_t))
        a = a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts, dim=2)
        return _Dense(start, n, a, b_parts, adapter.rank)

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
        if plan.native is not None:
            nr = plan.native
            x = x if x.stride(1) == 1 else x.contiguous()  # the kernels walk rows
            assert y.stride(1) == 1, "the site's fused output must have unit column stride"
            v = torch.empty(nr.v_size, dtype=y.dtype)
            self.native.shrink(self.pool.tensor, x, nr.fan_in, nr.shrink, layer, v)
            self.native.expand(self.pool.tensor, plan.h, y, v, nr.expand, layer)
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
            y[: plan.rows].add_(delta.view(plan.rows, -1))
        for d in plan.dense:
            ys = y[d.start : d.start + d.n]
            v = x[d.start : d.start + d.n] @ d.a[layer]
            r = d.rank
            for k, (col, b) in enumerate(d.b):
                out = ys[:, col : col + b.shape[2]]
                out.addmm_(v[:, k * r : (k + 1) * r], b[layer])

    def dense_weights(self, adapter: PlacedAdapter, layer: int | None, module: str):
        """A^T [in, r] and (sB)^T [r, out] of one module, gathered into dense
        tensors; layer None: every layer at once ([layers, in, r], [layers, r, out])."""
        return gather_weights(self.pool, self.spec, adapter, layer, module, self._view)


def _tokens(starts: torch.Tensor, ns: torch.Tensor) -> torch.Tensor:
    """The token indices of runs (start, n), in run order."""
    total = int(ns.sum())
    run_first = torch.cumsum(ns, 0) - ns
    return (starts - run_first).repeat_interleave(ns) + torch.arange(total)


def _is_range(tokens: torch.Tensor) -> bool:
    return bool((tokens == torch.arange(tokens.numel())).all())
