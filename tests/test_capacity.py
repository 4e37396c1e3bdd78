"""How many streams one process holds, and what a client sees past that: a 503 at once, never a silent wait."""

from __future__ import annotations

import logging
import os
import resource
import subprocess
import sys
import time

import httpx
import pytest

from proxy import capacity, cli
from proxy.app import create_app
from proxy.routes import RouteTable
from servers import run_app

ROUTE = "name: cap\npath: /v1/completions\nupstream: {url}/v1/completions\n"


def test_past_the_upstream_connection_limit_a_request_is_refused_at_once_and_the_slot_comes_back(upstream, routes_dir, proxy_for):
    base = proxy_for(routes_dir(cap=ROUTE.format(url=upstream.url)), max_upstream_connections=1)
    body = {"model": "m", "prompt": "hi", "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=10,
                      headers={"x-mock-text": "first second", "x-mock-hold": "cap-1"}) as held:  # fmt: skip
        assert held.status_code == 200
        chunks = held.iter_raw()
        next(chunks)  # the first event: this stream holds the one upstream connection

        t0 = time.monotonic()
        refused = httpx.post(f"{base}/v1/completions", json={"model": "m", "prompt": "hi"}, timeout=10)
        waited = time.monotonic() - t0
        upstream.release("cap-1")
        rest = b"".join(chunks)
    assert refused.status_code == 503
    assert waited < 5, "refused at once, not parked until the held stream ended"
    err = refused.json()["error"]
    assert err["code"] == "upstream_connections_exhausted"
    assert "limit of 1 upstream connections (--max-upstream-connections)" in err["message"]
    assert "'cap'" in err["message"]
    assert refused.headers["retry-after"] == "1"
    assert b"[DONE]" in rest  # the held stream was not disturbed

    again = httpx.post(f"{base}/v1/completions", json={"model": "m", "prompt": "hi"}, timeout=10)
    assert again.status_code == 200, "the slot is given back when a stream ends"


def test_refusals_are_counted_and_logged_like_any_answer(upstream, routes_dir, proxy_for, caplog):
    base = proxy_for(routes_dir(cap=ROUTE.format(url=upstream.url)), max_upstream_connections=1)
    with caplog.at_level(logging.INFO, logger="llmproxy.access"), \
            httpx.stream("POST", f"{base}/v1/completions", json={"model": "m", "prompt": "hi", "stream": True},
                         headers={"x-mock-hold": "cap-2"}, timeout=10) as held:  # fmt: skip
        chunks = held.iter_raw()
        next(chunks)
        assert httpx.post(f"{base}/v1/completions", json={"model": "m", "prompt": "x"}, timeout=10).status_code == 503
        upstream.release("cap-2")
        b"".join(chunks)
    metrics = httpx.get(f"{base}/metrics", timeout=5).text
    assert 'llmproxy_requests_total{model="m",route="cap",status="503"}' in metrics
    errors = [r.msg.error for r in caplog.records if getattr(r.msg, "status", None) == 503]
    assert errors == ["upstream_connections_exhausted"]


def test_the_default_limit_is_what_the_descriptors_leave_room_for(upstream, routes_dir):
    app = create_app(RouteTable.from_dir(routes_dir(cap=ROUTE.format(url=upstream.url))))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert app.state.slots.limit == (soft - capacity.RESERVED) // 2
    assert create_app(RouteTable([]), max_upstream_connections=7).state.slots.limit == 7


def test_out_of_descriptors_is_a_clear_503_naming_the_limit_not_an_unreachable_upstream(upstream, routes_dir):
    app = create_app(RouteTable.from_dir(routes_dir(cap=ROUTE.format(url=upstream.url))))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with run_app(app) as base, httpx.Client(base_url=base, timeout=10) as client:
        assert client.get("/healthz").status_code == 200  # the client's connection is open before the squeeze
        # A new descriptor takes the lowest free number, and the limit bounds that number: a limit
        # at the lowest free one leaves this process (proxy and mock threads alike) none to open.
        lowest = os.open(os.devnull, os.O_RDONLY)
        os.close(lowest)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))
        try:
            starved = client.post("/v1/completions", json={"model": "m", "prompt": "hi"})
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        after = client.post("/v1/completions", json={"model": "m", "prompt": "hi"})
    assert starved.status_code == 503
    err = starved.json()["error"]
    assert err["code"] == "out_of_file_descriptors"
    assert f"soft RLIMIT_NOFILE {lowest}" in err["message"] and "'cap'" in err["message"]
    assert "ulimit -n" in err["message"]
    assert after.status_code == 200, "the upstream was not marked down for the proxy's own shortage"


def test_start_up_raises_the_open_file_limit_to_the_hard_limit():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip("the hard limit leaves no room to show a raise")
    code = ("import resource; h = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, h)); "
            "from proxy import capacity; print(*capacity.raise_open_files())")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    before, after, reported_hard = (int(x) for x in done.stdout.split())
    assert before == 256 and after > 256
    assert after == (hard if hard != resource.RLIM_INFINITY else after) and reported_hard == hard


