"""Choose the next token of each sequence from its logits row.

Every row is processed with its own parameters; a seeded row draws only from its
own torch.Generator, so its tokens do not depend on what else shares the batch."""

from __future__ import annotations

import numpy as np
import torch

from lorapool.types import TokenLogprob

_shared = torch.Generator()
_shared.seed()


def sample(logits: torch.Tensor, seqs) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits: float32 [rows, vocab] on any device; seqs: the matching Sequences.

    Greedy rows are decided where the logits are (only token ids cross to the host);
    rows that need more than an argmax are copied to the host and sampled there."""
    greedy = [
        i
        for i, s in enumerate(seqs)
        if s.params.temperature == 0 and s.params.repetition_penalty == 1
    ]
    tokens = [0] * len(seqs)
    if greedy:
        rows = logits if len(greedy) == len(seqs) else logits[greedy]
        for i, t in zip(greedy, _argmax_rows(rows), strict=True):
            tokens[i] = t
    if len(greedy) == len(seqs) and not any(s.params.logprobs for s in seqs):
        return tokens, [None] * len(seqs)
    logits = logits.float().cpu()
    done = set(greedy)
    for i, seq in enumerate(seqs):
        if i not in done:
            tokens[i] = _sample_row(logits[i], seq)
    logprobs: list[TokenLogprob | None] = [None] * len(seqs)
    for i, seq in enumerate(seqs):
        if seq.params.logprobs:
            logprobs[i] = _logprobs(logits[i], tokens[i], seq.params.logprobs)
    return tokens, logprobs


def _argmax_rows(rows: torch.Tensor) -> list[int]:
    """First maximum of each row. On the CPU numpy's argmax is several times faster
    than torch's for [batch, vocab] rows, with the same ties and NaN rule."""
    if rows.device.type == "cpu":
        return np.argmax(rows.float().numpy(), axis=-1).tolist()
    return rows.argmax(-1).tolist()


def _sample_row(row: torch.Tensor, seq) -> int:
    """One row's token. Robust to any value a row may carry (a penalty or a
    temperature that overflows the logits to inf, a NaN logit): it never raises,
    so one row cannot fail the others of its step."""
    p = seq.params
    row = row.double()  # headroom: logits / a tiny temperature stay finite far longer
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.all_ids)), dtype=torch.long)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    row = torch.nan_to_num(row, nan=float("-inf"))
    if p.temperature == 0:
        return int(row.argmax())
    row = row / p.temperature
    if p.top_k and p.top_k < row.numel():
        kth = torch.topk(row, p.top_k).values[-1]
        row[row < kth] = float("-inf")
    probs = _softmax(row)
    if probs is None:  # nothing finite is left to sample from: fall back to the argmax
        return int(row.argmax())
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cum = sorted_p.cumsum(0)
        drop = cum - sorted_p > p.top_p  # keep the smallest set reaching top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    gen = seq.generator or _shared
    return int(torch.multinomial(probs, 1, generator=gen))


def _softmax(row: torch.Tensor) -> torch.Tensor | None:
    """Probabilities of a row that may hold +-inf (never NaN); +inf entries share
    all the mass. None when no entry can carry any."""
    top = row.max()
    if top == float("inf"):
        probs = (row == top).double()
    elif top == float("-inf"):
        return None
    else:
        probs = torch.softmax(row, -1)
    total = probs.sum()
    if not torch.isfinite(total) or total <= 0:
        return None
    return probs


def _logprobs(row: torch.Tensor, token: int, top: int) -> TokenLogprob:
    lp = torch.log_softmax(row, -1)
    values, ids = lp.topk(min(top, lp.numel()))
    return TokenLogprob(
        token_id=token,
        logprob=float(lp[token]),
        top=list(zip(ids.tolist(), values.tolist(), strict=True)),
    )
