"""The fault matrix over real loopback sockets: what the client sees when things go wrong,
and that no upstream connection outlives the request that opened it.

Each case names the exact status, error shape and message. One mock upstream and one proxy
serve the whole matrix (starting uvicorn per case would cost more than the cases), so the
leak check is the mock's `busy_connections`: a connection still in the middle of a request.
Idle keep-alive connections in the proxy's pool are open but never busy, and every staged
stall outlasts the check, so a busy count of 0 proves the proxy closed the connection.
Tests that need "no connection open at all" start their own proxy.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.abc
import httpx
import openai
import pytest

from proxy import errors
from proxy.adapters import AdapterBase, CallBase
from proxy.app import create_app
from proxy.routes import RouteTable
from proxy.sse import SSEDecoder
from servers import free_port, run_app, run_mock

SECRET = "s3cret-route-key"


# --- loopback fixtures that a mock server cannot stage ------------------------------------


@pytest.fixture(scope="module")
def silent() -> Iterator[socket.socket]:
    """A listener that accepts connections (kernel backlog) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield s
    s.close()


@pytest.fixture(scope="module")
def full_backlog() -> Iterator[int]:
    """A port whose accept queue is full: the kernel drops new SYNs, so connect() hangs."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(0)
    port = s.getsockname()[1]
    fillers = []
    for _ in range(4):
        f = socket.socket()
        f.setblocking(False)
        try:
            f.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(f)
    time.sleep(0.05)
    yield port
    for f in fillers:
        f.close()
    s.close()


class NoSuchHost(aiohttp.abc.AbstractResolver):
    """What getaddrinfo says for an unknown name, without a DNS packet leaving the machine
    (this sandbox's resolver is not on loopback, so a real `.invalid` lookup would)."""

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> Any:
        raise OSError(socket.EAI_NONAME, "Name or service not known")

    async def close(self) -> None:
        return None


class JsonEvents(AdapterBase):
    """A minimal translating adapter: re-emits each SSE event, refusing data that is not JSON.
    Stands in for chat-to-completions, which raises `errors.BadUpstreamEvent` the same way."""

    class _Call(CallBase):
        translates = True
        stream = True

        def __init__(self, body: bytes) -> None:
            self.body = body

        def response(self, body: bytes) -> bytes:
            return body

        async def events(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
            decoder = SSEDecoder()
            async for chunk in chunks:
                for data in decoder.feed(chunk):
                    if data != b"[DONE]":
                        try:
                            json.loads(data)
                        except ValueError:
                            raise errors.BadUpstreamEvent(f"event data is not JSON: {data[:13].decode()}…") from None
                    yield b"data: " + data + b"\n\n"

    def request(self, body: bytes) -> JsonEvents._Call:
        return self._Call(body)


def stats(upstream: Any) -> dict[str, int]:
    return httpx.get(f"{upstream.url}/_mock/stats").json()


def settle(upstream: Any, *, open_max: int = 1000, within: float = 5.0) -> dict[str, int]:
    """Wait (bounded) until the mock holds no busy connection and at most `open_max` open ones
    (the mock's thread sees a closed connection a moment after the proxy's answer: 5 s of room)."""
    deadline = time.monotonic() + within
    while True:
        s = stats(upstream)
        if s["busy_connections"] == 0 and s["open_connections"] <= open_max:
            return s
        if time.monotonic() > deadline:
            return s
        time.sleep(0.02)


def no_leak(upstream: Any) -> None:
    assert settle(upstream)["busy_connections"] == 0


# --- the proxy under test ----------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory, silent, full_backlog) -> Iterator[dict[str, Any]]:
    with run_mock() as upstream:
        yield from _env(upstream, tmp_path_factory.mktemp("routes"), silent, full_backlog)


def _env(upstream: Any, folder: Path, silent: socket.socket, full_backlog: int) -> Iterator[dict[str, Any]]:
    silent_port = silent.getsockname()[1]
    refused = free_port()  # nothing listens there
    files = dict(
        comp=f"""
            path: /v1/completions
            upstream: {upstream.url}/v1/completions
            default_headers: {{Authorization: Bearer {SECRET}}}
            timeout: {{connect: 1, read: 0.3}}
        """,
        patient=f"""
            path: /patient/v1/completions
            upstream: {upstream.url}/v1/completions
            timeout: {{read: 10}}
        """,
        refused=f"""
            path: /refused/v1/completions
            upstream: http://127.0.0.1:{refused}/v1/completions
            default_headers: {{Authorization: Bearer {SECRET}}}
        """,
        silent=f"""
            path: /silent/v1/completions
            upstream: http://127.0.0.1:{silent_port}/v1/completions
            timeout: {{read: 0.3}}
        """,
        backlog=f"""
            path: /backlog/v1/completions
            upstream: http://127.0.0.1:{full_backlog}/v1/completions
            timeout: {{connect: 0.3}}
        """,
        tls=f"""
            path: /tls/v1/completions
            upstream: https://127.0.0.1:{upstream.port}/v1/completions
        """,
        pinned=f"""
            path: /pinned
            upstream: {upstream.url}/v1/completions
            stream: never
        """,
        qwen=f"""
            path: /by-model
            models: ["qwen*"]
            upstream: {upstream.url}/v1/completions
        """,
    )
    for name, text in files.items():
        (folder / f"{name}.yaml").write_text(textwrap.dedent(text))
    with run_app(create_app(RouteTable.from_dir(folder), max_body_size=64 * 1024)) as base:
        yield {"base": base, "upstream": upstream, "silent": silent, "silent_port": silent_port,
               "backlog": full_backlog, "mock": upstream.port, "refused": refused}


def post(base: str, path: str, *, stream: bool = False, headers: dict[str, str] | None = None,
         content: bytes | None = None) -> tuple[httpx.Response, bytes]:
    body = content if content is not None else json.dumps({"model": "m", "prompt": "hi", "stream": stream}).encode()
    with httpx.stream("POST", base + path, content=body, headers={"content-type": "application/json", **(headers or {})},
                      timeout=10) as r:
        data = b"".join(r.iter_raw())
    return r, data


def error_of(r: httpx.Response, data: bytes) -> dict[str, Any]:
    assert r.headers["content-type"] == "application/json", (r.status_code, data)
    doc = json.loads(data)
    assert set(doc) == {"error"} and set(doc["error"]) == {"message", "type", "param", "code"}, doc
    return doc["error"]


# (id, path, stream, headers, status, type, code, message)
UPSTREAM_STATUS = [
    ("openai-json-passed-on", "/v1/completions", False, {"x-mock-status": "429"},
     429, "server_error", None, "mock error 429"),
    ("openai-json-passed-on-stream", "/v1/completions", True, {"x-mock-status": "500"},
     500, "server_error", None, "mock error 500"),
    ("html-wrapped", "/v1/completions", False,
     {"x-mock-status": "502", "x-mock-content-type": "text/html",
      "x-mock-body": "<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1><hr>nginx</body></html>"},
     502, "upstream_error", None, "upstream of route 'comp' answered 502: 502 Bad Gateway 502 Bad Gateway nginx"),
    ("text-wrapped-stream", "/v1/completions", True,
     {"x-mock-status": "503", "x-mock-content-type": "text/plain", "x-mock-body": "model is loading"},
     503, "upstream_error", None, "upstream of route 'comp' answered 503: model is loading"),
    ("empty-wrapped", "/v1/completions", False, {"x-mock-status": "500", "x-mock-body": ""},
     500, "upstream_error", None, "upstream of route 'comp' answered 500: (empty body)"),
    ("vllm-top-level-message", "/v1/completions", False,
     {"x-mock-status": "400", "x-mock-body": '{"object": "error", "message": "max_tokens is too large", "code": 400}'},
     400, "invalid_request_error", None, "upstream of route 'comp' answered 400: max_tokens is too large"),
    ("long-body-truncated", "/v1/completions", False,
     {"x-mock-status": "500", "x-mock-content-type": "text/plain", "x-mock-body": "x" * 2000},
     500, "upstream_error", None, "upstream of route 'comp' answered 500: " + "x" * 500 + "…"),
]


@pytest.mark.parametrize("case", UPSTREAM_STATUS, ids=[c[0] for c in UPSTREAM_STATUS])
def test_upstream_non_2xx(env, case):
    _, path, stream, headers, status, type_, code, message = case
    r, data = post(env["base"], path, stream=stream, headers=headers)
    assert r.status_code == status
    err = error_of(r, data)  # a stream that fails before the first byte is a JSON answer, not SSE
    assert (err["type"], err["code"], err["message"]) == (type_, code, message)
    assert r.headers["x-request-id"]
    no_leak(env["upstream"])  # the connection may stay in the pool, idle


def test_retry_after_is_passed_on(env):
    r, data = post(env["base"], "/v1/completions", headers={"x-mock-status": "429", "x-mock-retry-after": "7"})
    assert r.status_code == 429 and r.headers["retry-after"] == "7"


# (id, path, stream, headers, status, code, message): every message names the route
TRANSPORT = [
    ("refused", "/refused/v1/completions", False, {}, 502, "upstream_unreachable",
     "upstream of route 'refused' is unreachable: connection refused by 127.0.0.1:{refused}"),
    ("refused-stream", "/refused/v1/completions", True, {}, 502, "upstream_unreachable",
     "upstream of route 'refused' is unreachable: connection refused by 127.0.0.1:{refused}"),
    ("connect-timeout", "/backlog/v1/completions", False, {}, 504, "upstream_timeout",
     "upstream of route 'backlog': no connection to 127.0.0.1:{backlog} within 0.3 s (timeout.connect)"),
    ("read-timeout-before-first-byte", "/silent/v1/completions", False, {}, 504, "upstream_timeout",
     "upstream of route 'silent' (127.0.0.1:{silent_port}) sent nothing for 0.3 s (timeout.read)"),
    ("read-timeout-before-first-byte-stream", "/v1/completions", True, {"x-mock-stall-ms": "3000"}, 504,
     "upstream_timeout", "upstream of route 'comp' (127.0.0.1:{mock}) sent nothing for 0.3 s (timeout.read)"),
    ("closed-without-answer", "/v1/completions", False, {"x-mock-fault": "drop"}, 502, "upstream_broken",
     "upstream of route 'comp' (127.0.0.1:{mock}) closed the connection without answering"),
    ("closed-without-answer-stream", "/v1/completions", True, {"x-mock-fault": "drop"}, 502, "upstream_broken",
     "upstream of route 'comp' (127.0.0.1:{mock}) closed the connection without answering"),
]


@pytest.mark.parametrize("case", TRANSPORT, ids=[c[0] for c in TRANSPORT])
def test_transport_failures(env, case):
    _, path, stream, headers, status, code, message = case
    t0 = time.monotonic()
    r, data = post(env["base"], path, stream=stream, headers=headers)
    assert time.monotonic() - t0 < 3  # the route's timeout decides, not the client's
    assert r.status_code == status
    err = error_of(r, data)
    assert err == {"message": message.format(**env), "type": "upstream_error", "param": None, "code": code}
    assert SECRET not in err["message"]
    no_leak(env["upstream"])


def test_tls_failure_is_502(env):
    # https:// to the plain-HTTP mock: the handshake fails on the mock's HTTP 400 answer.
    r, data = post(env["base"], "/tls/v1/completions")
    assert r.status_code == 502
    err = error_of(r, data)
    assert err["code"] == "upstream_unreachable"
    assert err["message"].startswith(f"upstream of route 'tls' is unreachable: TLS with 127.0.0.1:{env['mock']} failed: ")
    assert re.search(r"WRONG_VERSION_NUMBER|wrong version number|packet length|record layer", err["message"]), err


def test_read_timeout_closes_the_upstream_connection(env):
    r, data = post(env["base"], "/silent/v1/completions")
    assert r.status_code == 504
    listener = env["silent"]
    listener.setblocking(False)
    waiting = []
    while True:  # every connection the proxy ever opened there, waiting in the backlog
        try:
            waiting.append(listener.accept()[0])
        except BlockingIOError:
            break
    assert waiting
    for conn in waiting:
        with conn:
            conn.settimeout(2)
            received = b""
            while chunk := conn.recv(65536):  # bounded: EOF, or socket.timeout fails the test
                received += chunk
        assert received.startswith(b"POST /v1/completions HTTP/1.1")  # then EOF: the proxy closed it


def test_dns_failure_is_502(routes_dir, proxy_for):
    folder = routes_dir(dns="""
        path: /v1/completions
        upstream: http://llm.example.invalid:8019/v1/completions
    """)
    base = proxy_for(folder, client=lambda: aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=NoSuchHost())))
    r, data = post(base, "/v1/completions")
    assert r.status_code == 502
    assert error_of(r, data) == {
        "message": "upstream of route 'dns' is unreachable: cannot resolve host 'llm.example.invalid'",
        "type": "upstream_error", "param": None, "code": "upstream_unreachable",
    }


