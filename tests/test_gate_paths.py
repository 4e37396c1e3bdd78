"""Tests that try to get in: request variants a client (or an attacker) might send with keys on.

Each must be refused, or served exactly as the plain request (same route, same upstream
request); none may reach an upstream without a valid key. Requests go over a raw socket, so
the path and headers are exactly as written (HTTP clients normalise paths and merge headers).
"""

from __future__ import annotations

import json
import socket
import pytest


KEY = "sk-gate-0123456789"
BODY = json.dumps({"model": "m", "prompt": "hi", "max_tokens": 3}).encode()


def raw(base: str, head: str, body: bytes = BODY) -> tuple[int, bytes]:
    """Send one request as written; the status and the body of the answer."""
    host, port = base.removeprefix("http://").split(":")
    request = head.replace("\n", "\r\n") + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request.encode("latin-1") + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


@pytest.fixture
def gate(completions_route, keys_for, proxy_for) -> str:
    return proxy_for(completions_route, keys=keys_for(k=KEY))


TARGETS = [
    "/v1/completions",
    "//v1/completions",
    "/v1/completions/",
    "/v1/completions//",
    "/v1%2Fcompletions",
    "/v1/./completions",
    "/v1/x/../completions",
    "/V1/COMPLETIONS",
    "/v1/completions?api_key=" + KEY,  # a key in the query string is no key
    "/v1/completions;k=" + KEY,
    "/v1/completions%00",
    "/v1/models",
    "/v1/models/",
    "//v1/models",
    "/v1%2Fmodels",
    "*",
]
METHODS = ["POST", "GET", "HEAD", "OPTIONS", "PUT"]
TRICKS = [
    "",
    "X-HTTP-Method-Override: GET\n",
    "X-HTTP-Method-Override: POST\n",
    "X-Original-URL: /healthz\nX-Rewrite-URL: /healthz\n",
    f"Authorization: Basic {KEY}\n",
    f"Authorization: Bearer {KEY}x\n",
    f"Authorization: Bearer {KEY[:-1]}\n",
    f"Authorization: Bearer {'A' * 8000}\n",
    f"Authorization: Bearer wrong\nAuthorization: Bearer {KEY}\n",  # the right key beside a wrong one
    f"x-api-key: wrong\nAuthorization: Bearer {KEY}\n",
    f"Cookie: api_key={KEY}\n",
    f"Proxy-Authorization: Bearer {KEY}\n",
]


def test_no_variant_gets_in_without_a_valid_key(gate, upstream):
    for target in TARGETS:
        for method in METHODS:
            for trick in TRICKS:
                status, _ = raw(gate, f"{method} {target} HTTP/1.1\nHost: x\n{trick}")
                assert status in (400, 401), (method, target, trick, status)
    assert upstream.requests == []


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("trick", [
    f"Authorization: Bearer {KEY}\n",
    f"Authorization: Bearer   {KEY}  \n",  # white space around the key
    f"x-api-key: {KEY}\n",
    f"Authorization: Bearer {KEY}\nAuthorization: Bearer {KEY}\n",  # the same key twice
    f"Authorization: Bearer {KEY}\nX-HTTP-Method-Override: GET\n",
])
def test_with_a_key_each_variant_is_refused_or_served_as_the_plain_request(gate, upstream, target, trick):
    plain_status, _ = raw(gate, f"POST /v1/completions HTTP/1.1\nHost: x\nAuthorization: Bearer {KEY}\n")
    plain = upstream.requests[-1]
    before = len(upstream.requests)
    status, body = raw(gate, f"POST {target} HTTP/1.1\nHost: x\n{trick}")
    if status == 200 and target.split("?")[0] not in ("/v1/models", "/v1/models/"):
        assert len(upstream.requests) == before + 1
        got = upstream.requests[-1]
        assert (got.method, got.path, got.body) == (plain.method, plain.path, plain.body)
        assert "authorization" not in got.headers and "x-api-key" not in got.headers
        assert plain_status == 200
    else:
        assert status in (400, 404, 405), (target, trick, status, body[:200])
        if "?api_key=" in target and not target.startswith("/v1/models"):
            assert b"api_key_in_query" in body  # the key would have gone upstream in the query
        assert len(upstream.requests) == before
