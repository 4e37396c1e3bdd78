"""Unit tests of the error mapper and the forwarder's error paths, on fakes (fast, exhaustive);
tests/test_faults.py shows the same behaviour over real sockets."""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import msgspec
import pytest

from proxy import errors
from proxy.cli import main
from proxy.config import load_file
from proxy.forward import prepare
from proxy.routes import Route
from proxy.transport import make_client


def make_route(tmp_path: Path, text: str) -> Route:
    f = tmp_path / "r.yaml"
    f.write_text(textwrap.dedent(text))
    return Route(load_file(f))


@pytest.fixture
def route(tmp_path: Path) -> Route:
    return make_route(tmp_path, """
        path: /v1/completions
        upstream: http://127.0.0.1:9/v1/completions
        default_headers: {Authorization: Bearer sk-route-secret, X-Org: acme-org, X-Tiny: ab}
        timeout: {connect: 2, read: 7.5}
    """)


# --- bad client input -------------------------------------------------------------------


class Message(msgspec.Struct):
    role: str
    content: str = ""


class Chat(msgspec.Struct):
    model: str
    messages: list[Message]
    temperature: float = 1.0


@pytest.mark.parametrize(
    ("body", "param", "code", "message"),
    [
        (b"{oops", None, "invalid_json",
         "request body is not valid JSON: JSON is malformed: object keys must be strings (byte 1)"),
        (b'{"model": 5, "messages": []}', "model", "invalid_type", "model: Expected `str`, got `int`"),
        (b'{"model": "m", "messages": [{"role": 1}]}', "messages[0].role", "invalid_type",
         "messages[0].role: Expected `str`, got `int`"),
        (b'{"model": "m"}', "messages", "missing_field", "messages: required field is missing"),
        (b"[1, 2]", None, "invalid_type", "request body: Expected `object`, got `array`"),
    ],
)
def test_bad_body_names_the_field(body, param, code, message):
    with pytest.raises(msgspec.DecodeError) as info:
        msgspec.json.decode(body, type=Chat)
    err = errors.bad_body(info.value)
    assert (err.status, err.type, err.param, err.code, err.message) == (400, "invalid_request_error", param, code, message)


def test_bad_header_names_the_header_only_when_one_is_bad():
    assert errors.bad_header([(b"x-ok", b"a\tb"), ("X-Fine", "v")]) is None
    err = errors.bad_header([(b"x-ok", b"v"), (b"X-Evil", b"a\r\nInjected: 1")])
    assert err is not None and (err.status, err.param, err.code) == (400, "x-evil", "invalid_header")
    assert "Injected" not in err.message  # the value is never echoed


@pytest.mark.parametrize(
    ("status", "method", "code", "message"),
    [
        (404, "POST", "not_found", "no route for path /x"),
        (405, "TRACE", "method_not_allowed", "method TRACE is not allowed on /x"),
        (413, "POST", "request_too_large", "request body is larger than the limit of 1024 bytes"),
    ],
)
def test_litestar_exceptions_become_ours(status, method, code, message):
    err = errors.from_http_exception(status, "Whatever", {"allow": "POST"}, method, "/x", 1024)
    assert (err.status, err.code, err.message, err.headers) == (status, code, message, {"allow": "POST"})


def test_internal_errors_hide_the_message():
    try:
        raise ValueError("Illegal header value b'Bearer sk-secret'")
    except ValueError as exc:
        err, where = errors.internal(exc)
    assert err.status == 500 and err.code == "internal_error" and err.message == "internal error in the proxy"
    assert where.startswith("ValueError at ") and "sk-secret" not in where


