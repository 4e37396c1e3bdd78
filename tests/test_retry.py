"""Retries before the first byte (`retry: {attempts, when, max_wait}`), honouring `Retry-After`."""

from __future__ import annotations

import logging
import time
from email.utils import formatdate

import httpx
import pytest
from prometheus_client import REGISTRY

from proxy.errors import ConfigError
from proxy.retry import retry_after_seconds
from proxy.routes import RouteTable
from servers import run_mock

BODY = {"model": "m", "prompt": "hi", "max_tokens": 3}


def retries(route: str, reason: str) -> float:
    return REGISTRY.get_sample_value("llmproxy_retries_total", {"route": route, "reason": reason}) or 0.0


@pytest.fixture
def second():
    with run_mock() as server:
        yield server


def test_a_503_with_retry_after_goes_to_the_second_upstream_and_the_client_sees_200(
        routes_dir, upstream, second, proxy_for, caplog):  # fmt: skip
    caplog.set_level(logging.WARNING, logger="llmproxy")
    base = proxy_for(routes_dir(two=f"""
        path: /v1/completions
        upstream: [{upstream.url}/v1/completions, {second.url}/v1/completions]
        retry: {{attempts: 2, when: [429, 502, 503, 504, connect, timeout], max_wait: 5}}
    """))
    before = retries("two", "503")
    upstream.mock.script.append({"x-mock-status": "503", "x-mock-retry-after": "4"})
    start = time.monotonic()
    r = httpx.post(f"{base}/v1/completions", json=BODY)
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
    assert time.monotonic() - start < 3  # another upstream is tried at once, not after Retry-After (4 s)
    assert len(upstream.requests) == 1 and len(second.requests) == 1
    assert upstream.requests[0].body == second.requests[0].body  # the same request body
    assert retries("two", "503") == before + 1
    assert any(f"retrying route 'two' on {second.url}/v1/completions after 503 from {upstream.url}/v1/completions"
               in r.getMessage() for r in caplog.records)


def test_one_upstream_is_asked_again_after_its_retry_after(routes_dir, upstream, proxy_for):
    base = proxy_for(routes_dir(one=f"""
        path: /v1/completions
        upstream: {upstream.url}/v1/completions
        retry: {{attempts: 3, when: [503, 429], max_wait: 5}}
    """))
    upstream.mock.script.extend([{"x-mock-status": "503", "x-mock-retry-after": "1"},
                                 {"x-mock-status": "429", "x-mock-retry-after": formatdate(time.time() + 4, usegmt=True)}])
    start = time.monotonic()
    r = httpx.post(f"{base}/v1/completions", json=BODY, timeout=10)
    elapsed = time.monotonic() - start
    assert r.status_code == 200
    assert len(upstream.requests) == 3
    assert 2.9 < elapsed < 7  # 1 s, then the HTTP date: 2-3 s later (it has whole seconds; the default wait is 1 s)


def test_a_retry_after_longer_than_max_wait_goes_to_the_client_at_once(routes_dir, upstream, proxy_for):
    base = proxy_for(routes_dir(one=f"""
        path: /v1/completions
        upstream: {upstream.url}/v1/completions
        retry: {{attempts: 3, when: [503], max_wait: 2}}
    """))
    upstream.mock.script.append({"x-mock-status": "503", "x-mock-retry-after": "120"})
    start = time.monotonic()
    r = httpx.post(f"{base}/v1/completions", json=BODY)
    assert time.monotonic() - start < 1
    assert r.status_code == 503 and r.headers["retry-after"] == "120"
    assert len(upstream.requests) == 1


def test_the_final_failure_is_the_last_upstreams_own_answer(routes_dir, upstream, second, proxy_for):
    base = proxy_for(routes_dir(two=f"""
        path: /v1/completions
        upstream: [{upstream.url}/v1/completions, {second.url}/v1/completions]
        retry: {{attempts: 2, when: [503]}}
    """))
    upstream.mock.script.append({"x-mock-status": "503", "x-mock-body": '{"error": {"message": "first is busy"}}'})
    second.mock.script.append({"x-mock-status": "503", "x-mock-body": '{"error": {"message": "second is busy"}}'})
    r = httpx.post(f"{base}/v1/completions", json=BODY)
    assert r.status_code == 503 and r.json()["error"]["message"] == "second is busy"


def test_statuses_not_listed_are_not_retried(routes_dir, upstream, second, proxy_for):
    base = proxy_for(routes_dir(two=f"""
        path: /v1/completions
        upstream: [{upstream.url}/v1/completions, {second.url}/v1/completions]
        retry: {{attempts: 3, when: [503]}}
    """))
    r = httpx.post(f"{base}/v1/completions", json=BODY, headers={"x-mock-status": "500"})
    assert r.status_code == 500
    assert len(upstream.requests) + len(second.requests) == 1


def test_nothing_is_retried_once_a_byte_went_to_the_client(routes_dir, upstream, second, proxy_for):
    base = proxy_for(routes_dir(two=f"""
        path: /v1/completions
        upstream: [{upstream.url}/v1/completions, {second.url}/v1/completions]
        retry: {{attempts: 3, when: [502, 503, connect, timeout]}}
    """))
    with httpx.stream("POST", f"{base}/v1/completions", json={**BODY, "stream": True},
                      headers={"x-mock-fault": "drop-after:2"}) as r:
        assert r.status_code == 200
        text = r.read().decode()
    assert text.count("data: ") == 3 and '"code":"upstream_broken"' in text  # two events, then the error event
    assert len(upstream.requests) + len(second.requests) == 1


def test_a_timeout_before_the_answer_is_retried_when_listed(routes_dir, upstream, second, proxy_for):
    base = proxy_for(routes_dir(two=f"""
        path: /v1/completions
        upstream: [{upstream.url}/v1/completions, {second.url}/v1/completions]
        timeout: {{read: 0.3}}
        retry: {{when: [timeout]}}
    """))
    upstream.mock.script.append({"x-mock-stall-ms": "3000"})
    r = httpx.post(f"{base}/v1/completions", json=BODY)
    assert r.status_code == 200
    assert len(second.requests) == 1


def test_retry_after_reads_seconds_and_http_dates():
    now = 1_700_000_000.0
    assert retry_after_seconds("3", now) == 3
    assert retry_after_seconds(formatdate(now + 5, usegmt=True), now) == 5
    assert retry_after_seconds(formatdate(now - 5, usegmt=True), now) == 0
    assert retry_after_seconds("soon", now) is None and retry_after_seconds(None, now) is None


def test_a_bare_on_key_is_refused_with_the_reason(routes_dir, upstream):
    folder = routes_dir(r=f"""
        path: /v1/completions
        upstream: {upstream.url}/v1/completions
        retry:
          on: [503]
    """)
    with pytest.raises(ConfigError, match=r"r.yaml:4: retry.on: write `when:` \(YAML 1.1 reads a bare `on` as true\)"):
        RouteTable.from_dir(folder)
    (folder / "r.yaml").write_text(f"path: /x\nupstream: {upstream.url}\nretry: {{when: [200]}}\n")
    with pytest.raises(ConfigError, match=r"retry.when\[0\]: 200 is not an HTTP error status"):
        RouteTable.from_dir(folder)
