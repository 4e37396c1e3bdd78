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


def tokenized(upstream) -> tuple[str, int]:
    """The prompt of the proxy's last `/tokenize` call to the mock, and the count the mock gives it
    (asked again directly, so the test holds whatever the mock counts). The mock lists such calls
    in `requests`, or apart in `lookups` where it keeps them."""
    import httpx

    seen = [r for r in [*getattr(upstream.mock, "lookups", []), *upstream.requests] if r.path == "/tokenize"]
    body = json.loads(seen[-1].body)
    count = httpx.post(f"{upstream.url}/tokenize", json=body, timeout=10).json()["count"]
    return body["prompt"], count
