"""Helpers the agent-face tests share: script the mock's text, read named SSE events."""

from __future__ import annotations

import json


def said(text: str, events: int | None = None, **more: str) -> dict[str, str]:
    """Headers scripting the mock's completion text (and its other `x-mock-*` knobs)."""
    headers = {"x-mock-text-json": json.dumps(text), **more}
    if events is not None:
        headers["x-mock-events"] = str(events)
    return headers


def sse_events(text: str) -> list[tuple[str, dict]]:
    """(event line, JSON data) pairs of an SSE body whose every event is named."""
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out
