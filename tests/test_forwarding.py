"""The one forwarder over real loopback sockets: bytes, headers, streaming without buffering."""

import json
import socket
import threading

import httpx
import msgspec
import pytest

from proxy.app import create_app
from proxy.routes import RouteTable
from servers import run_app


@pytest.fixture
def base(upstream, routes_dir, proxy_for):
    folder = routes_dir(
        completions=f"""
            path: /v1/completions
            upstream: {upstream.url}/v1/completions
            default_headers: {{Authorization: Bearer route-secret, X-Team: llm}}
        """,
        echo=f"""
            path: /echo
            methods: [GET, POST]
            upstream: {upstream.url}/echo
        """,
    )
    return proxy_for(folder)


def test_non_stream_answers_200_with_the_upstream_body(base):
    r = httpx.post(f"{base}/v1/completions", json={"model": "m", "prompt": "hi"})
    assert r.status_code == 200  # not Litestar's default 201 for POST
    assert r.json()["choices"][0]["text"] == "Hello from the mock upstream."
    assert r.headers["content-type"] == "application/json"


def test_stream_is_relayed_event_by_event(base):
    events = []
    with httpx.stream("POST", f"{base}/v1/completions", json={"model": "m", "prompt": "x", "stream": True},
                      headers={"x-mock-text": "one two three"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream"
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert text == "one two three"


def test_headers_seen_at_the_upstream(base, upstream):
    r = httpx.post(
        f"{base}/v1/completions",
        json={"model": "m", "prompt": "hi"},
        headers={"Authorization": "Bearer client-key", "x-team": "other", "Connection": "keep-alive, x-private",
                 "x-private": "hop", "te": "trailers", "x-custom": "kept", "x-request-id": "req-42"},
    )
    seen = upstream.requests[-1].headers  # what the upstream received, recorded on its side
    assert seen["authorization"] == "Bearer route-secret"  # defaults win
    assert seen["x-team"] == "llm"
    assert seen["x-custom"] == "kept"
    assert "x-private" not in seen and "te" not in seen
    assert seen["x-request-id"] == "req-42"
    assert seen["x-forwarded-for"] == "127.0.0.1" and seen["x-forwarded-proto"] == "http"
    assert seen["host"] == upstream.url.removeprefix("http://")
    assert r.headers["x-request-id"] == "req-42"  # echoed back
    assert "client-key" not in str(seen)
    assert json.loads(r.headers["x-mock-echo-headers"])["authorization"] == "***"  # the mock's echo hides it
    assert "route-secret" not in str(r.headers) + r.text


def test_request_id_is_created_when_missing(base):
    r = httpx.post(f"{base}/v1/completions", json={"model": "m", "prompt": "hi"})
    rid = r.headers["x-request-id"]
    assert len(rid) == 32 and json.loads(r.headers["x-mock-echo-headers"])["x-request-id"] == rid


def test_method_query_string_and_body_bytes_pass_unchanged(base, upstream):
    r = httpx.get(f"{base}/echo?a=1&b=%20x")
    assert r.status_code == 200 and r.json()["query"] == "a=1&b=%20x"
    raw = b'{ "prompt" :"keep   my spacing",  "x": [1,2] }'
    r = httpx.post(f"{base}/echo", content=raw)
    assert r.json()["body"] == raw.decode()


def test_chunks_are_not_buffered(base, upstream):
    """The upstream holds after its first event; the client must already have it."""
    got_first = threading.Event()
    with httpx.stream("POST", f"{base}/v1/completions", json={"model": "m", "prompt": "x", "stream": True},
                      headers={"x-mock-text": "first second", "x-mock-hold": "gate-1"}, timeout=10) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                assert json.loads(line[6:])["choices"][0]["text"] == "first "
                got_first.set()
                break
        assert got_first.is_set()
        upstream.release("gate-1")  # only now may the upstream send the rest
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"


# Stream modes: what the upstream receives is all that matters here.


@pytest.mark.parametrize(
    "mode, body, expected",
    [
        ("auto", b'{"prompt": "x",  "stream": false}', b'{"prompt": "x",  "stream": false}'),
        ("always", b'{"prompt": "x"}', {"prompt": "x", "stream": True}),
        ("always", b'{"prompt": "x", "stream": false}', {"prompt": "x", "stream": True}),
        ("never", b'{"prompt": "x", "stream": true}', {"prompt": "x", "stream": False}),
    ],
)
def test_stream_mode_sets_the_upstream_body(tmp_path, upstream, mode, body, expected):
    (tmp_path / "r.yaml").write_text(f"path: /v1/completions\nupstream: {upstream.url}/v1/completions\nstream: {mode}\n")
    with run_app(create_app(RouteTable.from_dir(tmp_path))) as url:
        r = httpx.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200
    sent = upstream.requests[-1].body.encode()
    if isinstance(expected, bytes):
        assert sent == expected  # auto: the bytes are not even re-encoded
    else:
        assert msgspec.json.decode(sent) == expected


def test_forced_stream_mode_needs_a_json_object(tmp_path, upstream):
    (tmp_path / "r.yaml").write_text(f"path: /v1/completions\nupstream: {upstream.url}/v1/completions\nstream: always\n")
    with run_app(create_app(RouteTable.from_dir(tmp_path))) as url:
        r = httpx.post(f"{url}/v1/completions", content=b"not json")
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_json"
    assert upstream.requests == []


@pytest.mark.filterwarnings("ignore:A test tried to use socket")
def test_the_suite_cannot_leave_loopback():
    from pytest_socket import SocketConnectBlockedError

    with pytest.raises(SocketConnectBlockedError):
        socket.create_connection(("192.0.2.1", 80), timeout=1)  # TEST-NET-1: blocked before any packet
