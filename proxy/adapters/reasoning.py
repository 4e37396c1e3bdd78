"""`<think>…</think>` out of completion text, for routes with `reasoning: think`.

Where reasoning starts:
- at a `<think>` that opens the completion (after optional white space), or
- at the very start when the prompt itself ends with `<think>` (templates that
  pre-fill it in the generation prompt), or
- at the very start when the completion closes `</think>` without opening it.
The last case is undecidable until `</think>` arrives (or the completion
ends, and then the text was plain content), so such text is held back; the
first two stream at once. White space next to the tags is dropped. As with
tool calls, one incremental parser serves the whole and the streamed paths.
"""

from __future__ import annotations

from .tags import held

OPEN = "<think>"
CLOSE = "</think>"
_START, _UNDECIDED, _THINK, _ANSWER = range(4)


def prefills_think(prompt: str) -> bool:
    """Did the template leave the model inside a `<think>` block?"""
    return prompt.rstrip().endswith(OPEN)


class ThinkSplitter:
    """Feed completion text; get back `(reasoning, content)` decided so far."""

    __slots__ = ("_state", "_pending", "_lead", "_scanned")

    def __init__(self, prefilled: bool = False) -> None:
        self._state = _THINK if prefilled else _START
        self._pending = ""
        self._lead = True  # drop white space at the start of the current part
        self._scanned = 0  # undecided text already searched for `</think>`

    def feed(self, text: str) -> tuple[str, str]:
        s, self._pending = self._pending + text, ""
        reasoning = ""
        if self._state == _START:
            stripped = s.lstrip()
            if stripped.startswith(OPEN):
                self._state, s = _THINK, stripped[len(OPEN):]
            elif not stripped or OPEN.startswith(stripped):
                self._pending = s
                return "", ""
            else:
                self._state = _UNDECIDED
        if self._state == _UNDECIDED:
            j = s.find(CLOSE, max(0, self._scanned - len(CLOSE) + 1))
            if j < 0:
                self._pending, self._scanned = s, len(s)
                return "", ""
            reasoning = s[:j].strip()
            s = s[j + len(CLOSE):]
            self._state, self._lead = _ANSWER, True
        elif self._state == _THINK:
            j = s.find(CLOSE)
            if j < 0:
                keep = held(s, CLOSE)
                body = s[: len(s) - keep].rstrip()  # white space may precede `</think>`: hold it
                self._pending = s[len(body):]
                return self._lead_strip(body), ""
            reasoning = self._lead_strip(s[:j].rstrip())
            s = s[j + len(CLOSE):]
            self._state, self._lead = _ANSWER, True
        return reasoning, self._lead_strip(s)

    def finish(self) -> tuple[str, str]:
        """End of the completion: held text is decided now."""
        s, self._pending = self._pending, ""
        if self._state == _THINK:
            return self._lead_strip(s), ""  # an unfinished thought (e.g. cut by max_tokens)
        return "", s  # no `</think>` came: it was plain content, as it came

    def _lead_strip(self, text: str) -> str:
        if self._lead and text:
            text = text.lstrip()
            if text:
                self._lead = False
        return text


def split_all(text: str, prefilled: bool = False) -> tuple[str, str]:
    """A whole completion -> (reasoning, content)."""
    splitter = ThinkSplitter(prefilled)
    r1, c1 = splitter.feed(text)
    r2, c2 = splitter.finish()
    return r1 + r2, c1 + c2
