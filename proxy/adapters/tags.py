"""Finding tags in text that arrives in pieces.

A stream event may end in the middle of a tag (`<tool_` now, `call>` next
time). Such a tail is ambiguous, so it is held back until the next piece
decides; everything else goes out at once.
"""

from __future__ import annotations

from collections.abc import Sequence


def held(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `tag` (0: nothing to hold)."""
    first = tag[0]
    lo = max(0, len(text) - len(tag) + 1)
    i = text.rfind(first, lo)
    while i >= 0:
        if tag.startswith(text[i:]):
            return len(text) - i
        i = text.rfind(first, lo, i)
    return 0


class StopFilter:
    """Cut the completion at the first template stop string, wherever the stream splits it.

    Servers normally drop stop strings, but some return them (or keep going past
    a special token they print as text); the client must never see them.
    """

    __slots__ = ("stops", "_firsts", "_tail", "done")

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self._firsts = "".join(sorted({s[0] for s in self.stops}))
        self._tail = ""
        self.done = False

    def feed(self, text: str) -> str:
        if self.done:
            return ""
        if self._tail:
            text, self._tail = self._tail + text, ""
        if not any(c in text for c in self._firsts):  # the common case: one C-level scan
            return text
        cut = -1
        for stop in self.stops:
            i = text.find(stop)
            if i >= 0 and (cut < 0 or i < cut):
                cut = i
        if cut >= 0:
            self.done = True
            return text[:cut]
        keep = max(held(text, stop) for stop in self.stops)
        if keep:
            self._tail = text[-keep:]
            return text[:-keep]
        return text

    def finish(self) -> str:
        """End of the completion: a held tail was not a stop string after all."""
        tail, self._tail = self._tail, ""
        return "" if self.done else tail
