"""Hermes-style tool calls (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`) out of completion text.

One incremental parser serves both paths: a whole completion is fed once, a
stream piece by piece, so the two cannot disagree. Rules:
- a block whose body is a JSON object with a string `name` becomes a call;
  `arguments` becomes JSON text, the form OpenAI clients expect (`arguments_text`);
- a splitter made with `inside=True` starts within a block: the prompt was
  pre-filled up to `<tool_call>` (a forced tool call);
- a block whose JSON is broken stays in the content verbatim, never dropped;
- an unterminated block at the very end is parsed as if closed (the server
  may have stopped on `</tool_call>`), or kept verbatim when it is not JSON;
- whitespace between text and a block (the template's `\\n` separators) is
  dropped; all other text is content, as it came.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from .tags import held

OPEN = "<tool_call>"
CLOSE = "</tool_call>"


class ParsedCall(NamedTuple):
    name: str
    arguments: str  # a JSON text


def parse_call(body: str) -> ParsedCall | None:
    """The call in one block's body, or None when it is not a valid call."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    return ParsedCall(name, arguments_text(obj.get("arguments", {})))


def arguments_text(args: object) -> str:
    """`arguments` as the JSON text OpenAI clients `json.loads`: a string that holds a JSON object
    is that text already; any other value, a bare string included (`"hello"` -> `"\\"hello\\""`,
    as vLLM answers), is encoded."""
    if isinstance(args, str):
        try:
            if isinstance(json.loads(args), dict):
                return args
        except ValueError:
            pass
    return json.dumps(args, ensure_ascii=False)


class ToolCallSplitter:
    """Feed completion text; get back content strings and `ParsedCall`s in order."""

    __slots__ = ("_pending", "_in_call", "_after_call", "_gap")

    def __init__(self, inside: bool = False) -> None:
        self._pending = ""  # held text: an unfinished block, or trailing white space / a partial `<tool_call>`
        self._in_call = inside
        self._after_call = False  # white space right after a block is dropped
        self._gap = ""  # white space before the open block: kept only if the block is broken

    def feed(self, text: str) -> list[str | ParsedCall]:
        s, self._pending = self._pending + text, ""
        out: list[str | ParsedCall] = []
        while True:
            if self._in_call:
                j = s.find(CLOSE)
                if j < 0:
                    self._pending = s
                    return out
                self._close(s[:j], out, closed=True)
                s = s[j + len(CLOSE):]
                continue
            i = s.find(OPEN)
            if i < 0:
                keep = held(s, OPEN)
                head = s[: len(s) - keep]
                body = head.rstrip()  # trailing white space may precede a block: hold it
                self._pending = s[len(body):]
                self._content(body, out)
                return out
            before = s[:i]
            body = before.rstrip()
            self._content(body, out)
            self._gap = before[len(body):]
            self._in_call = True
            s = s[i + len(OPEN):]

    def finish(self) -> list[str | ParsedCall]:
        """End of the completion: whatever is held is decided now."""
        s, self._pending = self._pending, ""
        out: list[str | ParsedCall] = []
        if self._in_call:
            self._close(s, out, closed=False)
        else:
            self._content(s, out)
        return out

    def _content(self, text: str, out: list[str | ParsedCall]) -> None:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        if text:
            out.append(text)

    def _close(self, body: str, out: list[str | ParsedCall], *, closed: bool) -> None:
        self._in_call = False
        call = parse_call(body)
        gap, self._gap = self._gap, ""
        if call is None:
            self._content(gap + OPEN + body + (CLOSE if closed else ""), out)
        else:
            out.append(call)
            self._after_call = True


def split_all(text: str) -> tuple[str, list[ParsedCall]]:
    """A whole completion -> (content, calls)."""
    splitter = ToolCallSplitter()
    items = splitter.feed(text) + splitter.finish()
    return "".join(x for x in items if isinstance(x, str)), [x for x in items if isinstance(x, ParsedCall)]
