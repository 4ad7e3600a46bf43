"""Incremental detokenisation that never emits a broken UTF-8 character, and
stop-string matching that never streams text it may later have to take back."""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids before this are fully emitted and stable
        self.read = 0
        self.text = ""  # all decoded text so far
        self.emitted = 0  # chars of self.text already streamed
        self.stop = [s for s in (stop or []) if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1

    def add(self, token_ids: list[int]) -> None:
        self.ids.extend(token_ids)
        before = self._decode(self.ids[self.prefix : self.read])
        full = self._decode(self.ids[self.prefix :])
        if len(full) > len(before) and not full.endswith("\ufffd"):
            self.text += full[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)

    def find_stop(self) -> int | None:
        """Index in self.text where a stop string starts, if any."""
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def take(self, final: bool = False, cut: int | None = None) -> str:
        """New text safe to stream: holds back what could be a stop string's start,
        unless final; cut truncates the text at a matched stop string."""
        if final and cut is None and self.read < len(self.ids):
            self.text += self._decode(self.ids[self.prefix :])[
                len(self._decode(self.ids[self.prefix : self.read])) :
            ]
            self.read = len(self.ids)
        end = len(self.text) if final else max(self.emitted, len(self.text) - self.holdback)
        if cut is not None:
            end = cut
        out = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return out

    def _decode(self, ids: list[int]) -> str:
        """Text of ids; none without a tokenizer (token-id-only serving)."""
        if not ids or self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)
