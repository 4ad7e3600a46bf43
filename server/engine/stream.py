"""One request's stream of events: its sequence, incremental text, and the queue
its caller reads. The engine decides when a request ends; this class turns that
into the events and the usage the caller sees."""

from __future__ import annotations

import asyncio
import collections
import time

from lorapool.server.engine.detok import IncrementalDetokenizer
from lorapool.server.engine.sequence import Sequence
from lorapool.types import FinishReason, TokenEvent, TokenLogprob, Usage


class RequestStream:
    def __init__(self, seq: Sequence, detok: IncrementalDetokenizer):
        self.seq = seq
        self.detok = detok
        self.queue: asyncio.Queue = asyncio.Queue()  # TokenEvents, or an exception
        self.aborted = False
        self.done = False

    def token(
        self, token: int, logprob: TokenLogprob | None, eos_ids: set[int], max_len: int
    ) -> tuple[TokenEvent, FinishReason]:
        """The event for a sampled token and whether it ends the request."""
        reason = self._finish_reason(token, eos_ids, max_len)
        cut = self.detok.find_stop() if self.detok.stop else None
        if cut is not None:
            reason = FinishReason.STOP
        text = self.detok.take(final=reason != FinishReason.NONE, cut=cut)
        event = TokenEvent(token_ids=[token], text=text, logprobs=[logprob] if logprob else [])
        return event, reason

    def _finish_reason(self, token: int, eos_ids: set[int], max_len: int) -> FinishReason:
        seq, p = self.seq, self.seq.params
        if token in p.stop_token_ids:
            return FinishReason.STOP
        if not p.ignore_eos and token in eos_ids:
            return FinishReason.EOS
        self.detok.add([token])
        if len(seq.output_ids) >= p.max_new_tokens or seq.num_tokens >= max_len:
            return FinishReason.LENGTH
        return FinishReason.NONE

    def finish(self, reason: FinishReason, event: TokenEvent | None = None) -> None:
        """The last event: its finish reason and the request's usage."""
        self.seq.finish_reason = reason
        self.done = True
        event = event or TokenEvent(token_ids=[], text="")
        event.finish_reason = reason
        event.usage = self.usage()
        self.queue.put_nowait(event)

    def fail(self, exc: Exception) -> None:
        self.done = True
        self.queue.put_nowait(exc)

    def usage(self) -> Usage:
        seq = self.seq
        queue_ms = ((seq.first_scheduled or time.monotonic()) - seq.arrival) * 1000
        ttft = ((seq.first_token_at - seq.arrival) * 1000) if seq.first_token_at else 0.0
        return Usage(
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.output_ids),
            cached_prompt_tokens=seq.num_cached_prompt,
            queue_ms=queue_ms,
            ttft_ms=ttft,
        )


class Throughput:
    """Tokens per second over the last `window_s` seconds of steps."""

    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self._recent: collections.deque = collections.deque(maxlen=256)  # (time, tokens)

    def record(self, now: float, tokens: int) -> None:
        self._recent.append((now, tokens))

    def rate(self, now: float) -> float:
        window = [(t, n) for t, n in self._recent if now - t <= self.window_s]
        if len(window) < 2:
            return 0.0
        return sum(n for _, n in window) / max(now - window[0][0], 1e-6)
