"""Translation cost per face: the same upstream answer through chat, Messages and Responses.

    .venv/bin/python bench/faces.py

CPU only, no network: each face decodes its request (µs per request) and turns a
200-event upstream stream into its own events (µs per upstream event), plain text
and a reasoning + tool-call answer, a fixed number of times; the best of 5 repeats is printed.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.adapters.registry import make_adapter  # noqa: E402
from proxy.config import RouteConfig  # noqa: E402

EVENTS = 200
RUNS = 30
REPEATS = 5
TOOL = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
BODIES = {
    "chat-to-completions": {"model": "q", "stream": True, "tools": [{"type": "function", "function": TOOL}],
                            "messages": [{"role": "user", "content": "Hi"}]},
    "messages-to-completions": {"model": "q", "max_tokens": 512, "stream": True,
                                "tools": [{"name": "get_weather", "input_schema": TOOL["parameters"]}],
                                "messages": [{"role": "user", "content": "Hi"}]},
    "responses-to-completions": {"model": "q", "stream": True, "input": "Hi",
                                 "tools": [{"type": "function", **TOOL}]},
}


def upstream(text_events: list[str]) -> list[bytes]:
    """One SSE read per event, as a streaming upstream sends them, then finish, usage, [DONE]."""
    def ev(text: str, finish: str | None) -> bytes:
        return b"data: " + json.dumps({"id": "cmpl-1", "created": 1, "choices": [
            {"index": 0, "text": text, "finish_reason": finish}]}).encode() + b"\n\n"
    reads = [ev(t, None) for t in text_events] + [ev("", "stop")]
    reads.append(b'data: {"id":"cmpl-1","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":200}}\n\n')
    return reads + [b"data: [DONE]\n\n"]


CASES = {
    "plain": ["word "] * EVENTS,
    "think+tool": (["<think>"] + ["hmm "] * (EVENTS // 2) + ["</think>"] + ["ok "] * (EVENTS // 2 - 4)
                   + ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>']),
}


async def relay(adapter, body: bytes, reads: list[bytes]) -> int:
    call = adapter.request(body)

    async def chunks():
        for r in reads:
            yield r

    n = 0
    async for out in call.events(chunks()):
        n += len(out)
    return n


async def measure() -> None:
    print(f"{'face':26} {'case':11} {'request µs':>10} {'µs/event':>9}")
    for name, body in BODIES.items():
        for case, texts in CASES.items():
            config = RouteConfig(name="b", path="/x", upstream="http://127.0.0.1:9/v1/completions", adapter=name,
                                 reasoning="think" if case != "plain" else "none")
            adapter = make_adapter(config)
            raw = json.dumps(body).encode()
            reads = upstream(texts)
            await relay(adapter, raw, reads)  # warm up
            req_us = ev_us = float("inf")
            for _ in range(REPEATS):  # the best of a few: the machine is shared
                t0 = time.perf_counter()
                for _ in range(RUNS * 10):
                    adapter.request(raw)
                req_us = min(req_us, (time.perf_counter() - t0) / (RUNS * 10) * 1e6)
                t0 = time.perf_counter()
                for _ in range(RUNS):
                    await relay(adapter, raw, reads)
                ev_us = min(ev_us, (time.perf_counter() - t0) / (RUNS * len(reads)) * 1e6)
            print(f"{name:26} {case:11} {req_us:10.1f} {ev_us:9.1f}")


def main() -> None:
    asyncio.run(measure())


if __name__ == "__main__":
    main()
