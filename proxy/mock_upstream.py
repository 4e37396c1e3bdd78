"""A development upstream speaking OpenAI legacy completions, for the demo, tests and bench.

Plain asyncio + httptools rather than a framework: the benchmark needs an
upstream costing a few tens of µs per request, or it measures the mock.

Behaviour is deterministic and steered per request by headers:
- `x-mock-text`: the completion text (`x-mock-text-json`: the same as a JSON string, for newlines);
- `x-mock-events`: split the text into this many stream events (default: one per word);
- `x-mock-interval-ms`: pause between stream events;
- `x-mock-hold: KEY`: after the first event, wait until `POST /_mock/release?key=KEY` (10 s at most);
- faults: see `_fault` (`x-mock-status`, `x-mock-fault`).
Every response echoes the request headers it received as JSON in `x-mock-echo-headers`,
and `GET /_mock/requests` lists the last requests (method, path, headers, body).
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any
from urllib.parse import parse_qs

import httptools
import msgspec

DEFAULT_TEXT = "Hello from the mock upstream."
_json = msgspec.json.Encoder()
_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 500: b"Internal Server Error"}


class _Request(msgspec.Struct):
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: str


class _Completion(msgspec.Struct):
    model: str = "mock"
    prompt: Any = ""
    stream: bool = False
    n: int = 1
    stream_options: dict[str, Any] | None = None


_decode_completion = msgspec.json.Decoder(_Completion).decode


class MockUpstream:
    """Shared state of one mock server: recorded requests and holds."""

    def __init__(self) -> None:
        self.requests: collections.deque[_Request] = collections.deque(maxlen=100)
        self.holds: dict[str, asyncio.Event] = {}
        self.record = True

    def hold(self, key: str) -> asyncio.Event:
        return self.holds.setdefault(key, asyncio.Event())

    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> asyncio.base_events.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(lambda: _Connection(self), host, port, reuse_address=True)


class _Connection(asyncio.Protocol):
    def __init__(self, mock: MockUpstream) -> None:
        self.mock = mock
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.write(400, b'{"error": {"message": "bad request"}}', keep_alive=False)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body = bytearray()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        url = httptools.parse_url(self.url)
        path = url.path.decode()
        query = (url.query or b"").decode()
        hdrs = {k.decode("latin-1"): v.decode("latin-1") for k, v in self.headers}
        body = bytes(self.body)
        if self.mock.record and not path.startswith("/_mock/"):
            self.mock.requests.append(_Request(method, path, query, hdrs, body.decode("utf-8", "replace")))
        self.echo = _json.encode(hdrs)
        self.keep_alive = self.parser.should_keep_alive()
        handler = _ROUTES.get((method, path))
        if handler is None:
            self.write(404, _error(f"no mock endpoint {method} {path}"))
            return
        result = handler(self, hdrs, body, query)
        if asyncio.iscoroutine(result):
            asyncio.ensure_future(result)

    # writing
    def write(self, status: int, body: bytes, *, content_type: bytes = b"application/json", keep_alive: bool | None = None) -> None:
        assert self.transport is not None
        keep = self.keep_alive if keep_alive is None else keep_alive
        head = b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\nx-mock-echo-headers: %s\r\n%s\r\n" % (
            status,
            _REASONS.get(status, b"Status"),
            content_type,
            len(body),
            self.echo if hasattr(self, "echo") else b"{}",
            b"" if keep else b"connection: close\r\n",
        )
        self.transport.write(head + body)
        if not keep:
            self.transport.close()

    def start_chunked(self, status: int = 200, content_type: bytes = b"text/event-stream") -> None:
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ntransfer-encoding: chunked\r\ncache-control: no-cache\r\n"
            b"x-mock-echo-headers: %s\r\n\r\n" % (status, _REASONS.get(status, b"Status"), content_type, self.echo)
        )

    def chunk(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_chunked(self) -> None:
        assert self.transport is not None
        self.transport.write(b"0\r\n\r\n")
        if not self.keep_alive:
            self.transport.close()

    def abort(self) -> None:
        assert self.transport is not None
        self.transport.abort()


def _error(message: str, type_: str = "invalid_request_error", code: Any = None) -> bytes:
    return _json.encode({"error": {"message": message, "type": type_, "param": None, "code": code}})


def completion_text(hdrs: dict[str, str]) -> str:
    if "x-mock-text-json" in hdrs:
        return msgspec.json.decode(hdrs["x-mock-text-json"].encode())
    return hdrs.get("x-mock-text", DEFAULT_TEXT)


def split_text(text: str, events: int | None) -> list[str]:
    """Split into `events` pieces (default: one per word, spaces kept) that join back to `text`."""
    if events is None:
        pieces, word = [], ""
        for ch in text:
            word += ch
            if ch == " ":
                pieces.append(word)
                word = ""
        if word:
            pieces.append(word)
        return pieces or [""]
    events = max(1, events)
    size, extra = divmod(len(text), events)
    out, pos = [], 0
    for i in range(events):
        step = size + (1 if i < extra else 0)
        out.append(text[pos : pos + step])
        pos += step
    return out


def _usage(prompt: Any, text: str, n: int) -> dict[str, int]:
    p = len(str(prompt).split())
    c = len(text.split()) * n
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _completions(conn: _Connection, hdrs: dict[str, str], body: bytes, query: str) -> Any:
    try:
        req = _decode_completion(body)
    except msgspec.DecodeError as exc:
        conn.write(400, _error(f"body is not a valid completion request: {exc}"))
        return None
    fault = _fault(conn, hdrs)
    if fault is not None:
        return fault
    text = completion_text(hdrs)
    if req.stream:
        return _stream(conn, hdrs, req, text)
    doc = {
        "id": "cmpl-mock",
        "object": "text_completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": "stop"} for i in range(req.n)],
        "usage": _usage(req.prompt, text, req.n),
    }
    conn.write(200, _json.encode(doc))
    return None


async def _stream(conn: _Connection, hdrs: dict[str, str], req: _Completion, text: str) -> None:
    events = int(hdrs["x-mock-events"]) if "x-mock-events" in hdrs else None
    interval = float(hdrs.get("x-mock-interval-ms", "0")) / 1000
    hold = hdrs.get("x-mock-hold")
    created = int(time.time())
    conn.start_chunked()
    pieces = split_text(text, events)
    for k, piece in enumerate(pieces):
        for i in range(req.n):
            conn.chunk(b"data: " + _json.encode({
                "id": "cmpl-mock", "object": "text_completion", "created": created, "model": req.model,
                "choices": [{"index": i, "text": piece, "logprobs": None, "finish_reason": None}],
            }) + b"\n\n")
        if k == 0 and hold:
            try:
                await asyncio.wait_for(conn.mock.hold(hold).wait(), 10)
            except TimeoutError:
                pass
        if interval:
            await asyncio.sleep(interval)
    for i in range(req.n):
        conn.chunk(b"data: " + _json.encode({
            "id": "cmpl-mock", "object": "text_completion", "created": created, "model": req.model,
            "choices": [{"index": i, "text": "", "logprobs": None, "finish_reason": "stop"}],
        }) + b"\n\n")
    if req.stream_options and req.stream_options.get("include_usage"):
        conn.chunk(b"data: " + _json.encode({
            "id": "cmpl-mock", "object": "text_completion", "created": created, "model": req.model,
            "choices": [], "usage": _usage(req.prompt, text, req.n),
        }) + b"\n\n")
    conn.chunk(b"data: [DONE]\n\n")
    conn.end_chunked()


def _fault(conn: _Connection, hdrs: dict[str, str]) -> Any:
    """Staged failures. Returns None when the request asks for none.

    - `x-mock-status: N` (+ `x-mock-body`): answer N with that body (default: an OpenAI error).
    """
    status = hdrs.get("x-mock-status")
    if status is not None:
        body = hdrs.get("x-mock-body")
        conn.write(int(status), body.encode() if body is not None else _error(f"mock error {status}", "server_error"),
                   content_type=hdrs.get("x-mock-content-type", "application/json").encode())
        return True
    return None


def _models(conn: _Connection, hdrs: dict[str, str], body: bytes, query: str) -> None:
    conn.write(200, _json.encode({"object": "list", "data": [{"id": "mock", "object": "model", "owned_by": "mock"}]}))


def _echo(conn: _Connection, hdrs: dict[str, str], body: bytes, query: str) -> None:
    conn.write(200, _json.encode({"headers": hdrs, "query": query, "body": body.decode("utf-8", "replace")}))


def _requests(conn: _Connection, hdrs: dict[str, str], body: bytes, query: str) -> None:
    conn.write(200, _json.encode(list(conn.mock.requests)))


def _release(conn: _Connection, hdrs: dict[str, str], body: bytes, query: str) -> None:
    for key in parse_qs(query).get("key", []):
        conn.mock.hold(key).set()
    conn.write(200, b"{}")


_ROUTES = {
    ("POST", "/v1/completions"): _completions,
    ("GET", "/v1/models"): _models,
    ("POST", "/echo"): _echo,
    ("GET", "/echo"): _echo,
    ("GET", "/_mock/requests"): _requests,
    ("POST", "/_mock/release"): _release,
}


def run(host: str = "127.0.0.1", port: int = 8019) -> None:
    """Serve until interrupted (the `llmproxy mock-upstream` command)."""

    async def main() -> None:
        server = await MockUpstream().serve(host, port)
        print(f"mock upstream on http://{host}:{port} (legacy /v1/completions)", flush=True)
        async with server:
            await server.serve_forever()

    try:
        import uvloop

        uvloop.run(main())
    except KeyboardInterrupt:
        pass