def test_the_start_up_log_names_the_descriptor_limit_and_the_connection_limit(caplog):
    with caplog.at_level(logging.INFO, logger="llmproxy"):
        cli._log_capacity(0, 1)
        cli._log_capacity(300, 2)
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    first, second = (r.getMessage() for r in caplog.records if r.getMessage().startswith("open files"))
    assert f"upstream connections: at most {(soft - capacity.RESERVED) // 2} per process (sized from the open-file limit)" in first
    assert "at most 300 per process (--max-upstream-connections), 2 process(es)" in second
    assert str(soft) in first


def test_the_read_timeout_spans_the_wait_between_chunks_not_the_whole_stream(upstream, routes_dir, proxy_for):
    """One timer per `timeout.read` (transport.LazyReadTimeout), not one per chunk: a stream longer
    than the read timeout whose chunks keep coming completes; a pause longer than it is a timeout."""
    route = ROUTE.format(url=upstream.url) + "timeout: {connect: 2, read: 0.6}\n"
    base = proxy_for(routes_dir(cap=route))
    body = {"model": "m", "prompt": "hi", "stream": True}
    steady = httpx.post(f"{base}/v1/completions", json=body, timeout=10,
                        headers={"x-mock-text": "a b c d e f g h", "x-mock-interval-ms": "200"})  # 1.6 s in all
    assert steady.status_code == 200
    assert steady.text.count("data: ") == 10 and "error" not in steady.text  # 8 words, the stop event, [DONE]

    t0 = time.monotonic()
    stalled = httpx.post(f"{base}/v1/completions", json=body, timeout=10,
                         headers={"x-mock-text": "a b c d", "x-mock-interval-ms": "200",
                                  "x-mock-stall-after": "2", "x-mock-stall-ms": "8000"})  # fmt: skip
    took = time.monotonic() - t0
    assert "upstream_timeout" in stalled.text and "0.6 s (timeout.read)" in stalled.text
    # ~1 s expected; an 8 s stall leaves room for a loaded machine (2.5 s against 3 s was tight).
    assert took < 5, "the stall was cut at the read timeout, not when it ended"


def test_a_process_near_its_descriptor_limit_says_so_in_the_log():
    assert capacity.usage_warning(100, 1000) is None
    message = capacity.usage_warning(950, 1000)
    assert message is not None and "950 of the limit of 1000 in use" in message and "ulimit -n" in message


def test_the_cli_flag_reaches_the_app_through_the_environment(upstream, routes_dir, monkeypatch):
    import gc

    from proxy import observe
    from proxy.app import app_from_env

    # Process-wide start-up tuning for a server process, not for the test process.
    monkeypatch.setattr(gc, "freeze", lambda: None)
    monkeypatch.setattr(gc, "set_threshold", lambda *a: None)
    monkeypatch.setattr(observe, "lean_log_records", lambda: None)
    monkeypatch.setenv("LLMPROXY_ROUTES", str(routes_dir(cap=ROUTE.format(url=upstream.url))))
    monkeypatch.setenv("LLMPROXY_MAX_UPSTREAM_CONNECTIONS", "3")
    assert app_from_env().state.slots.limit == 3
    monkeypatch.setenv("LLMPROXY_MAX_UPSTREAM_CONNECTIONS", "0")
    assert app_from_env().state.slots.limit == capacity.default_connections()


def test_a_negative_limit_is_a_usage_error(capsys, tmp_path):
    (tmp_path / "r.yaml").write_text("name: r\npath: /v1/completions\nupstream: http://127.0.0.1:9/v1/completions\n")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--routes", str(tmp_path), "--max-upstream-connections", "-1"])
    assert exit_.value.code == cli.EXIT_CONFIG
    assert "argument --max-upstream-connections: must be an integer from 0 to 10000000, got -1" in capsys.readouterr().err


def test_a_shorter_read_timeout_holds_on_a_connection_a_longer_one_used_before(upstream, routes_dir, proxy_for):
    """Two routes to one upstream share pooled connections; each keeps its own timeout.read."""
    long = "name: long\npath: /long\nupstream: {url}/v1/completions\ntimeout: {{connect: 2, read: 30}}\n"
    short = "name: short\npath: /short\nupstream: {url}/v1/completions\ntimeout: {{connect: 2, read: 0.5}}\n"
    base = proxy_for(routes_dir(long=long.format(url=upstream.url), short=short.format(url=upstream.url)))
    body = {"model": "m", "prompt": "hi", "stream": True}
    with httpx.Client(base_url=base, timeout=10) as client:
        assert client.post("/long", json=body).status_code == 200  # leaves a pooled connection behind
        t0 = time.monotonic()
        cut = client.post("/short", json=body, headers={"x-mock-stall-after": "1", "x-mock-stall-ms": "8000"})
        took = time.monotonic() - t0
    assert "0.5 s (timeout.read)" in cut.text
    # ~0.5 s expected; an 8 s stall leaves room for a loaded machine (2 s against 3 s was tight).
    assert took < 5, "cut at the short route's read timeout, not the long one's"