# --- upstream answers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "(empty body)"),
        (b"  \n ", "(empty body)"),
        (b"Bad Gateway", "Bad Gateway"),
        (b"<html><head><style>p {color: red}</style><script>var a = 1 < 2;</script><title>502</title></head>"
         b"<body>\n  <h1>Bad   Gateway</h1></body></html>", "502 Bad Gateway"),
        (b'{"detail": "Not Found"}', "Not Found"),
        (b'{"object": "error", "message": "too long", "code": 400}', "too long"),
        (b'{"error": "plain string error"}', "plain string error"),
        (b'{"something": "else"}', '{"something": "else"}'),
        ("caf\u00e9 \u2603".encode() + b"\xff", "caf\u00e9 \u2603\ufffd"),
        (b"y" * 600, "y" * 500 + "\u2026"),
    ],
)
def test_foreign_error_bodies_are_wrapped_readably(route, body, message):
    err = errors.UpstreamStatus(503, body, route)
    assert err.passthrough is None
    doc = json.loads(errors.render(err))
    assert doc == {"error": {"message": f"upstream of route 'r' answered 503: {message}", "type": "upstream_error",
                             "param": None, "code": None}}  # a string or null, as OpenAI's API has it


def test_openai_errors_pass_on_untouched_but_scrubbed(route):
    body = b'{"error": {"message": "bad key sk-route-secret", "type": "auth", "code": "invalid_api_key", "x": 1}}'
    err = errors.UpstreamStatus(401, body, route, retry_after="3")
    assert errors.render(err) == body.replace(b"sk-route-secret", b"***")
    assert err.status == 401 and err.headers == {"retry-after": "3"}


def test_secrets_of_a_route(tmp_path):
    route = make_route(tmp_path, """
        path: /p
        upstream: [http://127.0.0.1:1/x, http://127.0.0.1:2/x]
        default_headers: {Authorization: Bearer sk-route-secret, X-Org: acme-org, X-Tiny: ab, Api-Key: Bearer}
    """)
    assert set(errors.secrets_of(route)) == {b"Bearer sk-route-secret", b"sk-route-secret", b"acme-org"}
    assert errors.scrub_bytes(b"Bearer sk-route-secret / sk-route-secret", errors.secrets_of(route)) == b"*** / ***"


# --- transport failures without a socket (for causes the sockets cannot stage) ------------

_KEY = SimpleNamespace(host="127.0.0.1", port=9, ssl=True)  # what aiohttp's connector errors carry


@pytest.mark.parametrize(
    ("exc", "status", "code", "message"),
    [
        (aiohttp.ClientConnectorDNSError(_KEY, OSError(-2, "Name or service not known")), 502, "upstream_unreachable",
         "upstream of route 'r' is unreachable: cannot resolve host '127.0.0.1'"),
        (aiohttp.ConnectionTimeoutError("x"), 504, "upstream_timeout",
         "upstream of route 'r': no connection to 127.0.0.1:9 within 2 s (timeout.connect)"),
        (aiohttp.SocketTimeoutError("x"), 504, "upstream_timeout",
         "upstream of route 'r' (127.0.0.1:9) sent nothing for 7.5 s (timeout.read)"),
        (aiohttp.ServerDisconnectedError(), 502, "upstream_broken",
         "upstream of route 'r' (127.0.0.1:9) closed the connection without answering"),
        (aiohttp.ClientPayloadError("x"), 502, "upstream_broken",
         "upstream of route 'r' (127.0.0.1:9) closed the connection mid-response"),
        (aiohttp.ClientConnectorError(_KEY, OSError(113, "Authorization: Bearer sk-route-secret refused")), 502,
         "upstream_unreachable", "upstream of route 'r' is unreachable: cannot connect to 127.0.0.1:9: Authorization: *** refused"),
    ],
)
def test_upstream_errors_without_a_socket(route, exc, status, code, message):
    err = errors.from_upstream(exc, route, route.upstreams[0])
    assert (err.status, err.code, err.message) == (status, code, message)


# --- the Exchange on a fake upstream session ---------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Recorder:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        await asyncio.sleep(0)  # a real send may wait for the socket (flow control)

    @property
    def status(self) -> int:
        return self.messages[0]["status"]

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])


