"""Upstream health: active checks (`health:`), passive ejection, fail-fast 503, `/readyz`, the
per-upstream gauge, and round-robin shares when an upstream is down."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

import httpx
import pytest

from proxy.routes import RouteTable
from proxy.upstreams import Pool
from servers import free_port, run_mock

BODY = {"model": "m", "prompt": "hi", "max_tokens": 3}
FAST = "{interval: 0.1, timeout: 0.5, unhealthy_after: 2, healthy_after: 1}"


@pytest.fixture
def second():
    with run_mock() as server:
        yield server


def served(server) -> int:
    """Requests the mock served, its health checks left out."""
    return sum(r.path != "/health" for r in server.requests)


def up_gauge(base: str, route: str, url: str) -> float | None:
    text = httpx.get(f"{base}/metrics").text
    m = re.search(rf'^llmproxy_upstream_up\{{route="{route}",upstream="{re.escape(url)}"\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else None


def until(check: Callable[[], bool], seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_a_sick_upstream_is_skipped_after_its_checks_fail_and_returns_when_healthy(
        routes_dir, upstream, second, proxy_for, caplog):  # fmt: skip
    caplog.set_level(logging.INFO, logger="llmproxy")
    a_url, b_url = f"{upstream.url}/v1/completions", f"{second.url}/v1/completions"
    base = proxy_for(routes_dir(pair=f"""
        path: /v1/completions
        upstream: [{a_url}, {b_url}]
        health: {FAST}
    """))
    until(lambda: up_gauge(base, "pair", a_url) == 1)
    upstream.mock.health_status = 503  # e.g. llama.cpp still loading its model
    until(lambda: up_gauge(base, "pair", a_url) == 0)
    served_a = served(upstream)
    for _ in range(6):
        assert httpx.post(f"{base}/v1/completions", json=BODY).status_code == 200
    assert served(upstream) == served_a  # all went to the healthy one
    assert served(second) == 6
    assert httpx.get(f"{base}/readyz").status_code == 200  # one upstream left: still ready
    upstream.mock.health_status = 200
    until(lambda: up_gauge(base, "pair", a_url) == 1)
    for _ in range(6):
        assert httpx.post(f"{base}/v1/completions", json=BODY).status_code == 200
    assert served(upstream) == served_a + 3 and served(second) == 9  # shared again
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"upstream {a_url} of route 'pair' is out after 2 failure(s) in a row" in m
               and "GET /health answered 503" in m for m in messages), messages
    assert any(f"upstream {a_url} of route 'pair' is back up (health check passed)" in m for m in messages)


def test_when_every_upstream_is_out_requests_fail_fast_and_readyz_names_the_route(routes_dir, proxy_for):
    dead = [f"http://127.0.0.1:{free_port()}/v1/completions" for _ in range(2)]
    base = proxy_for(routes_dir(gone=f"""
        path: /v1/completions
        upstream: [{dead[0]}, {dead[1]}]
        health: {FAST}
    """))
    until(lambda: "down" in httpx.get(f"{base}/readyz").json())
    # The process still serves (its clear 503 below): a dead model must not make the pod unready.
    ready = httpx.get(f"{base}/readyz")
    assert ready.status_code == 200 and ready.json()["down"] == ["gone"]
    # Failing fast shows in the code: `no_healthy_upstream` is answered before any connect is tried
    # (a dead loopback port refuses at once anyway, so a time bound told nothing, and 0.5 s is an
    # absolute time a loaded machine can exceed).
    r = httpx.post(f"{base}/v1/completions", json=BODY)
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["code"] == "no_healthy_upstream"
    assert err["message"].startswith("every upstream of route 'gone' is down (health checks): ")
    assert "ConnectionRefusedError" in err["message"]
    assert up_gauge(base, "gone", dead[0]) == 0 and up_gauge(base, "gone", dead[1]) == 0


def test_real_requests_that_cannot_connect_eject_an_upstream_too(routes_dir, upstream, proxy_for, caplog):
    caplog.set_level(logging.WARNING, logger="llmproxy")
    dead = f"http://127.0.0.1:{free_port()}/v1/completions"
    base = proxy_for(routes_dir(pair=f"""
        path: /v1/completions
        upstream: [{dead}, {upstream.url}/v1/completions]
        health: {{interval: 3600, unhealthy_after: 3}}
    """))
    # The first check (at start) fails once; each request that tries the dead one first fails over.
    for _ in range(6):
        assert httpx.post(f"{base}/v1/completions", json=BODY).status_code == 200
    assert up_gauge(base, "pair", dead) == 0
    assert any(f"upstream {dead} of route 'pair' is out after 3 failure(s) in a row" in r.getMessage()
               for r in caplog.records)


def test_the_others_share_a_down_upstreams_traffic_evenly(routes_dir, upstream, second, proxy_for):
    dead = f"http://127.0.0.1:{free_port()}/v1/completions"
    base = proxy_for(routes_dir(three=f"""
        path: /v1/completions
        upstream: [{upstream.url}/v1/completions, {dead}, {second.url}/v1/completions]
    """))
    for _ in range(30):
        assert httpx.post(f"{base}/v1/completions", json=BODY).status_code == 200
    a, c = served(upstream), served(second)
    assert a + c == 30
    assert abs(a - c) <= 2, (a, c)  # the skew this replaced gave 10 / 20


def test_the_round_robin_turn_resumes_after_the_upstream_picked():
    pool = Pool("r", ["http://a", "http://b", "http://c", "http://d"])
    a, b, c, d = pool.members
    pool.failed(a, "refused")
    pool.failed(b, "refused")
    picks = [pool.pick() for _ in range(8)]
    assert picks.count(c) == picks.count(d) == 4


def test_health_is_validated(completions_route, upstream):
    from proxy.errors import ConfigError

    folder = completions_route
    (folder / "r.yaml").write_text(f"path: /v1/completions\nupstream: {upstream.url}\nhealth: {{path: health}}\n")
    with pytest.raises(ConfigError, match=r"r.yaml:3: health.path: must start with '/'"):
        RouteTable.from_dir(folder)


def test_a_route_edit_keeps_what_the_checks_learned(routes_dir):
    import math

    from proxy.health import Monitor
    from proxy.reload import TableHolder

    text = "path: /v1/completions\nupstream: [http://127.0.0.1:9/a, http://127.0.0.1:9/b]\nhealth: {unhealthy_after: 1}\n"
    folder = routes_dir()
    (folder / "r.yaml").write_text(text)
    holder = TableHolder.load(folder)
    monitor = Monitor(holder)
    monitor._adopt(holder.current)
    pool = holder.current.routes[0].pool
    pool.checked(pool.members[0], False, "refused")
    (folder / "r.yaml").write_text(text + "timeout: {read: 30}\n")
    assert holder.reload()
    monitor._adopt(holder.current)
    a, b = holder.current.routes[0].pool.members
    assert a.down_until == math.inf and a.reason == "refused"  # still out: no fresh chance per edit
    assert b.down_until == 0.0


def test_one_dead_upstream_leaves_the_pod_ready_unless_asked_otherwise(routes_dir, upstream, proxy_for):
    """Readiness is about this process (issue 21): with one route's upstream dead, the other
    route still serves, so /readyz stays 200 and names the dead one; `--ready-needs-upstreams`
    (create_app's `ready_needs_upstreams`) turns it into a 503."""
    dead = f"http://127.0.0.1:{free_port()}/v1/completions"
    folder = routes_dir(gone=f"""
        path: /v1/dead
        upstream: {dead}
        health: {FAST}
    """, alive=f"""
        path: /v1/completions
        upstream: {upstream.url}/v1/completions
        health: {FAST}
    """)
    lenient, strict = proxy_for(folder), proxy_for(folder, ready_needs_upstreams=True)
    until(lambda: httpx.get(f"{strict}/readyz").status_code == 503)
    until(lambda: "down" in httpx.get(f"{lenient}/readyz").json())
    ready = httpx.get(f"{lenient}/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ok", "routes": 2, "down": ["gone"]}
    assert httpx.post(f"{lenient}/v1/completions", json=BODY).status_code == 200
    body = httpx.get(f"{strict}/readyz").json()
    assert body["down"] == ["gone"] and "'gone'" in body["reason"]