# --- failures after the stream began -----------------------------------------------------


def sse_events(data: bytes) -> list[Any]:
    decoder = SSEDecoder()
    events = decoder.feed(data) + decoder.close()
    return [e.decode() if e == b"[DONE]" else json.loads(e) for e in events]


@pytest.mark.parametrize(
    ("headers", "code", "message"),
    [
        ({"x-mock-fault": "drop-after:2"}, "upstream_broken",
         "upstream of route 'comp' (127.0.0.1:{mock}) closed the connection mid-response"),
        ({"x-mock-stall-after": "2", "x-mock-stall-ms": "3000"}, "upstream_timeout",
         "upstream of route 'comp' (127.0.0.1:{mock}) sent nothing for 0.3 s (timeout.read)"),
    ],
    ids=["upstream-reset", "read-timeout-between-events"],
)
def test_failure_mid_stream_is_one_sse_error_event(env, headers, code, message):
    r, data = post(env["base"], "/v1/completions", stream=True, headers=headers)  # reads to a clean end
    assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
    events = sse_events(data)
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["Hello ", "from "]
    assert events[-1] == {"error": {"message": message.format(**env), "type": "upstream_error", "param": None,
                                    "code": code}}
    no_leak(env["upstream"])


def test_malformed_event_is_one_sse_error_event(upstream, routes_dir):
    folder = routes_dir(events=f"""
        path: /v1/completions
        upstream: {upstream.url}/v1/completions
    """)
    table = RouteTable.from_dir(folder)
    table.routes[0].adapter = JsonEvents()  # a translating adapter reads every event
    with run_app(create_app(table)) as base:
        r, data = post(base, "/v1/completions", stream=True, headers={"x-mock-fault": "malformed-after:1"})
    assert r.status_code == 200
    events = sse_events(data)
    assert events[0]["choices"][0]["text"] == "Hello "
    assert events[1] == {"error": {
        "message": "upstream of route 'events' sent an unreadable response: "
                   'event data is not JSON: {"id": "cmpl-…',
        "type": "upstream_error", "param": None, "code": "upstream_broken"}}
    assert len(events) == 2  # and the stream ends there
    s = settle(upstream, open_max=0)
    assert (s["busy_connections"], s["open_connections"]) == (0, 0)


