"""Incremental detokenization with stop strings, on the event-loop side of the engine.

The deltas it releases, concatenated, are exactly the final text: a multi-byte character is
released only once all its bytes have arrived, and text that could be the start of a stop string
is held back until it is known not to be one.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self._token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._text = ""
        self._released = 0
        self.stopped_by: str | None = None

    @property
    def text(self) -> str:
        return self._text[: self._released]

    def add(self, token_ids: list[int]) -> str:
        """Feed new tokens; returns the text that is now final (may be empty)."""
        if self.stopped_by is not None:
            return ""
        self._token_ids.extend(token_ids)
        self._text += self._decode_complete()
        return self._release(final=False)

    def finish(self) -> str:
        """The request ended: release everything, an incomplete trailing character included."""
        if self.stopped_by is None:
            self._text += self._decode(self._prefix_offset, len(self._token_ids))[
                len(self._decode(self._prefix_offset, self._read_offset)) :
            ]
            self._read_offset = self._prefix_offset = len(self._token_ids)
        return self._release(final=True)

    def _decode(self, start: int, stop: int) -> str:
        text: str = self._tokenizer.decode(self._token_ids[start:stop], skip_special_tokens=True)
        return text

    def _decode_complete(self) -> str:
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._token_ids))
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        return new_text[len(prefix_text) :]

    def _release(self, final: bool) -> str:
        self._check_stop()
        end = len(self._text)
        if not final and self.stopped_by is None:
            end = max(self._released, end - self._holdback)
        delta = self._text[self._released : end]
        self._released = end
        return delta

    def _check_stop(self) -> None:
        if not self._stop or self.stopped_by is not None:
            return
        search_from = max(0, self._released - self._holdback)
        hits = [(self._text.find(s, search_from), s) for s in self._stop]
        found = [(index, s) for index, s in hits if index >= 0]
        if found:
            index, stop = min(found)
            self._text = self._text[:index]
            self.stopped_by = stop
