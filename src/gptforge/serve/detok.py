"""Token ids -> streamed text: incremental detokenization and stop strings with hold-back.

Byte-level BPE splits a Chinese character (3 UTF-8 bytes) or an emoji (4) over several tokens, so decoding token by
token would stream U+FFFD halves. `IncrementalDetokenizer` decodes a small sliding window of ids and releases text
only when the window no longer ends in U+FFFD (the vLLM approach); each step decodes a few tokens, not the whole
output, so a long generation costs linear time. A genuine U+FFFD in the middle of the output is passed through;
one at the very end is released by `flush()` when the generation finishes.

Stop strings are matched on text, because a string like "\\n\\n" has many tokenizations. `StopMatcher` holds back the
longest tail of the text that could still grow into a stop string, so a client never receives a partial stop string
that later turns out to be one; on a match it returns the text before the earliest stop string (which is dropped).
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tok, skip_special: bool = True) -> None:
        self.tok, self.skip_special = tok, skip_special
        self.ids: list[int] = []
        # ids[prefix:read] is already released text kept as left context; ids[read:] is not yet released.
        self.prefix = self.read = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(ids, skip_special=self.skip_special) if ids else ""

    def push(self, new_ids: Sequence[int]) -> str:
        """Add tokens; return the text they complete (possibly "" while a character is still incomplete)."""
        self.ids.extend(new_ids)
        before = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        if len(text) > len(before) and not text.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes to U+FFFD here: the model produced it)."""
        before = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(before) :]


class StopMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.max_hold = max((len(s) - 1 for s in self.stops), default=0)
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to release, whether a stop string matched). After a match, nothing more should be pushed."""
        if not self.stops:
            return text, False
        buf = self.held + text
        first = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if first >= 0:
            self.held = ""
            return buf[:first], True
        # The longest tail that is a proper prefix of some stop string; every shorter candidate lies inside it.
        keep = 0
        for k in range(min(len(buf), self.max_hold), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stops):
                keep = k
                break
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """The held-back tail, released when the generation ends without completing a stop string."""
        held, self.held = self.held, ""
        return held