def test_plain_body_cut_short_drops_the_client_connection(env):
    # Not SSE: HTTP/1.1 cannot say "error" after the head, so the client sees a short body.
    with pytest.raises(httpx.RemoteProtocolError, match="incomplete|without sending complete"):
        post(env["base"], "/v1/completions", headers={"x-mock-fault": "drop-after:5"})
    no_leak(env["upstream"])


# --- the official client -----------------------------------------------------------------


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base, api_key="client-key", max_retries=0, timeout=10)


@pytest.mark.parametrize(
    ("prefix", "headers", "exc", "status"),
    [
        ("", {"x-mock-status": "400"}, openai.BadRequestError, 400),
        ("", {"x-mock-status": "401"}, openai.AuthenticationError, 401),
        ("", {"x-mock-status": "404"}, openai.NotFoundError, 404),
        ("", {"x-mock-status": "429"}, openai.RateLimitError, 429),
        ("", {"x-mock-status": "500"}, openai.InternalServerError, 500),
        ("/refused", {}, openai.InternalServerError, 502),
        ("/silent", {}, openai.InternalServerError, 504),
    ],
)
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_openai_client_raises_the_right_class(env, prefix, headers, exc, status, stream):
    with pytest.raises(exc) as info:
        result = client(f"{env['base']}{prefix}/v1").completions.create(
            model="m", prompt="hi", stream=stream, extra_headers=headers)
        list(result) if stream else None  # type: ignore[call-overload]
    assert info.value.status_code == status
    assert info.value.message  # the proxy's or the upstream's message, not a parse failure