class Upstream:
    """A streaming upstream answer shaped like aiohttp's `ClientResponse`: `n` events, `delay`
    apart; records whether the forwarder closed it."""

    status = 200
    raw_headers = ((b"Content-Type", b"text/event-stream"),)
    headers = {"content-type": "text/event-stream"}

    def __init__(self, n: int, delay: float = 0.0) -> None:
        self.n, self.delay, self.closed, self.eof = n, delay, False, False
        self.content = self

    async def iter_any(self) -> AsyncIterator[bytes]:
        for i in range(self.n):
            await asyncio.sleep(self.delay)
            yield b'data: {"i": %d}\n\n' % i
        self.eof = True

    def at_eof(self) -> bool:
        return self.eof

    def release(self) -> None:
        self.closed = True

    close = release


class FakeSession:
    """What the Exchange uses of `aiohttp.ClientSession`: `await request(...)`."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer

    async def request(self, method: str, url: str, **kw: Any) -> Any:
        return await self.answer() if callable(self.answer) else self.answer


def scope_for(client: Any, headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions",
            "query_string": b"", "headers": headers or [], "client": ("127.0.0.1", 1), "scheme": "http",
            "app": SimpleNamespace(state=SimpleNamespace(client=client))}


def streaming_client(body: Upstream) -> FakeSession:
    return FakeSession(body)


@pytest.mark.anyio
async def test_client_leaving_mid_stream_is_observable_and_closes_upstream(route):
    body = Upstream(n=1000, delay=0.005)
    client = streaming_client(body)
    scope = scope_for(client)
    send = Recorder()
    sent_two = asyncio.Event()

    async def counting_send(message: dict[str, Any]) -> None:
        await send(message)
        if len(send.messages) >= 3:
            sent_two.set()

    async def receive() -> dict[str, Any]:
        await sent_two.wait()
        return {"type": "http.disconnect"}

    exchange = prepare(route, scope, b"{}")
    await asyncio.wait_for(exchange(scope, receive, counting_send), 2)
    assert exchange.disconnected is True
    assert body.closed is True
    assert send.messages[-1].get("more_body", True) is True  # nothing more was sent to a gone client
    assert len(send.messages) < 10


@pytest.mark.anyio
async def test_disconnect_message_after_completion_is_not_a_client_leaving(route):
    """uvicorn answers `receive()` with http.disconnect once the response is complete."""
    client = streaming_client(Upstream(n=3))
    scope = scope_for(client)
    send = Recorder()

    async def receive() -> dict[str, Any]:
        while not (send.messages and send.messages[-1].get("more_body") is False):
            await asyncio.sleep(0)
        return {"type": "http.disconnect"}

    exchange = prepare(route, scope, b"{}")
    await asyncio.wait_for(exchange(scope, receive, send), 2)
    assert exchange.disconnected is False
    assert send.status == 200 and send.body.count(b"data:") == 3


@pytest.mark.anyio
async def test_cut_by_shutdown_before_the_first_byte_is_a_503(route):
    async def never() -> Any:
        await asyncio.sleep(10)
        raise AssertionError("not reached")

    client = FakeSession(never)
    scope = scope_for(client)
    send = Recorder()

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(10)
        return {"type": "http.disconnect"}

    exchange = prepare(route, scope, b"{}")
    task = asyncio.ensure_future(exchange(scope, receive, send))
    await asyncio.sleep(0.05)
    task.cancel()  # what uvicorn does when the grace period ends
    # The exchange told the client and ends quietly: a cancellation escaping would make
    # uvicorn log an "Exception in ASGI application" traceback for a documented shutdown.
    await asyncio.wait_for(task, 2)
    assert isinstance(exchange.error, errors.ShuttingDown)  # what its access line says
    assert send.status == 503
    assert json.loads(send.body)["error"]["code"] == "shutting_down"


@pytest.mark.anyio
async def test_header_with_control_characters_is_a_400_not_a_500(upstream, tmp_path):
    """Uvicorn's parsers never let such a value in; under another ASGI server aiohttp would
    refuse to send it, and the forwarder says which header was wrong."""
    route = make_route(tmp_path, f"""
        path: /v1/completions
        upstream: {upstream.url}/v1/completions
    """)
    async with make_client() as client:
        scope = scope_for(client, [(b"content-type", b"application/json"), (b"x-evil", b"a\r\nInjected: yes")])
        send = Recorder()

        async def receive() -> dict[str, Any]:
            await asyncio.sleep(10)
            return {"type": "http.disconnect"}

        await asyncio.wait_for(prepare(route, scope, b"{}")(scope, receive, send), 5)
    assert send.status == 400
    assert json.loads(send.body) == {"error": {
        "message": "header 'x-evil' has a value with CR, LF or another control character",
        "type": "invalid_request_error", "param": "x-evil", "code": "invalid_header"}}
    assert upstream.requests == []


# --- command line -----------------------------------------------------------------------


def test_grace_period_must_not_be_negative(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("path: /p\nupstream: http://127.0.0.1:9/p\n")
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--routes", str(tmp_path), "--grace-period", "-1"])
    assert exit_.value.code == 2
    assert "argument --grace-period: must be a number from 0 to 86400" in capsys.readouterr().err


@pytest.mark.parametrize(("status", "kind"), [
    (400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
    (404, "not_found_error"), (413, "request_too_large"), (422, "invalid_request_error"),
    (429, "rate_limit_error"), (500, "api_error"), (502, "api_error"), (503, "overloaded_error"),
    (504, "timeout_error"), (529, "overloaded_error"), (507, "api_error"),
])
def test_anthropic_face_renders_its_own_shape(status, kind):
    """Messages routes: `{"type": "error", "error": {"type", "message"}}` with Anthropic's type for the
    status, also for an upstream's OpenAI error (re-told, not passed on), and as `event: error` mid-stream."""
    exc = errors.ProxyError("it broke")
    exc.status = status
    assert json.loads(errors.render(exc, "anthropic")) == {"type": "error", "error": {"type": kind,
                                                                                      "message": "it broke"}}
    event = errors.sse_event(exc, "anthropic")
    assert event.startswith(b"event: error\ndata: ") and event.endswith(b"\n\n")
    assert json.loads(event.split(b"data: ", 1)[1]) == json.loads(errors.render(exc, "anthropic"))
    assert json.loads(errors.render(exc))["error"]["message"] == "it broke"  # the default face is OpenAI's


