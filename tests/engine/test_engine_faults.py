"""Errors, disconnects and load against the real engine."""

from __future__ import annotations

import asyncio
import re
import time

import anthropic
import httpx
import openai
import pytest

from conftest import Engine

USER = [{"role": "user", "content": "Tell me a long story."}]


def metric(url: str, name: str) -> float:
    """A counter from a Prometheus text page (llama-server's or the proxy's); 0 when absent."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def busy_slots(engine: Engine) -> int:
    return sum(s["is_processing"] for s in httpx.get(f"{engine.url}/slots", timeout=10).json())


def test_a_prompt_over_the_context_is_the_clients_400_with_the_engines_message(engine: Engine, through):
    long = [{"role": "user", "content": "word " * (engine.ctx_per_slot + 500)}]
    base = through(engine.url)
    with pytest.raises(openai.BadRequestError) as chat:
        openai.OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0, timeout=60).chat.completions.create(
            model="tiny", messages=long, max_tokens=4)
    assert chat.value.status_code == 400
    assert "exceeds the available context size" in chat.value.message
    with pytest.raises(anthropic.BadRequestError) as messages:
        anthropic.Anthropic(base_url=base, api_key="k", max_retries=0, timeout=60).messages.create(
            model="tiny", messages=long, max_tokens=4)
    assert "exceeds the available context size" in messages.value.message


def test_a_client_that_leaves_frees_the_engines_slot(engine: Engine, through):
    """Measured in tokens, not seconds: the engine stops generating a stream nobody reads."""
    base = through(engine.url)
    asked = engine.ctx_per_slot - 100
    before = metric(engine.url, "llamacpp:tokens_predicted_total")
    body = {"model": "tiny", "messages": USER, "stream": True, "max_tokens": asked, "ignore_eos": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(6):  # a few events, then leave
            next(lines)
    deadline = time.monotonic() + 60
    while busy_slots(engine):
        assert time.monotonic() < deadline, "the engine's slot stayed busy"
        time.sleep(0.1)
    generated = metric(engine.url, "llamacpp:tokens_predicted_total") - before
    assert generated < asked / 2


def test_hundreds_of_streams_on_reused_connections_get_no_502(engine: Engine, through):
    """llama-server closes after every stream although it said keep-alive: the proxy resends what that
    swallowed (counted), never answers a 502. 300 streams, 16 at a time."""
    base = through(engine.url)
    before = metric(base, 'llmproxy_retries_total{reason="reused_connection",route="chat"}')

    async def run() -> list[tuple[int, bool]]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=16)) as client:
            sem = asyncio.Semaphore(16)

            async def one(i: int) -> tuple[int, bool]:
                async with sem:
                    body = {"model": "tiny", "stream": True, "max_tokens": 6, "temperature": 0,
                            "messages": [{"role": "user", "content": f"Question number {i}?"}]}
                    r = await client.post(f"{base}/v1/chat/completions", json=body)
                    return r.status_code, r.text.rstrip().endswith("data: [DONE]")

            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(300))), 240)

    results = asyncio.run(run())
    assert [status for status, _ in results] == [200] * 300
    assert all(done for _, done in results)
    resent = metric(base, 'llmproxy_retries_total{reason="reused_connection",route="chat"}') - before
    print(f"resent on a new connection: {resent:g} of 300")
