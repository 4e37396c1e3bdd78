"""Concurrency limits with a bounded FIFO queue (`limits:` on a route, `max_concurrent` on a key),
against a real mock upstream that counts how many requests it serves at once."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from proxy.keys import KeysHolder

SLOW = {"x-mock-stall-ms": "1000"}  # each request holds the upstream for a second
BODY = {"model": "m", "prompt": "hi", "max_tokens": 3}


def gauge(metrics: str, name: str, limit: str) -> float:
    m = re.search(rf'^{name}\{{kind="route",name="{limit}"\}} (\S+)$', metrics, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.fixture
def limited(routes_dir, upstream, proxy_for):
    def start(limits: str, **kw: object) -> str:
        upstream.mock.track_peak = True
        return proxy_for(routes_dir(slow=f"""
            path: /v1/completions
            upstream: {upstream.url}/v1/completions
            limits: {limits}
        """), **kw)

    return start


async def _until(check, what: str, within: float = 10) -> None:
    """Poll (in the test's loop) until `check()` holds: what the proxy has seen, not a guessed delay."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def _post_many(url: str, n: int, headers: dict[str, str], timeout: float = 20) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=n)) as client:
        return await asyncio.gather(*(client.post(url, json=BODY, headers=headers) for _ in range(n)))


def test_two_in_flight_two_queued_the_rest_429_and_the_queued_ones_complete(limited, upstream):
    base = limited("{max_concurrent: 2, queue: 2, queue_timeout: 10}")
    # Each holds the upstream 2 s: all ten must reach the proxy while the first pair is held (with 1 s
    # and a fixed 0.5 s sleep before reading the gauges, a loaded machine could miss either).
    slow = {"x-mock-stall-ms": "2000"}

    async def run() -> tuple[list[httpx.Response], str]:
        task = asyncio.ensure_future(_post_many(f"{base}/v1/completions", 10, slow))
        async with httpx.AsyncClient(timeout=10) as c:
            seen = ""

            async def full() -> bool:
                nonlocal seen
                seen = (await c.get(f"{base}/metrics")).text
                counts = gauge(seen, "llmproxy_limit_in_flight", "slow"), gauge(seen, "llmproxy_limit_queued", "slow")
                return counts == (2, 2)

            await _until(full, "two in flight and two queued")
        return await task, seen

    start = time.monotonic()
    responses, metrics = asyncio.run(run())
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 4 + [429] * 6
    assert upstream.mock.peak_busy == 2  # never more than two at the upstream
    assert len(upstream.requests) == 4
    assert gauge(metrics, "llmproxy_limit_in_flight", "slow") == 2
    assert gauge(metrics, "llmproxy_limit_queued", "slow") == 2
    for r in responses:
        if r.status_code == 429:
            assert 1 <= int(r.headers["retry-after"]) <= 10  # estimated (test_retry_after_...), at most queue_timeout
            err = r.json()["error"]
            assert err["code"] == "rate_limit_exceeded"
            assert "route 'slow' is at its limit: 2 request(s) in flight, 2 queued" in err["message"]
    assert 3.9 < time.monotonic() - start < 12  # the queued pair ran after the first pair: two rounds of 2 s
    after = httpx.get(f"{base}/metrics").text
    assert gauge(after, "llmproxy_limit_in_flight", "slow") == 0 and gauge(after, "llmproxy_limit_queued", "slow") == 0
    assert 'llmproxy_limit_rejections_total{kind="route",name="slow",reason="queue_full"}' in after


def test_a_wait_longer_than_queue_timeout_is_answered_429(limited, upstream):
    base = limited("{max_concurrent: 1, queue: 5, queue_timeout: 0.3}")
    start = time.monotonic()
    responses = asyncio.run(_post_many(f"{base}/v1/completions", 2, SLOW))
    assert sorted(r.status_code for r in responses) == [200, 429]
    refused = next(r for r in responses if r.status_code == 429)
    assert "no free slot on route 'slow' within 0.3 s (limits queue_timeout)" in refused.json()["error"]["message"]
    assert refused.headers["retry-after"] == "1"
    assert time.monotonic() - start < 3


def test_a_queued_client_that_leaves_frees_its_place_at_once(limited, upstream):
    base = limited("{max_concurrent: 1, queue: 1, queue_timeout: 10}")
    url = f"{base}/v1/completions"

    async def run() -> tuple[int, str]:
        async with httpx.AsyncClient(timeout=10) as c:
            # Steps wait for what the proxy has seen (fixed sleeps of 0.2 and 0.1 s before): the first
            # request at the upstream, then the leaver's place freed; the first holds its slot 3 s.
            first = asyncio.ensure_future(c.post(url, json=BODY, headers={"x-mock-stall-ms": "3000"}))

            async def at_upstream() -> bool:
                return len(upstream.requests) == 1

            await _until(at_upstream, "the first request at the upstream")
            metrics = ""

            def queued(n: int) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:
                    nonlocal metrics
                    metrics = (await c.get(f"{base}/metrics")).text
                    return gauge(metrics, "llmproxy_limit_queued", "slow") == n

                return check

            # Queued, then gives up: it leaves once the proxy has queued it (a 0.3 s client timeout
            # before could fire before a loaded proxy had even read the request).
            leaver = asyncio.ensure_future(c.post(url, json=BODY))
            await _until(queued(1), "the second request queued")
            leaver.cancel()
            with pytest.raises(asyncio.CancelledError):
                await leaver
            await _until(queued(0), "the leaver's place freed", within=2)
            assert not first.done(), "the first request still holds the slot"
            third = await c.post(url, json=BODY)  # takes the freed place in the queue, not a 429
            assert (await first).status_code == 200
            return third.status_code, metrics

    status, metrics = asyncio.run(run())
    assert status == 200
    assert gauge(metrics, "llmproxy_limit_queued", "slow") == 0
    assert len(upstream.requests) == 2  # the one that left never reached the upstream


def test_a_stream_holds_its_slot_until_its_last_byte(limited, upstream):
    base = limited("{max_concurrent: 1}")
    url = f"{base}/v1/completions"
    with httpx.Client(timeout=10) as c:
        with c.stream("POST", url, json={**BODY, "stream": True}, headers={"x-mock-hold": "s1"}) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")  # the stream has begun
            r = c.post(url, json=BODY)
            assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) < 30
            upstream.release("s1")
            assert "data: [DONE]" in list(lines)
        assert c.post(url, json=BODY).status_code == 200  # the slot came back with the stream's end