def test_anthropic_face_retells_an_upstream_openai_error(tmp_path):
    route = make_route(tmp_path, "path: /v1/messages\nupstream: http://127.0.0.1:9/v1/completions\n")
    exc = errors.UpstreamStatus(429, b'{"error": {"message": "slow down", "type": "x"}}', route)
    assert json.loads(errors.render(exc))["error"]["message"] == "slow down"  # OpenAI faces: passed on
    body = json.loads(errors.render(exc, "anthropic"))
    assert body["error"]["type"] == "rate_limit_error" and "answered 429: slow down" in body["error"]["message"]


# vLLM's ErrorResponse (`ErrorInfo.code: int`, type "BadRequestError"), llama.cpp's
# `format_error_response` and SGLang's flat body: a prompt over the context, as each answers it.
@pytest.mark.parametrize("body", [
    b'{"error": {"message": "maximum context length is 32 tokens", "type": "BadRequestError", "param": "prompt", "code": 400}}',
    b'{"error": {"code": 400, "message": "maximum context length is 32 tokens", "type": "invalid_request_error"}}',
    b'{"object": "error", "message": "maximum context length is 32 tokens", "type": "BadRequestError", "param": null, "code": 400}',
])
def test_an_upstreams_400_reaches_clients_as_invalid_request_error(route, body):
    err = errors.UpstreamStatus(400, body, route)
    doc = json.loads(errors.render(err))["error"]
    assert doc["type"] == "invalid_request_error" and doc["code"] is None
    assert doc["message"] == "upstream of route 'r' answered 400: maximum context length is 32 tokens"
    anthropic = json.loads(errors.render(err, "anthropic"))
    assert anthropic["error"]["type"] == "invalid_request_error"
    assert "maximum context length is 32 tokens" in anthropic["error"]["message"]


def test_an_openai_shaped_400_passes_on_with_its_string_code(route):
    body = b'{"error": {"message": "bad", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}'
    assert errors.render(errors.UpstreamStatus(400, body, route)) == body
