"""Metrics, the access log and the proxy's own endpoints, over real loopback sockets.

Metrics live in prometheus-client's process-wide registry, so every test
names its routes uniquely and reads exact values for those labels; series
shared by all tests (unmatched requests, reloads) are read as differences.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.upstreams import upstream_label
from proxy import observe
from proxy.adapters import AdapterBase, CallBase
from proxy.app import create_app
from proxy.cli import metrics_dir
from proxy.reload import TableHolder
from proxy.routes import RouteTable
from servers import run_app

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(base: str) -> Samples:
    r = httpx.get(f"{base}/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def val(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _reset(conn: socket.socket) -> None:
    """Start an SSE answer, send one event, then reset the connection."""
    event = b'data: {"choices": [{"text": "Hel"}]}\n\n'
    conn.sendall(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n" % (len(event), event)
    )
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # close = RST


@contextmanager
def raw_upstream(answer: Callable[[socket.socket], None], stop: threading.Event | None = None) -> Iterator[str]:
    """A one-thread upstream that reads each request, then lets `answer` misbehave on the socket."""
    stop = stop or threading.Event()
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.1)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = next(
                    (int(v) for k, _, v in (h.partition(b":") for h in head.lower().split(b"\r\n")) if k == b"content-length"),
                    0,
                )
                while len(body) < length:
                    body += conn.recv(65536)
                answer(conn)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        t.join(5)
        srv.close()


def test_metrics_count_a_known_sequence_exactly(upstream, routes_dir, proxy_for, access_lines):
    ok, refused, broken, strict = unique("ok"), unique("refused"), unique("broken"), unique("strict")
    with raw_upstream(_reset) as bad:
        folder = routes_dir(
            a=f"name: {ok}\npath: /v1/completions\nupstream: {upstream.url}/v1/completions\n",
            # Port 9: refused (conftest's dead default); a port found free could be the proxy's own next.
            b=f"name: {refused}\npath: /v1/refused\nupstream: http://127.0.0.1:9/v1/completions\n",
            c=f"name: {broken}\npath: /v1/broken\nupstream: {bad}/v1/completions\n",
            d=f"name: {strict}\npath: /v1/strict\nupstream: {upstream.url}/v1/completions\nstream: always\n",
        )
        base = proxy_for(folder)
        before = scrape(base)
        body = {"model": "m", "prompt": "hi"}

        r = httpx.post(f"{base}/v1/completions", json=body, headers={"x-request-id": "t-ok"})
        assert r.status_code == 200
        ok_bytes = len(r.content)
        r = httpx.post(f"{base}/v1/completions", json=body, headers={"x-mock-status": "500", "x-request-id": "t-500"})
        assert r.status_code == 500
        r = httpx.post(f"{base}/v1/refused", json=body, headers={"x-request-id": "t-refused"})
        assert r.status_code == 502
        r = httpx.post(f"{base}/v1/broken", json={**body, "stream": True}, headers={"x-request-id": "t-reset"})
        assert r.status_code == 200 and b'"error"' in r.content  # the failure arrives as an SSE event
        slow = {"x-mock-interval-ms": "100", "x-mock-events": "30", "x-request-id": "t-gone"}
        with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, headers=slow) as r:
            next(r.iter_raw())  # one event, then the client leaves
        r = httpx.post(f"{base}/v1/nowhere", json=body, headers={"x-request-id": "t-404"})
        assert (r.status_code, r.headers["x-request-id"]) == (404, "t-404")  # refusals carry the id too
        r = httpx.request("TRACE", f"{base}/v1/completions", headers={"x-request-id": "t-405"})
        assert r.status_code == 405  # refused by Litestar's router, before our handler
        r = httpx.post(f"{base}/v1/strict", content=b"not json", headers={"x-request-id": "t-400"})
        assert r.status_code == 400

        wait_for(lambda: val(scrape(base), "llmproxy_client_disconnects_total", route=ok) == 1)
        wait_for(lambda: len(access_lines()) == 8)
        m = scrape(base)

    requests = "llmproxy_requests_total"
    # Fallback routes label by the model the client asked for (bounded: FALLBACK_MODELS per route).
    assert val(m, requests, route=ok, model="m", status="200") == 2  # success + the stream the client left
    assert val(m, requests, route=ok, model="m", status="500") == 1
    assert val(m, requests, route=refused, model="m", status="502") == 1
    assert val(m, requests, route=broken, model="m", status="200") == 1
    assert val(m, requests, route=strict, model="other", status="400") == 1  # not JSON: no model
    for status in ("404", "405"):
        unmatched = {"route": "unmatched", "model": "other", "status": status}
        assert val(m, requests, **unmatched) - val(before, requests, **unmatched) == 1
    ours = {ok, refused, broken, strict}
    assert sum(v for (n, labels), v in m.items() if n == requests and dict(labels)["route"] in ours) == 6

    errors = "llmproxy_upstream_errors_total"
    assert val(m, errors, route=ok, kind="non_2xx") == 1
    assert val(m, errors, route=refused, kind="unreachable") == 1
    assert val(m, errors, route=broken, kind="reset") == 1
    assert sum(v for (n, labels), v in m.items() if n == errors and dict(labels)["route"] in ours) == 3

    assert val(m, "llmproxy_client_disconnects_total", route=ok) == 1
    assert val(m, "llmproxy_client_disconnects_total", route=broken) == 0
    assert val(m, "llmproxy_request_duration_seconds_count", route=ok) == 3
    assert val(m, "llmproxy_request_duration_seconds_count", route=refused) == 1
    assert val(m, "llmproxy_request_duration_seconds_count", route=strict) == 1
    # Time to first byte: 2xx answers that sent a byte (the success, the left stream, the broken stream).
    assert val(m, "llmproxy_time_to_first_byte_seconds_count", route=ok) == 2
    assert val(m, "llmproxy_time_to_first_byte_seconds_count", route=broken) == 1
    assert val(m, "llmproxy_time_to_first_byte_seconds_count", route=refused) == 0
    for route in (ok, refused, broken):
        assert val(m, "llmproxy_active_streams", route=route) == 0

    lines = {line["request_id"]: line for line in access_lines()}
    assert set(lines) == {"t-ok", "t-500", "t-refused", "t-reset", "t-gone", "t-404", "t-405", "t-400"}
    assert all(line["event"] == "access" for line in lines.values())
    assert lines["t-ok"]["status"] == 200
    assert lines["t-ok"]["bytes_out"] == ok_bytes
    assert lines["t-ok"]["streamed"] is False and lines["t-ok"]["error"] is None
    assert lines["t-ok"]["ttfb_ms"] <= lines["t-ok"]["duration_ms"]
    assert lines["t-ok"]["upstream"] == f"{upstream.url}/v1/completions"
    assert (lines["t-500"]["status"], lines["t-500"]["error"]) == (500, "non_2xx")
    assert (lines["t-refused"]["status"], lines["t-refused"]["error"]) == (502, "unreachable")
    assert (lines["t-reset"]["status"], lines["t-reset"]["error"], lines["t-reset"]["streamed"]) == (200, "reset", True)
    gone = lines["t-gone"]
    assert (gone["status"], gone["disconnected"], gone["streamed"]) == (200, True, True)
    assert 0 < gone["bytes_out"]
    assert (lines["t-404"]["status"], lines["t-404"]["route"], lines["t-404"]["error"]) == (404, None, "not_found")
    assert (lines["t-405"]["method"], lines["t-405"]["status"], lines["t-405"]["error"]) == ("TRACE", 405, "method_not_allowed")
    assert (lines["t-400"]["status"], lines["t-400"]["route"], lines["t-400"]["error"]) == (400, strict, "invalid_json")
    assert not any(line["disconnected"] for rid, line in lines.items() if rid != "t-gone")


def test_a_client_gone_before_the_first_byte_is_499(routes_dir, proxy_for, access_lines):
    name = unique("silent")
    stop = threading.Event()
    with raw_upstream(lambda conn: stop.wait(5), stop) as silent:  # reads the request, never answers
        base = proxy_for(routes_dir(a=f"name: {name}\npath: /v1/completions\nupstream: {silent}/v1/completions\n"))
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/completions", json={"prompt": "hi"}, timeout=httpx.Timeout(5, read=0.2))
        # The access line is what `observe.record` writes last (a scrape, answered in a thread, can
        # land between its counts and its line): wait for it, then every count is in.
        wait_for(lambda: len(access_lines()) == 1)
        m = scrape(base)
    assert val(m, "llmproxy_requests_total", route=name, model="other", status="499") == 1
    assert val(m, "llmproxy_upstream_errors_total", route=name, kind="timeout") == 0
    assert val(m, "llmproxy_active_streams", route=name) == 0
    (line,) = access_lines()
    assert (line["status"], line["disconnected"], line["bytes_out"], line["ttfb_ms"]) == (499, True, 0, None)


SECRETS = {
    "default-auth": "DEFAULT-SECRET-1",
    "default-key": "DEFAULT-SECRET-2",
    "url": "URL-SECRET-3",
    "client-auth": "CLIENT-SECRET-4",
    "cookie": "COOKIE-SECRET-5",
    "api-key": "APIKEY-SECRET-6",
    "query": "QUERY-SECRET-7",
    "body": "BODY-SECRET-8",
}


def test_the_access_log_never_carries_a_secret(upstream, routes_dir, proxy_for, access_lines):
    text = io.StringIO()
    text_handler = logging.StreamHandler(text)
    text_handler.setFormatter(observe.TextFormatter())
    observe.access_log.addHandler(text_handler)
    name = unique("secret")
    port = upstream.url.rsplit(":", 1)[1]
    folder = routes_dir(
        a=f"""
            name: {name}
            path: /v1/completions
            upstream: http://127.0.0.1:{port}/v1/completions
            default_headers:
              Authorization: Bearer {SECRETS["default-auth"]}
              X-Api-Key: {SECRETS["default-key"]}
        """,
    )
    base = proxy_for(folder)
    client_headers = {
        "authorization": f"Bearer {SECRETS['client-auth']}",
        "cookie": f"session={SECRETS['cookie']}",
        "api-key": SECRETS["api-key"],
        "user-agent": "ua-test/1.0",
    }
    url = f"{base}/v1/completions?api_key={SECRETS['query']}"
    body = {"model": "m", "prompt": f"my key is {SECRETS['body']}"}
    try:
        assert httpx.post(url, json=body, headers=client_headers).status_code == 200
        with httpx.stream("POST", url, json={**body, "stream": True}, headers=client_headers) as r:
            assert r.status_code == 200 and r.read()
        # An upstream that quotes the refused key back in its error body.
        quoting = {**client_headers, "x-mock-status": "401",
                   "x-mock-body": json.dumps({"error": {"message": f"bad key {SECRETS['default-auth']}"}})}
        r = httpx.post(url, json=body, headers=quoting)
        assert r.status_code == 401
        r = httpx.post(f"{base}/v1/elsewhere?api_key={SECRETS['query']}", json=body, headers=client_headers)
        assert r.status_code == 404
        wait_for(lambda: len(access_lines()) == 4)
    finally:
        observe.access_log.removeHandler(text_handler)
    logged = access_lines.raw() + text.getvalue()  # type: ignore[attr-defined]
    for what, secret in SECRETS.items():
        assert secret not in logged, f"the {what} secret reached the access log"
    lines = access_lines()
    assert [line["status"] for line in lines] == [200, 200, 401, 404]
    assert all(line["user_agent"] == "ua-test/1.0" for line in lines)
    assert [line["path"] for line in lines] == ["/v1/completions"] * 3 + ["/v1/elsewhere"]
    assert lines[0]["upstream"] == f"http://127.0.0.1:{port}/v1/completions"
    assert len(text.getvalue().splitlines()) == 4


def test_the_logged_upstream_drops_user_info_and_query():
    url = f"https://user:{SECRETS['url']}@llm.example:8443/v1/completions?key={SECRETS['query']}"
    assert upstream_label(url) == "https://llm.example:8443/v1/completions"


class _UsageCall(CallBase):
    """A relayed call whose adapter read `usage` (as the chat adapter does)."""

    translates = False
    stream = False

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.usage = (3, 5)

    def response(self, body: bytes) -> bytes:
        return body

    def events(self, chunks: Any) -> Any:
        return chunks


class _UsageAdapter(AdapterBase):
    def request(self, body: bytes) -> _UsageCall:
        return _UsageCall(body)


def test_tokens_are_counted_when_the_adapter_reports_usage(upstream, routes_dir, access_lines):
    name, plain = unique("usage"), unique("plain")
    folder = routes_dir(
        a=f"name: {name}\npath: /v1/completions\nupstream: {upstream.url}/v1/completions\nmodels: [qwen, 'qwen2.5-*']\n",
        b=f"name: {plain}\npath: /v1/plain\nupstream: {upstream.url}/v1/completions\n",
    )
    table = RouteTable.from_dir(folder)
    next(r for r in table.routes if r.name == name).adapter = _UsageAdapter()  # type: ignore[assignment]
    with run_app(create_app(table)) as base:
        for model in ("qwen2.5-7b", "qwen2.5-72b", "qwen"):
            assert httpx.post(f"{base}/v1/completions", json={"model": model, "prompt": "hi"}).status_code == 200
        assert httpx.post(f"{base}/v1/plain", json={"model": "qwen", "prompt": "hi"}).status_code == 200
        m = scrape(base)
    # The label is the glob that matched, so client-chosen names cannot grow the series without bound.
    assert val(m, "llmproxy_requests_total", route=name, model="qwen2.5-*", status="200") == 2
    assert val(m, "llmproxy_requests_total", route=name, model="qwen", status="200") == 1
    assert val(m, "llmproxy_prompt_tokens_total", route=name, model="qwen2.5-*") == 6
    assert val(m, "llmproxy_completion_tokens_total", route=name, model="qwen2.5-*") == 10
    assert val(m, "llmproxy_completion_tokens_total", route=name, model="qwen") == 5
    # Passthrough does not parse bodies: no usage, no token series.
    assert val(m, "llmproxy_requests_total", route=plain, model="qwen", status="200") == 1
    assert not any(n.endswith("tokens_total") and ("route", plain) in labels for n, labels in m)
    lines = access_lines()
    assert [(line["model"], line["prompt_tokens"], line["completion_tokens"]) for line in lines] == [
        ("qwen2.5-7b", 3, 5), ("qwen2.5-72b", 3, 5), ("qwen", 3, 5), ("qwen", None, None)
    ]


def test_own_endpoints_are_answered_by_the_proxy_never_proxied(upstream, routes_dir, proxy_for, access_lines):
    base = proxy_for(routes_dir(a=f"path: /v1/completions\nupstream: {upstream.url}/v1/completions\n"))
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    r = httpx.get(f"{base}/readyz")
    assert (r.status_code, r.json()) == (200, {"status": "ok", "routes": 1})
    r = httpx.get(f"{base}/metrics")
    assert r.status_code == 200 and "# TYPE llmproxy_requests_total counter" in r.text
    assert httpx.get(f"{base}/healthz/").status_code == 200
    assert upstream.requests == []
    assert access_lines() == []  # probes and scrapes are not access-logged


def test_readyz_fails_without_routes():
    with run_app(create_app(RouteTable([]))) as base:
        assert httpx.get(f"{base}/healthz").status_code == 200
        r = httpx.get(f"{base}/readyz")
        assert (r.status_code, r.json()["status"]) == (503, "not ready")


def test_reloads_are_counted_by_result(routes_dir):
    from prometheus_client import REGISTRY

    def count(result: str) -> float:
        return REGISTRY.get_sample_value("llmproxy_reloads_total", {"result": result}) or 0.0

    folder = routes_dir(a="path: /v1/completions\nupstream: http://127.0.0.1:9/v1/completions\n")
    holder = TableHolder(RouteTable.from_dir(folder), folder)
    ok, failed = count("ok"), count("failed")
    assert holder.reload() is True
    (folder / "b.yaml").write_text("path: [not, a, path]\n")
    assert holder.reload() is False
    assert (count("ok") - ok, count("failed") - failed) == (1, 1)


def test_model_label_is_the_matching_glob():
    from proxy.config import RouteConfig
    from proxy.routes import Route

    route = Route(RouteConfig(name="r", path="/p", upstream="http://127.0.0.1:9", models=("qwen", "qwen2.5-*")))
    assert observe.model_label(route, "qwen") == "qwen"
    assert observe.model_label(route, "qwen2.5-7b") == "qwen2.5-*"
    assert observe.model_label(route, "llama") == "other"
    assert observe.model_label(route, None) == "other"
    bare = Route(RouteConfig(name=f"bare-{id(route)}", path="/p", upstream="http://127.0.0.1:9"))
    # A fallback route (the shipped ones): the client's name, for the first FALLBACK_MODELS names.
    names = [f"model-{i}" for i in range(observe.FALLBACK_MODELS + 5)]
    assert [observe.model_label(bare, n) for n in names] == names[:observe.FALLBACK_MODELS] + ["other"] * 5
    assert observe.model_label(bare, "model-0") == "model-0"  # a name it has seen keeps its label
    assert observe.model_label(bare, None) == "other" and observe.model_label(bare, "x" * 200) == "other"


def test_text_format_is_one_readable_line():
    rec = observe.RequestRecord(
        time="2025-01-01T00:00:00.000Z", request_id="abc", method="POST", path="/v1/chat/completions",
        route="qwen-chat", model="qwen 2", upstream="http://127.0.0.1:8019/v1/completions", status=200,
        duration_ms=12.5, ttfb_ms=3.25, bytes_out=42, streamed=True, disconnected=False,
    )  # fmt: skip
    line = observe.TextFormatter().format(logging.makeLogRecord({"msg": rec, "levelno": logging.INFO}))
    assert line == (
        "2025-01-01T00:00:00.000Z POST /v1/chat/completions 200 request_id=abc route=qwen-chat "
        'model="qwen 2" upstream=http://127.0.0.1:8019/v1/completions duration_ms=12.5 ttfb_ms=3.25 '
        "bytes_out=42 streamed=true disconnected=false error=- prompt_tokens=- completion_tokens=- client=- user_agent=- key=- ttft_ms=- tpot_ms=- choice=- engine_wait_ms=-"
    )
    other = observe.JsonFormatter().format(logging.makeLogRecord({"msg": "hello %s", "args": ("you",), "name": "x"}))
    assert json.loads(other)["message"] == "hello you"


def test_metrics_dir_for_workers(tmp_path, monkeypatch):
    # setenv first: delenv of an absent variable records nothing to undo, and metrics_dir sets it.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "placeholder")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    assert metrics_dir(1) is None
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    made = metrics_dir(2)
    try:
        assert made is not None and os.environ["PROMETHEUS_MULTIPROC_DIR"] == made
        assert list(Path(made).iterdir()) == []
    finally:
        shutil.rmtree(made)
    # An operator's folder is kept, created if missing, and emptied of a previous run's counts.
    chosen = tmp_path / "prom"
    chosen.mkdir()
    (chosen / "counter_123.db").write_bytes(b"old")
    (chosen / "notes.txt").write_text("keep")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(chosen))
    assert metrics_dir(4) is None
    assert sorted(p.name for p in chosen.iterdir()) == ["notes.txt"]
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "new" / "dir"))
    assert metrics_dir(2) is None and (tmp_path / "new" / "dir").is_dir()


class _CrashingCall(_UsageCall):
    """A translating call whose adapter has a bug: the exchange fails before its start line."""

    translates = True

    def response(self, body: bytes) -> bytes:
        raise RuntimeError("adapter bug")


class _CrashingAdapter(AdapterBase):
    def request(self, body: bytes) -> _CrashingCall:
        return _CrashingCall(body)


def test_a_crash_before_the_answer_is_counted_once(upstream, routes_dir, access_lines, caplog):
    name = unique("crash")
    table = RouteTable.from_dir(routes_dir(a=f"name: {name}\npath: /v1/completions\nupstream: {upstream.url}/v1/completions\n"))
    table.routes[0].adapter = _CrashingAdapter()  # type: ignore[assignment]
    with run_app(create_app(table)) as base:
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "hi"}, headers={"x-request-id": "t-crash"})
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        m = scrape(base)
    # The Exchange's finally recorded it; the app's error handler, which answered the 500, did not again.
    assert val(m, "llmproxy_requests_total", route=name, model="other", status="500") == 1
    assert val(m, "llmproxy_requests_total", route="unmatched", model="other", status="500") == 0
    (line,) = access_lines()
    assert (line["request_id"], line["status"], line["error"], line["route"]) == ("t-crash", 500, "internal_error", name)
    # The error log names the exception and where it was raised, not its message (which could carry a secret).
    assert "internal error on route" in caplog.text and "RuntimeError at" in caplog.text
    assert "adapter bug" not in caplog.text and "adapter bug" not in r.text


# --- operator polish: LLM latency, error sizes, content type, reloads --------------------------


def test_streams_report_time_to_first_token_and_per_output_token(upstream, routes_dir, access_lines):
    name = unique("llm")
    folder = routes_dir(a=f"""
        name: {name}
        path: /v1/chat/completions
        models: [qwen]
        adapter: chat-to-completions
        upstream: {upstream.url}/v1/completions
    """)
    # 5 tokens (the mock counts words), one event each, 100 ms apart: 4 gaps after the first. (At 40 ms
    # apart, one 40 ms stall of the proxy's thread before the first event, on a loaded 2-core machine,
    # put the first token after the second's time and tpot under its bound.)
    hdrs = {"x-mock-text": "one two three four five", "x-mock-events": "5", "x-mock-interval-ms": "100"}
    chat = {"model": "qwen", "messages": [{"role": "user", "content": "hi"}]}
    with run_app(create_app(RouteTable.from_dir(folder))) as base:
        with httpx.stream("POST", f"{base}/v1/chat/completions", json={**chat, "stream": True}, headers=hdrs) as r:
            assert r.status_code == 200 and b"[DONE]" in r.read()
        assert httpx.post(f"{base}/v1/chat/completions", json=chat).status_code == 200
        m = scrape(base)
    streamed, whole = access_lines()
    assert streamed["streamed"] and streamed["completion_tokens"] == 5
    assert 0 < streamed["ttft_ms"] < 100 and streamed["duration_ms"] > 300  # the first event comes at once
    assert 50 < streamed["tpot_ms"] < 500  # ~100 ms between tokens, on a busy 2-core machine
    assert whole["ttft_ms"] is None and whole["tpot_ms"] is None  # only streams have a first token
    assert val(m, "llmproxy_time_to_first_token_seconds_count", route=name, model="qwen") == 1
    assert val(m, "llmproxy_time_per_output_token_seconds_count", route=name, model="qwen") == 1
    assert val(m, "llmproxy_time_per_output_token_seconds_bucket", route=name, model="qwen", le="0.05") == 0
    assert val(m, "llmproxy_time_per_output_token_seconds_bucket", route=name, model="qwen", le="0.5") == 1


def test_error_answers_count_their_bytes(upstream, routes_dir, access_lines):
    folder = routes_dir(a=f"""
        path: /v1/completions
        models: [qwen]
        upstream: {upstream.url}/v1/completions
    """)
    with run_app(create_app(RouteTable.from_dir(folder))) as base:
        answers = [
            httpx.post(f"{base}/v1/nowhere", json={}),  # 404 from Litestar's router
            httpx.post(f"{base}/v1/completions", json={"model": "llama"}),  # 404 model_not_found from the gate
            httpx.post(f"{base}/v1/completions", content=b"{not json"),  # 400 invalid_json
            httpx.post(f"{base}/v1/completions", json={"model": "qwen"}, headers={"x-mock-status": "503"}),
        ]
    lines = access_lines()
    assert [line["status"] for line in lines] == [404, 404, 400, 503]
    assert [line["bytes_out"] for line in lines] == [len(r.content) for r in answers]
    assert all(line["bytes_out"] > 0 for line in lines)


def test_metrics_content_type_names_its_charset_once(routes_dir, proxy_for):
    base = proxy_for(routes_dir(a="path: /v1/completions\nupstream: http://127.0.0.1:9/v1/completions\n"))
    content_type = httpx.get(f"{base}/metrics").headers["content-type"]
    assert content_type.count("charset") == 1, content_type
    assert content_type.startswith("text/plain; version=")


def test_a_reload_drops_the_series_of_deleted_routes(upstream, routes_dir):
    kept, gone = unique("kept"), unique("gone")
    folder = routes_dir(
        a=f"name: {kept}\npath: /v1/a\nupstream: {upstream.url}/v1/completions\n",
        b=f"name: {gone}\npath: /v1/b\nupstream: {upstream.url}/v1/completions\nlimits: {{max_concurrent: 1}}\n",
    )
    holder = TableHolder.load(folder)
    with run_app(create_app(holder)) as base:
        for path in ("/v1/a", "/v1/b"):
            assert httpx.post(f"{base}{path}", json={"model": "m", "prompt": "hi"}).status_code == 200
        before = scrape(base)
        (folder / "b.yaml").unlink()
        assert holder.reload() is True
        after = scrape(base)
    assert val(before, "llmproxy_requests_total", route=gone, model="m", status="200") == 1
    assert not any(("route", gone) in labels for _, labels in after), "a deleted route's series stay"
    assert any(("name", gone) in labels for _, labels in before)  # its limit's series (kind="route")
    assert not any(("name", gone) in labels for _, labels in after), "a deleted route's limit series stay"
    assert val(after, "llmproxy_requests_total", route=kept, model="m", status="200") == 1
