"""The fast suite's imitation of llama.cpp (`proxy/mock_upstream.py`, dialect llama.cpp) against the
engine itself, where the proxy depends on it: ids, the logprobs shape, where usage comes, and the
connection closed after every streamed answer although the head said keep-alive."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import Engine
from servers import run_mock


@pytest.fixture(params=["engine", "imitation"])
def server(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "engine":
        yield request.getfixturevalue("engine").url
    else:
        with run_mock("llama.cpp") as mock:
            yield mock.url


def exchange(sock: socket.socket, body: dict[str, Any]) -> tuple[bytes, bytes]:
    """One POST /v1/completions on an open socket: (head, body), the body read to its end."""
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"x-mock-text: one two three\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(65536)
    head, rest = buf.split(b"\r\n\r\n", 1)
    if b"content-length:" in head.lower():
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(rest) < length:
            rest += sock.recv(65536)
        return head, rest
    while not rest.endswith(b"0\r\n\r\n"):
        rest += sock.recv(65536)
    return head, rest


def events(chunked: bytes) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in chunked.split(b"\n") if line.startswith(b"data: {")]


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    return sock


def test_a_stream_then_the_connection_is_closed_whatever_the_head_said(server):
    with connect(server) as sock:
        head, body = exchange(sock, {"prompt": "Hi", "stream": True, "max_tokens": 3, "logprobs": 2})
        assert b"keep-alive: timeout=5, max=100" in head.lower()
        evs = events(body)
        assert all(e["id"].startswith("chatcmpl-") for e in evs)
        texts = [e for e in evs if e["choices"] and e["choices"][0]["text"]]
        for e in texts:
            (item,) = e["choices"][0]["logprobs"]["content"]
            assert set(item) == {"id", "token", "bytes", "logprob", "top_logprobs"}
            assert len(item["top_logprobs"]) == 2
            assert set(item["top_logprobs"][0]) == {"id", "token", "bytes", "logprob"}
        last = evs[-1]
        assert last["choices"][0]["finish_reason"] in ("stop", "length") and "usage" in last
        assert last["choices"][0]["logprobs"] is None
        assert sock.recv(1) == b""  # closed by the server


def test_whole_answers_keep_the_connection_and_logprobs_0_give_none(server):
    with connect(server) as sock:
        for _ in range(2):  # the same connection, twice
            head, body = exchange(sock, {"prompt": "Hi", "max_tokens": 3, "logprobs": 0})
            doc = json.loads(body)
            assert doc["id"].startswith("chatcmpl-")
            assert doc["choices"][0]["logprobs"] is None


def test_errors_close_the_connection(server):
    with connect(server) as sock:
        head, body = exchange(sock, {"prompt": "Hi", "json_schema": '{"type": "object"}'})  # a string: refused
        assert head.startswith(b"HTTP/1.1 400") and b"connection: close" in head.lower()
        error = json.loads(body)["error"]
        assert set(error) >= {"code", "message", "type"} and "JSON schema conversion failed" in error["message"]
        assert sock.recv(1) == b""


@pytest.mark.parametrize("field", [{"n": 2}, {"echo": True}, {"best_of": 2}, {"suffix": "!"}])
def test_fields_older_builds_refused_are_taken(server, field):
    """`n` gives that many choices; `echo`, `best_of`, `suffix` change nothing on completions."""
    with connect(server) as sock:
        head, body = exchange(sock, {"prompt": "Hi", "max_tokens": 3, **field})
        assert head.startswith(b"HTTP/1.1 200")
        assert len(json.loads(body)["choices"]) == field.get("n", 1)