def test_openai_client_raises_api_error_mid_stream(env):
    stream = client(f"{env['base']}/v1").completions.create(
        model="m", prompt="hi", stream=True, extra_headers={"x-mock-stall-after": "1", "x-mock-stall-ms": "3000"})
    texts = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            texts.append(chunk.choices[0].text)
    assert texts == ["Hello "]
    assert info.value.message == f"upstream of route 'comp' (127.0.0.1:{env['mock']}) sent nothing for 0.3 s (timeout.read)"
    assert not isinstance(info.value, openai.APIStatusError)  # the status was 200: a mid-stream error


# --- the client leaves -------------------------------------------------------------------


@pytest.fixture
def forward_log(caplog):
    caplog.set_level(logging.DEBUG, logger="llmproxy")
    return caplog


def wait_for(predicate: Any, within: float = 2.0) -> bool:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_client_leaving_mid_stream_closes_the_upstream_at_once(env, forward_log):
    upstream = env["upstream"]
    # A 15 s stall (it ends early when the proxy closes): "at once" is told from it with room for a
    # loaded machine (5 s against a 2 s wait was tight).
    headers = {"x-mock-stall-after": "1", "x-mock-stall-ms": "15000"}
    body = json.dumps({"model": "m", "prompt": "hi", "stream": True})
    with httpx.stream("POST", f"{env['base']}/patient/v1/completions", content=body, headers=headers) as r:
        chunks = r.iter_raw()  # kept: a dropped generator closes the response itself
        assert b"Hello" in next(chunks)
        assert stats(upstream)["busy_connections"] == 1
        assert not any("client left" in r.getMessage() for r in forward_log.records)
    t0 = time.monotonic()
    assert wait_for(lambda: stats(upstream)["busy_connections"] == 0, within=8), stats(upstream)
    assert time.monotonic() - t0 < 8  # at once, not when the 15 s stall ends
    assert wait_for(lambda: any("client left" in r.getMessage() for r in forward_log.records), within=5)


