"""Attention over KV blocks that live in pool pages.

Decode rows (one new token each) are batched: their blocks are gathered into a
padded [rows, heads, context, dim] tensor and masked by length. Prefill chunks run
one sequence at a time with a causal mask offset by the tokens already cached
(prefix-cache hits and earlier chunks)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    start: int  # first token of the chunk in the step's flattened tokens
    q_len: int
    ctx_len: int  # tokens in cache after this chunk (cached + q_len)
    block_table: torch.Tensor  # [blocks] page ids covering ctx_len
    mask: torch.Tensor | None = None  # [q_len, ctx_len] bool, None = plain causal


@dataclass
class AttentionMeta:
    slot_pages: torch.Tensor  # [tokens] page of each new token's K/V
    slot_offsets: torch.Tensor  # [tokens] slot inside that page's block
    num_decode: int = 0  # tokens [0, num_decode) are decode rows
    block_tables: torch.Tensor | None = None  # [decode rows, max blocks]
    decode_mask: torch.Tensor | None = None  # [decode rows, 1, 1, max blocks * block]
    prefills: list[PrefillChunk] = field(default_factory=list)
    scale: float = 1.0


def build_meta(
    slot_pages,
    slot_offsets,
    decode_tables: list[list[int]],
    decode_lens: list[int],
    prefills: list[tuple[int, int, int, list[int]]],
    block_size: int,
    scale: float,
    device,
    sliding_window: int | None = None,
) -> AttentionMeta:
    """Assemble the metadata on the host and move it to the device once."""
    meta = AttentionMeta(
        slot_pages=torch.as_tensor(slot_pages, dtype=torch.long).to(device),
        slot_offsets=torch.as_tensor(slot_offsets, dtype=torch.long).to(device),
        num_decode=len(decode_lens),
        scale=scale,
    )
    if decode_lens:
        width = max(len(t) for t in decode_tables)
        tables = torch.zeros(len(decode_tables), width, dtype=torch.long)
        for row, table in enumerate(decode_tables):
            tables[row, : len(table)] = torch.as_tensor(table, dtype=torch.long)
        lens = torch.as_tensor(decode_lens, dtype=torch.long)
        pos = torch.arange(width * block_size)
        mask = pos.view(1, -1) < lens.view(-1, 1)
        if sliding_window is not None:
            mask &= pos.view(1, -1) >= (lens - sliding_window).view(-1, 1)
        meta.block_tables = tables.to(device)
        meta.decode_mask = mask.view(len(decode_lens), 1, 1, -1).to(device)
    for start, q_len, ctx_len, table in prefills:
        cached = ctx_len - q_len
        mask = None
        if cached or sliding_window is not None:
            q_pos = torch.arange(cached, ctx_len).view(-1, 1)
            k_pos = torch.arange(ctx_len).view(1, -1)
            mask = k_pos <= q_pos
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
            mask = mask.to(device)
        meta.prefills.append(
            PrefillChunk(
                start, q_len, ctx_len, torch.as_tensor(table, dtype=torch.long).to(device), mask
            )
        )
    return meta


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta
) -> torch.Tensor:
    """q: [tokens, heads, dim]; caches: [pages, block, kv heads, dim] (strided views)."""
    out = torch.empty_like(q)
    d = meta.num_decode
    if d:
        rows, width = meta.block_tables.shape
        k = _gather(k_cache, meta.block_tables).transpose(1, 2)
        v = _gather(v_cache, meta.block_tables).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q[:d].unsqueeze(2), k, v, attn_mask=meta.decode_mask, scale=meta.scale, enable_gqa=True
        )
        out[:d] = o.squeeze(2)
    for chunk in meta.prefills:
        s, n = chunk.start, chunk.q_len
        k = _gather(k_cache, chunk.block_table.view(1, -1))[:, : chunk.ctx_len].transpose(1, 2)
        v = _gather(v_cache, chunk.block_table.view(1, -1))[:, : chunk.ctx_len].transpose(1, 2)
        qc = q[s : s + n].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(
            qc,
            k,
            v,
            attn_mask=chunk.mask,
            is_causal=chunk.mask is None,
            scale=meta.scale,
            enable_gqa=True,
        )
        out[s : s + n] = o.squeeze(0).transpose(0, 1)
    return out


def _gather(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """[rows, blocks] page ids -> [rows, blocks * block, kv heads, dim]."""
    rows, width = tables.shape
    blocks = cache.index_select(0, tables.reshape(-1))
    return blocks.view(rows, width * cache.shape[1], cache.shape[2], cache.shape[3])
