"""Attention over KV blocks that live in pool pages.

Decode rows (one new token each) read K and V straight from the pages, no gather
copy: on a CPU with a float32 pool through attention_kernels.c (native.py), which
needs only each row's block table and length; elsewhere with two embedding_bag
calls: a page stores K transposed per KV head ([head_dim, block]), so q.K for one
block is a q-weighted sum of K^T's rows, and the output is a softmax-weighted sum
of V's rows. Prefill chunks run one sequence at a time with a causal mask offset
by the tokens already cached (prefix-cache hits and earlier chunks)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lorapool.memory.pool import PagePool
from lorapool.server.model import native


@dataclass
class PrefillChunk:
    start: int  # first token of the chunk in the step's flattened tokens
    q_len: int
    ctx_len: int  # tokens in cache after this chunk (cached + q_len)
    block_table: torch.Tensor  # [blocks] page ids covering ctx_len
    mask: torch.Tensor | None = None  # [q_len, ctx_len] bool, None = plain causal


@dataclass
class AttentionMeta:
    """A step's attention inputs, built once and read by every layer. The C kernels
    (native.py) take block tables and slots; the torch path takes flat indices."""

    num_decode: int = 0  # tokens [0, num_decode) are decode rows
    prefills: list[PrefillChunk] = field(default_factory=list)
    scale: float = 1.0
    sliding_window: int | None = None
    # torch path: where new K/V go, and the decode rows' embedding_bag inputs
    k_write: torch.Tensor | None = None  # [tokens * kv heads * head dim] layer-0 elements of K^T
    v_write: torch.Tensor | None = None  # [tokens * kv heads] layer-0 rows (width head dim) of V
    k_rows: torch.Tensor | None = (
        None  # layer-0 rows of K^T (width block) per (row, head, block, d)
    )
    v_rows: torch.Tensor | None = None  # layer-0 rows of V (width head_dim) per (row, head, slot)
    k_offsets: torch.Tensor | None = None
    v_offsets: torch.Tensor | None = None
    decode_bias: torch.Tensor | None = None  # [rows, heads, slots]: 0 or -inf
    # C kernels: each new token's page and slot, each decode row's blocks and length
    slot_pages: torch.Tensor | None = None  # int32 [tokens]
    slot_offsets: torch.Tensor | None = None  # int32 [tokens]
    decode_pages: torch.Tensor | None = None  # int32 [rows, blocks] block tables
    decode_lens: torch.Tensor | None = None  # int32 [rows] tokens cached, the new one too
    decode_scores: torch.Tensor | None = None  # scratch for the scores, shared by layers


def _write_indices(
    pool: PagePool, slot_pages: list[int], slot_offsets: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each new token's K and V go, as flat indices computed once per step, so
    that every layer writes them with two indexed copies (through its offset views)."""
    lay = pool.layout
    bs, nkv, hd = lay.block_size, lay.num_kv_heads, lay.head_dim
    p = pool.page_elems
    pages = torch.as_tensor(slot_pages, dtype=torch.long).view(-1, 1, 1)
    slots = torch.as_tensor(slot_offsets, dtype=torch.long).view(-1, 1, 1)
    heads = torch.arange(nkv).view(1, -1, 1)
    k_write = pages * p + heads * (hd * bs) + torch.arange(hd).view(1, 1, -1) * bs + slots
    v_write = pages[..., 0] * (p // hd) + (nkv + heads[..., 0]) * bs + slots[..., 0]
    return k_write, v_write


def _add_decode_rows(
    meta: AttentionMeta,
    pool: PagePool,
    num_heads: int,
    decode_tables: list[list[int]],
    decode_lens: list[int],
    sliding_window: int | None,
) -> None:
    """The decode rows' embedding_bag indices into K^T and V rows, and the bias that
    masks slots past each row's end (or before its sliding window)."""
    device = pool.device
    lay = pool.layout
    bs, nkv, hd = lay.block_size, lay.num_kv_heads, lay.head_dim
    p = pool.page_elems
    rows, width = len(decode_tables), max(len(t) for t in decode_tables)
    tables = torch.zeros(rows, width, dtype=torch.long)
    for row, table in enumerate(decode_tables):
        tables[row, : len(table)] = torch.as_tensor(table, dtype=torch.long)
    kv_head = torch.arange(num_heads) // (num_heads // nkv)
    d = torch.arange(hd)
    k_rows = (
        tables.view(rows, 1, width, 1) * (p // bs)
        + kv_head.view(1, -1, 1, 1) * hd
        + d.view(1, 1, 1, -1)
    )
    slot = torch.arange(width * bs)
    v_rows = (
        tables[:, slot // bs].view(rows, 1, -1) * (p // hd)
        + (nkv + kv_head).view(1, -1, 1) * bs
        + (slot % bs).view(1, 1, -1)
    )
    lens = torch.as_tensor(decode_lens, dtype=torch.long)
    keep = slot.view(1, -1) < lens.view(-1, 1)
    if sliding_window is not None:
        keep &= slot.view(1, -1) >= (lens - sliding_window).view(-1, 1)
    bias = torch.zeros(rows, 1, width * bs, dtype=pool.dtype)
    bias.masked_fill_(~keep.view(rows, 1, -1), float("-inf"))
    idx = pool.index_dtype
    meta.k_rows = k_rows.reshape(-1).to(device=device, dtype=idx)
    meta.v_rows = v_rows.reshape(-1).to(device=device, dtype=idx)
    meta.k_offsets = (torch.arange(rows * num_heads * width) * hd).to(device=device, dtype=idx)
    meta.v_offsets = (torch.arange(rows * num_heads) * (width * bs)).to(device=device, dtype=idx)
    meta.decode_bias = bias.expand(rows, num_heads, width * bs).contiguous().to(device)


def _prefill_chunk(
    start: int,
    q_len: int,
    ctx_len: int,
    table: list[int],
    sliding_window: int | None,
    device: torch.device,
) -> PrefillChunk:
    """One sequence's chunk: its block table on the device, and a mask only where
    plain causal attention is not enough (cached tokens before it, or a window)."""
    cached = ctx_len - q_len
    mask = None
    if cached or sliding_window is not None:
        q_pos = torch.arange(cached, ctx_len).view(-1, 1)
        k_pos = torch.arange(ctx_len).view(1, -1)
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
        mask = mask.to(device)
    table_t = torch.as_tensor(table, dtype=torch.long).to(device)
    return PrefillChunk(start, q_len, ctx_len, table_t, mask)


class PagedAttention:
    """Reads and writes one layer's K/V in the pool's pages."""

    def __init__(self, pool: PagePool):
        lay = pool.layout
        self.pool = pool
        # Per layer, a rows view of the pool shifted by that layer's offset inside a
        # page, so the same row indices address every layer (no per-layer index math).
        layer_elems = 2 * lay.num_kv_heads * lay.block_size * lay.head_dim
        self.k_views = [
            pool.rows_view(lay.block_size, i * layer_elems) for i in range(lay.num_layers)
        ]
        self.v_views = [
            pool.rows_view(lay.head_dim, i * layer_elems) for i in range(lay.num_layers)
        ]
        self.flat_views = [pool.tensor[i * layer_elems :] for i in range(lay.num_layers)]
        self.layer_elems = layer_elems
        self.native = native.load() if native.wanted(pool.tensor) else None

    def build_meta(
        self,
        num_heads: int,
        slot_pages: list[int],
        slot_offsets: list[int],
        decode_tables: list[list[int]],
        decode_lens: list[int],
        prefills: list[tuple[int, int, int, list[int]]],
        scale: float,
        sliding_window: int | None = None,
    ) -> AttentionMeta:
        """Assemble a step's metadata on the host and move it to the device once."""
        pool = self.pool
        device = pool.device
        meta = AttentionMeta(
            num_decode=len(decode_lens), scale=scale, sliding_window=sliding_window
        )
        if self.native is not None:
            meta.slot_pages = torch.tensor(slot_pages, dtype=torch.int32)
            meta.slot_offsets = torch.tensor(slot_offsets, dtype=torch.int32)
        else:
            k_write, v_write = _write_indices(pool, slot_pages, slot_offsets)
            meta.k_write = k_write.reshape(-1).to(device)
            meta.v_write = v_write.reshape(-1).to(device)
        if decode_lens and self.native is not None:
            width = max(len(t) for t in decode_tables)
            meta.decode_pages = torch.tensor(
                [t + [0] * (width - len(t)) for t in decode_tables], dtype=torch.int32
            )
            meta.decode_lens = torch.tensor(decode_lens, dtype=torch.int32)
            rows = len(decode_lens)
            meta.decode_scores = torch.empty(rows * num_heads * width * pool.layout.block_size)
        elif decode_lens:
            _add_decode_rows(meta, pool, num_heads, decode_tables, decode_lens, sliding_window)
        for start, q_len, ctx_len, table in prefills:
            meta.prefills.append(
                _prefill_chunk(start, q_len, ctx_len, table, sliding_window, device)
            )
        return meta

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta) -> None:
        """k, v: [tokens, kv heads, head dim] of the step's new tokens."""
        if meta.slot_pages is not None:
            if k.stride(2) != 1 or k.stride(1) != k.shape[2]:
                k = k.contiguous()
            if v.stride(2) != 1 or v.stride(1) != v.shape[2]:
                v = v.contiguous()
            self.native.kv_write(
                self.pool.tensor, self.pool.page_elems, layer * self.layer_elems, k, v,
                meta.slot_pages, meta.slot_offsets, self.pool.layout.block_size,
            )  # fmt: skip
            return
        self.flat_views[layer].index_put_((meta.k_write,), k.reshape(-1))
        self.v_views[layer].index_copy_(0, meta.v_write, v.reshape(-1, v.shape[-1]))

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta
    ) -> torch.Tensor:
        """q: [tokens, heads, head dim] -> attention output of the same shape; k, v:
        the step's new keys and values ([tokens, kv heads, head dim]), which a chunk
        with nothing cached before it attends to as they are (no read back)."""
        d = meta.num_decode
        rows = q.shape[0] if meta.prefills else d  # out is contiguous, as the kernel writes it
        out = torch.empty(rows, *q.shape[1:], dtype=q.dtype, device=q.device)
        if d and meta.decode_pages is not None:
            self._native_decode(layer, q[:d], out, meta)
            if not meta.prefills:
                return out
        elif d:
            heads, hd = q.shape[1], q.shape[2]
            blocks = meta.k_offsets.numel() // (d * heads)
            weights = q[:d].unsqueeze(2).expand(d, heads, blocks, hd)
            scores = F.embedding_bag(
                meta.k_rows,
                self.k_views[layer],
                meta.k_offsets,
                mode="sum",
                per_sample_weights=weights.reshape(-1),
            ).view(d, heads, -1)
            # bias + scale * scores in one op (the bias masks slots past each row's end)
            probs = torch.softmax(torch.add(meta.decode_bias, scores, alpha=meta.scale), dim=-1)
            decoded = F.embedding_bag(
                meta.v_rows,
                self.v_views[layer],
                meta.v_offsets,
                mode="sum",
                per_sample_weights=probs.reshape(-1),
            ).view(d, heads, hd)
            if not meta.prefills:
                return decoded
            out[:d] = decoded
        for chunk in meta.prefills:
            s, n = chunk.start, chunk.q_len
            if chunk.ctx_len == n:
                kc = k[s : s + n].transpose(0, 1).unsqueeze(0)
                vc = v[s : s + n].transpose(0, 1).unsqueeze(0)
            else:
                kc, vc = self._gather(layer, chunk)
            qc = q[s : s + n].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(
                qc,
                kc,
                vc,
                attn_mask=chunk.mask,
                is_causal=chunk.mask is None,
                scale=meta.scale,
                enable_gqa=True,
            )
            out[s : s + n] = o.squeeze(0).transpose(0, 1)
        return out

    def _native_decode(
        self, layer: int, q: torch.Tensor, out: torch.Tensor, meta: AttentionMeta
    ) -> None:
        """The decode rows through attention_kernels.c, into out's first rows."""
        if q.stride(2) != 1 or q.stride(1) != q.shape[2]:
            q = q.contiguous()
        lay = self.pool.layout
        self.native.decode_attention(
            self.pool.tensor, self.pool.page_elems, layer * self.layer_elems, q, out,
            meta.decode_pages, meta.decode_lens, lay.num_kv_heads, lay.block_size,
            meta.sliding_window, meta.scale, meta.decode_scores,
        )  # fmt: skip

    def _gather(self, layer: int, chunk: PrefillChunk):
        """[1, kv heads, ctx, head dim] K and V of one sequence."""
        nb = chunk.block_table.numel()
        kt = self.pool.k[:, layer].index_select(0, chunk.block_table)  # [nb, nkv, hd, bs]
        vb = self.pool.v[:, layer].index_select(0, chunk.block_table)  # [nb, nkv, bs, hd]
        nkv, hd, bs = kt.shape[1], kt.shape[2], kt.shape[3]
        k = kt.permute(1, 0, 3, 2).reshape(nkv, nb * bs, hd)[:, : chunk.ctx_len]
        v = vb.transpose(0, 1).reshape(nkv, nb * bs, hd)[:, : chunk.ctx_len]
        return k.unsqueeze(0), v.unsqueeze(0)
