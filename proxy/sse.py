"""Incremental Server-Sent Events: split upstream bytes into events, encode ours.

Real upstreams split one event across reads and may end lines with CRLF or a
lone CR (WHATWG HTML "event stream interpretation"); comments (`:`) and
fields other than `data` are ignored, multi-line `data:` is joined by `\\n`.
"""

from __future__ import annotations

from typing import Any

import msgspec

DONE = b"[DONE]"
DONE_EVENT = b"data: [DONE]\n\n"
_encode = msgspec.json.Encoder().encode


def event(obj: Any) -> bytes:
    """One `data:` event carrying `obj` as JSON."""
    return b"data: " + _encode(obj) + b"\n\n"


class SSEDecoder:
    """Feed bytes as they arrive; get back the `data` of every event completed so far."""

    __slots__ = ("_buf", "_data")

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._buf + chunk if self._buf else chunk
        tail = b""
        if b"\r" in buf:
            if buf.endswith(b"\r"):  # may be the first half of a CRLF split across reads
                buf, tail = buf[:-1], b"\r"
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buf.split(b"\n")
        self._buf = lines.pop() + tail
        return self._lines(lines)

    def close(self) -> list[bytes]:
        """End of stream: an unterminated last event still counts (lenient, like most clients)."""
        rest, self._buf = self._buf.replace(b"\r", b""), b""
        return self._lines([rest, b""] if rest else [b""])

    def _lines(self, lines: list[bytes]) -> list[bytes]:
        events: list[bytes] = []
        data = self._data
        for line in lines:
            if not line:
                if data:
                    events.append(b"\n".join(data))
                    data.clear()
                continue
            if line[0] == 58:  # b":" comment
                continue
            name, _, value = line.partition(b":")
            if name == b"data":
                data.append(value[1:] if value[:1] == b" " else value)
        return events



def named(name: bytes, data: bytes) -> bytes:
    """One event with an `event:` line, as the Anthropic and Responses streams send them
    (the `anthropic` client skips events without one, `anthropic/_streaming.py`)."""
    return b"event: " + name + b"\ndata: " + data + b"\n\n"