def test_client_leaving_before_the_first_byte_closes_the_upstream(env, forward_log):
    upstream = env["upstream"]
    with pytest.raises(httpx.ReadTimeout):  # a client giving up on a long prompt
        httpx.post(f"{env['base']}/patient/v1/completions", json={"model": "m", "prompt": "hi"},
                   headers={"x-mock-stall-ms": "15000"}, timeout=httpx.Timeout(5, read=0.3))
    # Closed at once, not when the 15 s stall ends (a 1 s wait against a 5 s stall was tight).
    assert wait_for(lambda: stats(upstream)["busy_connections"] == 0, within=8), stats(upstream)
    assert wait_for(lambda: any("client left" in r.getMessage() for r in forward_log.records), within=5)


# --- bad client input --------------------------------------------------------------------


BAD_INPUT = [
    ("body-not-json", "POST", "/pinned", b"{not json", {}, 400, "invalid_request_error", "invalid_json", None,
     "this route sets stream: never, so the body must be a JSON object"),
    ("wrong-type", "POST", "/by-model", b'{"model": 5, "prompt": "hi"}', {}, 400, "invalid_request_error",
     "invalid_type", "model", "model: Expected `str | null`, got `int`"),
    ("unknown-path", "POST", "/v1/nope", b"{}", {}, 404, "invalid_request_error", "not_found", None,
     "no route for path /v1/nope"),
    ("wrong-method-for-route", "GET", "/v1/completions", b"", {}, 405, "invalid_request_error",
     "method_not_allowed", None, "method GET is not allowed on /v1/completions; allowed: POST"),
    ("method-the-proxy-never-routes", "TRACE", "/v1/completions", b"", {}, 405, "invalid_request_error",
     "method_not_allowed", None, "method TRACE is not allowed on /v1/completions; allowed: POST"),
    ("body-over-limit", "POST", "/v1/completions", b"x" * (100 * 1024), {}, 413, "invalid_request_error",
     "request_too_large", None, "request body is larger than the limit of 65536 bytes"),
]