def test_a_keys_max_concurrent_limits_that_key_only(completions_route, proxy_for, tmp_path: Path):
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n  - name: alice\n    key: sk-alice-1-0000000000\n    max_concurrent: 1\n  - name: ci\n    key: sk-ci-1-00000000000\n")
    base = proxy_for(completions_route, keys=KeysHolder.load(keys))
    url = f"{base}/v1/completions"

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=10) as c:
            return await asyncio.gather(
                c.post(url, json=BODY, headers={**SLOW, "x-api-key": "sk-alice-1-0000000000"}),
                c.post(url, json=BODY, headers={**SLOW, "x-api-key": "sk-alice-1-0000000000"}),
                c.post(url, json=BODY, headers={**SLOW, "x-api-key": "sk-ci-1-00000000000"}),
                c.post(url, json=BODY, headers={**SLOW, "x-api-key": "sk-ci-1-00000000000"}),
            )

    alice1, alice2, ci1, ci2 = asyncio.run(run())
    assert sorted([alice1.status_code, alice2.status_code]) == [200, 429]
    assert ci1.status_code == ci2.status_code == 200
    refused = alice1 if alice1.status_code == 429 else alice2
    assert "key 'alice' is at its limit" in refused.json()["error"]["message"]
    metrics = httpx.get(f"{base}/metrics").text
    assert 'llmproxy_limit_rejections_total{kind="key",name="alice",reason="queue_full"}' in metrics


def test_limits_are_validated_like_any_route_field(completions_route, upstream):
    from proxy.errors import ConfigError
    from proxy.routes import RouteTable

    folder = completions_route
    (folder / "r.yaml").write_text(f"path: /v1/completions\nupstream: {upstream.url}\nlimits: {{max_concurrent: 0}}\n")
    with pytest.raises(ConfigError, match=r"r.yaml:3: limits.max_concurrent: must be at least 1"):
        RouteTable.from_dir(folder)