@pytest.mark.parametrize("case", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_client_input(env, case):
    _, method, path, body, headers, status, type_, code, param, message = case
    before = len(env["upstream"].requests)
    r = httpx.request(method, env["base"] + path, content=body, headers=headers)
    assert r.status_code == status
    assert error_of(r, r.content) == {"message": message, "type": type_, "param": param, "code": code}
    if status == 405:
        assert r.headers["allow"]
    assert len(env["upstream"].requests) == before  # refused at the door


def test_body_over_limit_without_content_length(env):
    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b"x" * 10_000

    r = httpx.post(env["base"] + "/v1/completions", content=chunks())
    assert r.status_code == 413
    assert error_of(r, r.content)["message"] == "request body is larger than the limit of 65536 bytes"


def test_header_value_with_cr_is_refused_by_the_http_server(env):
    """httptools refuses a bare CR inside a header value before the app runs: the client gets
    uvicorn's own plain-text 400, not an OpenAI error (the policy path is unit-tested)."""
    port = int(env["base"].rsplit(":", 1)[1])
    before = len(env["upstream"].requests)
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Bad: a\rb\r\nContent-Length: 2\r\n\r\n{}")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"content-type: text/plain" in head.lower()
    assert body == b"Invalid HTTP request received."
    assert len(env["upstream"].requests) == before


# --- secrets -----------------------------------------------------------------------------


def test_secrets_never_reach_the_client_or_the_logs(env, caplog):
    caplog.set_level(logging.DEBUG)
    base = env["base"]
    echo = json.dumps({"error": {"message": f"Incorrect API key provided: Bearer {SECRET}", "type": "auth",
                                 "param": None, "code": "invalid_api_key"}})
    answers = [post(base, "/v1/completions", headers={"x-mock-status": "401", "x-mock-body": echo})]
    assert json.loads(answers[-1][1])["error"]["message"] == "Incorrect API key provided: ***"
    answers.append(post(base, "/v1/completions", headers={
        "x-mock-status": "500", "x-mock-content-type": "text/html", "x-mock-body": f"<pre>Authorization: Bearer {SECRET}</pre>"}))
    assert json.loads(answers[-1][1])["error"]["message"] == "upstream of route 'comp' answered 500: Authorization: ***"
    answers.append(post(base, "/refused/v1/completions"))
    answers.append(post(base, "/backlog/v1/completions"))
    answers.append(post(base, "/v1/completions", stream=True, headers={"x-mock-fault": "drop-after:1"}))
    with pytest.raises(httpx.RemoteProtocolError):
        post(base, "/v1/completions", headers={"x-mock-fault": "drop-after:5"})  # logged as a warning
    for r, data in answers:
        assert r.status_code in (401, 500, 502, 504) or b'"error"' in data
        assert SECRET.encode() not in data
        assert SECRET not in str(r.headers)
    logged = "\n".join(rec.getMessage() + (rec.exc_text or "") for rec in caplog.records)
    assert "closed the connection mid-response" in logged  # the proxy's logs were captured
    assert SECRET not in logged


# --- graceful shutdown -------------------------------------------------------------------


def test_sigterm_finishes_running_streams_then_exits_0(upstream, routes_dir, tmp_path):
    folder = routes_dir(c=f"""
        path: /v1/completions
        upstream: {upstream.url}/v1/completions
    """)
    port = free_port()
    grace = 1.0
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--routes", str(folder), "--port", str(port),
             "--grace-period", str(grace)],
            cwd=Path(__file__).resolve().parents[1], stdout=stdout, stderr=stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _healthy(base), within=15), err.read_text()
        results: dict[str, bytes] = {}
        started = {name: threading.Event() for name in ("short", "long")}

        def run(name: str, headers: dict[str, str]) -> None:
            body = json.dumps({"model": "m", "prompt": "hi", "stream": True})
            data = b""
            try:
                with httpx.stream("POST", base + "/v1/completions", content=body, headers=headers, timeout=10) as r:
                    for chunk in r.iter_raw():
                        data += chunk
                        started[name].set()
            except httpx.HTTPError as exc:
                data += f"<{type(exc).__name__}>".encode()
            results[name] = data
            started[name].set()

        threads = [
            # finishes well inside the grace period: 5 events, 60 ms apart
            threading.Thread(target=run, args=("short", {"x-mock-text": "a b c d e", "x-mock-interval-ms": "60"})),
            # still streaming when the grace period ends
            threading.Thread(target=run, args=("long", {"x-mock-stall-after": "1", "x-mock-stall-ms": "20000"})),
        ]
        for t in threads:
            t.start()
        assert all(e.wait(5) for e in started.values())
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: _refused(port), within=1)  # stops accepting at once
        # ...so a readiness probe fails from SIGTERM on (refused: the kubelet counts it as a failure)
        # while a stream still runs: README "Shutdown", deploy/README.md (the preStop sleep).
        with pytest.raises(httpx.ConnectError):
            httpx.get(base + "/readyz", timeout=1)
        if time.monotonic() - t0 < grace / 2:  # (a loaded machine may have taken longer to get here)
            assert "long" not in results and proc.poll() is None
        assert proc.wait(timeout=grace + 5) == 0
        elapsed = time.monotonic() - t0
        for t in threads:
            t.join(5)
        assert grace - 0.2 < elapsed < grace + 3
        short = sse_events(results["short"])
        assert short[-1] == "[DONE]" and "".join(e["choices"][0]["text"] for e in short[:-2]) == "a b c d e"
        long = sse_events(results["long"])
        assert long[-1] == {"error": {"message": "the proxy is shutting down; route 'c' was cut off",
                                      "type": "server_error", "param": None, "code": "shutting_down"}}
        assert wait_for(lambda: stats(upstream)["open_connections"] == 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    # A documented shutdown is no error: no traceback, and the cut stream's access line says why.
    logs = err.read_text()
    assert "Traceback" not in logs and "CancelledError" not in logs, logs
    assert not [line for line in logs.splitlines() if '"level":"error"' in line], logs
    assert "grace period over: cutting 1 running response(s)" in logs
    access = {line["bytes_out"] > 0 and line["error"]: line for line in map(json.loads, out.read_text().splitlines())}
    assert len(out.read_text().splitlines()) == 2
    assert access["shutting_down"]["status"] == 200 and access["shutting_down"]["streamed"] is True
    assert access[None]["status"] == 200  # the short stream finished inside the grace period


def _healthy(base: str) -> bool:
    try:
        return httpx.get(base + "/healthz", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False