def test_the_queue_is_first_in_first_out_and_a_raised_limit_admits_waiters_at_once():
    from proxy.limits import Limiter

    async def never() -> dict[str, str]:
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def run() -> list[str]:
        lim = Limiter("route", "unit-fifo", 1, 3, 10)
        order: list[str] = []
        first = await lim.acquire(never)
        assert first is not None

        async def wait(name: str) -> None:
            assert await lim.acquire(never)
            order.append(name)

        tasks = []
        for name in ("b", "c", "d"):
            tasks.append(asyncio.ensure_future(wait(name)))
            await asyncio.sleep(0.01)  # queued in this order
        assert lim.try_acquire() is None  # no overtaking the queue
        lim.release(first)
        await asyncio.sleep(0.01)
        assert order == ["b"]
        lim.configure(3, 3, 10)  # a reload raised the limit: both remaining waiters go now
        await asyncio.gather(*tasks)
        assert order == ["b", "c", "d"] and lim.active == 3
        return order

    asyncio.run(run())


def test_the_queue_wait_is_measured(limited, upstream):
    base = limited("{max_concurrent: 1, queue: 5, queue_timeout: 0.3}")
    asyncio.run(_post_many(f"{base}/v1/completions", 2, SLOW))
    metrics = httpx.get(f"{base}/metrics").text
    m = re.search(r'^llmproxy_limit_queue_wait_seconds_count\{kind="route",name="slow"\} (\S+)$', metrics, re.M)
    assert m and float(m.group(1)) >= 1  # the one that waited (and was refused after 0.3 s) is counted


def test_a_messages_route_answers_its_limit_in_anthropics_shape(routes_dir, upstream, proxy_for):
    base = proxy_for(routes_dir(msg=f"""
        path: /v1/messages
        upstream: {upstream.url}/v1/completions
        adapter: messages-to-completions
        limits: {{max_concurrent: 1, queue: 0}}
    """))
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=20, limits=httpx.Limits(max_connections=2)) as c:
            return await asyncio.gather(*(c.post(f"{base}/v1/messages", json=body, headers=SLOW) for _ in range(2)))

    responses = asyncio.run(run())
    assert sorted(r.status_code for r in responses) == [200, 429]
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"]
    doc = refused.json()
    assert doc["type"] == "error" and doc["error"]["type"] == "rate_limit_error"
    assert "route 'msg' is at its limit" in doc["error"]["message"]


def test_retry_after_is_estimated_from_how_long_slots_are_held_not_queue_timeout(limited, upstream):
    """Issue 21 item 8: a refused client is told the wait the limiter sees (hold times, the line ahead),
    at least 1 s and at most queue_timeout; before, always queue_timeout (30 s: the openai SDK stalls)."""
    base = limited("{max_concurrent: 1, queue: 0, queue_timeout: 30}")
    url = f"{base}/v1/completions"
    stall = {"x-mock-stall-ms": "1500"}

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(timeout=20) as c:
            for _ in range(2):  # the limiter learns how long a slot is held: ~1.5 s
                assert (await c.post(url, json=BODY, headers=stall)).status_code == 200
            held = asyncio.ensure_future(c.post(url, json=BODY, headers=stall))

            async def holding() -> bool:  # (a fixed 0.3 s sleep before: the next could overtake it)
                return len(upstream.requests) == 3

            await _until(holding, "the held request at the upstream")
            refused = await c.post(url, json=BODY)
            assert (await held).status_code == 200
            return refused

    refused = asyncio.run(run())
    assert refused.status_code == 429
    assert 2 <= int(refused.headers["retry-after"]) <= 5  # one slot, nobody queued: about one hold time


def test_retry_after_grows_with_the_line_ahead_and_stays_within_1_s_and_queue_timeout():
    """Issue 21 item 8, the arithmetic: hold time x (queued + 1) / slots, rounded up, in [1, queue_timeout]."""
    from proxy.limits import Limiter

    async def run() -> list[str]:
        lim = Limiter("route", "unit-retry-after", 2, 100, 30)
        lim.hold_time = 4.0  # slots are held 4 s on average
        seen = [lim.retry_after()]  # nobody queued: 4 x 1 / 2
        loop = asyncio.get_running_loop()
        lim.waiters.extend(loop.create_future() for _ in range(5))
        seen.append(lim.retry_after())  # five ahead: 4 x 6 / 2
        lim.waiters.extend(loop.create_future() for _ in range(45))
        seen.append(lim.retry_after())  # fifty ahead: 102 s, capped at queue_timeout
        lim.waiters.clear()
        lim.hold_time = 0.1
        seen.append(lim.retry_after())  # slots free within a second: still 1
        return seen

    assert asyncio.run(run()) == ["2", "12", "30", "1"]
