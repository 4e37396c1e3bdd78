"""A development upstream speaking OpenAI legacy completions, for the demo, tests and bench.

Plain asyncio + httptools rather than a framework: the benchmark needs an
upstream costing a few tens of µs per request, or it measures the mock.

Behaviour is deterministic and steered per request by headers:
- `x-mock-text`: the completion text (`x-mock-text-json`: the same as a JSON string, for newlines);
- `x-mock-events`: split the text into this many stream events (default: one per word);
- `x-mock-interval-ms`: pause between stream events;
- `x-mock-hold: KEY`: after the first event, wait until `POST /_mock/release?key=KEY` (10 s at most);
- `x-mock-finish: REASON`: the last `finish_reason` (default `stop`; `length` as if cut by `max_tokens`);
- `x-mock-stop-reason: S`: vLLM's `stop_reason` (the stop string that matched) on the finishing choice;
- faults: see below.
`POST /tokenize` answers as vLLM does (`count`, `max_model_len`, `tokens`), one token per word
of `prompt` (or llama.cpp's `content`), plus BOS unless `add_special_tokens: false`; requests to it
are listed in `MockUpstream.lookups`, not `requests`, and no fault header applies to it.
Every response echoes the request headers it received as JSON in `x-mock-echo-headers`,
and `GET /_mock/requests` lists the last requests (method, path, headers, body).

Faults (for the error tests; K counts stream events, or body bytes of a non-stream answer):
- `x-mock-status: N` (+ `x-mock-body: TEXT`, `x-mock-content-type: TYPE`): answer N with that
  body (default: an OpenAI error object; `x-mock-body:` empty sends an empty body);
- `x-mock-retry-after: S`: add `retry-after: S` to that error response;
- `x-mock-fault: drop`: close the connection without answering;
- `x-mock-fault: drop-after:K`: send the head and K events (or K body bytes), then close
  the connection mid-response (no chunked terminator, short of content-length);
- `x-mock-fault: malformed-after:K`: after K events send one event whose data is not JSON,
  then carry on normally (`malformed` = `malformed-after:1`);
- `x-mock-stall-ms: S`: stall S ms before the response head (any endpoint but `/tokenize`), or, with
  `x-mock-stall-after: K` (K >= 1), once after K stream events (K = 0: before the head). A stall ends early when the
  client closes the connection, so no mock task outlives its caller.
`GET /health` answers `health_status` (200 by default; tests set it to stage a sick server, as
vLLM and llama.cpp answer 503 on `/health` while they cannot serve). `GET /metrics` answers
`metrics_text` as Prometheus text (tests set an engine's load gauges), or 501 while it is None, as
llama-server without `--metrics` does; it is counted in `MockUpstream.scrapes`, not recorded.
In-process tests may also queue header sets in `MockUpstream.script`: each request
(but `/health`, `/metrics`, `/tokenize` and `/_mock/*`) takes the next one as if the client had sent those headers,
so one server of several can fail once (`{"x-mock-status": "503"}`) and then answer.

Dialects (`--dialect vllm|llama.cpp|sglang|openai`, `MockUpstream(dialect=...)`): the mock then
behaves on `/v1/completions` as that server does where the proxy depends on it (see
`proxy/adapters/dialects.py` for the sources): its default `max_tokens` (16; llama.cpp unlimited),
what it refuses and in which error shape, its `POST /tokenize` and `GET /v1/models` context
(`context` tokens; a token is a whitespace-separated word, BOS one more when added). A completion
is cut at `max_tokens` words (`finish_reason: "length"`). `x-mock-unconstrained: TEXT` is answered
instead of the text when the request carries no constraint that dialect honours. Asked for
logprobs (`logprobs: N`; llama.cpp's `n_probs`, and none for 0), it gives one token per stream
event (per word when whole) in the dialect's shape. As llama-server does (checked against it by
`just test-engine`), the llama.cpp dialect answers `chatcmpl-` ids and chat-shaped logprobs, puts
usage on each choice's last stream event, takes `n`, says `keep-alive: timeout=5, max=100` and yet closes the connection
after every streamed answer and after every error. Without a dialect the mock accepts any body and
answers the whole text (`/tokenize` as vLLM's).

`GET /_mock/stats` answers `{"open_connections", "busy_connections", "connections"}`: the
connections open now, those of them in the middle of a request (received, not yet fully
answered), and all accepted so far; the connection asking is not counted. An idle
keep-alive connection in a client's pool is open but not busy.
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
_CREDENTIALS = frozenset({"authorization", "proxy-authorization", "cookie", "api-key", "x-api-key"})
_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 500: b"Internal Server Error"}
# What llama-server's head says on every answer it keeps open (cpp-httplib `write_response_core`).
_LLAMA_KEEP_ALIVE = b"keep-alive: timeout=5, max=100\r\n"
MALFORMED_EVENT = b'data: {"id": "cmpl-mock", "choices": [{"text": \n\n'
MAX_STALL_S = 30.0  # a stall is a test fixture, never a way to hang the suite


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

    def __init__(self, dialect: str | None = None, context: int = 32768) -> None:
        self.dialect = dialect
        self.context = context  # the served context length, in mock tokens
        self.lookups: collections.deque[_Request] = collections.deque(maxlen=100)  # /tokenize calls
        self.requests: collections.deque[_Request] = collections.deque(maxlen=100)
        self.holds: dict[str, asyncio.Event] = {}
        self.record = True
        self.connections: set[_Connection] = set()
        self.accepted = 0
        self.script: collections.deque[dict[str, str]] = collections.deque()
        self.health_status = 200
        self.metrics_text: str | None = None
        self.scrapes = 0
        self.track_peak = False  # count `peak_busy`: the most requests in progress at once
        self.peak_busy = 0

    def stats(self, asking: _Connection | None = None) -> dict[str, int]:
        others = [c for c in self.connections if c is not asking]
        return {"open_connections": len(others), "busy_connections": sum(c.busy for c in others),
                "connections": self.accepted - (asking is not None)}

    def hold(self, key: str) -> asyncio.Event:
        return self.holds.setdefault(key, asyncio.Event())

    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> asyncio.base_events.Server:
        loop = asyncio.get_running_loop()
        # A backlog of thousands: the scale bench opens thousands of connections at once.
        return await loop.create_server(lambda: _Connection(self), host, port, reuse_address=True, backlog=4096)


class _Connection(asyncio.Protocol):
    def __init__(self, mock: MockUpstream) -> None:
        self.mock = mock
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.busy = False  # a request was received and its answer is not complete
        self.lost = asyncio.Event()
        self._pause: asyncio.Future[None] | None = None  # a stall in progress, woken early by connection_lost

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.mock.connections.add(self)
        self.mock.accepted += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.mock.connections.discard(self)
        self.busy = False
        self.lost.set()
        if self._pause is not None:
            _wake(self._pause)

    @property
    def closed(self) -> bool:
        return self.lost.is_set()

    async def stall(self, seconds: float) -> bool:
        """Wait `seconds` (capped); True when the peer closed the connection meanwhile.

        A future and one timer rather than `wait_for(lost.wait())`, which makes a task per
        call: the scale bench pauses thousands of streams after every event, and the mock
        must stay cheaper than what it measures."""
        if self.lost.is_set():
            return True
        loop = asyncio.get_running_loop()
        self._pause = pause = loop.create_future()
        timer = loop.call_later(min(seconds, MAX_STALL_S), _wake, pause)
        try:
            await pause
        finally:
            timer.cancel()
            self._pause = None
        return self.lost.is_set()

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
        if self.mock.record and not path.startswith("/_mock/") and path != "/metrics":
            seen = self.mock.lookups if path == "/tokenize" else self.mock.requests
            seen.append(_Request(method, path, query, hdrs, body.decode("utf-8", "replace")))
        # Credentials are echoed as "***": the echo crosses the proxy back to its client
        # (`GET /_mock/requests` and in-process tests see the real values).
        self.echo = _json.encode({k: "***" if k in _CREDENTIALS else v for k, v in hdrs.items()})
        self.keep_alive = self.parser.should_keep_alive()
        self.busy = True
        mock = self.mock
        if mock.script and path not in ("/health", "/tokenize", "/metrics") and not path.startswith("/_mock/"):
            hdrs = {**hdrs, **mock.script.popleft()}
        if mock.track_peak:
            mock.peak_busy = max(mock.peak_busy, sum(c.busy for c in mock.connections))
        handler = _ROUTES.get((method, path))
        if handler is None:
            self.write(404, _error(f"no mock endpoint {method} {path}"))
            return
        # The proxy's own `/tokenize` lookup carries the client's headers: faults are for the request itself.
        stall = _stall_before(hdrs) if path != "/tokenize" else 0.0
        if stall:
            asyncio.ensure_future(self._stalled(stall, handler, hdrs, body, query))
            return
        result = handler(self, hdrs, body, query)
        if asyncio.iscoroutine(result):
            asyncio.ensure_future(result)

    async def _stalled(self, seconds: float, handler: Any, hdrs: dict[str, str], body: bytes, query: str) -> None:
        if await self.stall(seconds):
            return
        result = handler(self, hdrs, body, query)
        if asyncio.iscoroutine(result):
            await result

    # writing
    def write(self, status: int, body: bytes, *, content_type: bytes = b"application/json", keep_alive: bool | None = None,
              extra: bytes = b"", cut_at: int | None = None) -> None:
        """A whole response; `extra` is more header lines; `cut_at` closes the connection after
        that many body bytes (a fault)."""
        assert self.transport is not None
        keep = self.keep_alive if keep_alive is None else keep_alive
        if status >= 400 and self.mock.dialect == "llama.cpp":
            keep = False  # cpp-httplib: "Don't leave connections open after errors" (write_response_core)
        head = b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\nx-mock-echo-headers: %s\r\n%s%s\r\n" % (
            status,
            _REASONS.get(status, b"Status"),
            content_type,
            len(body),
            self.echo if hasattr(self, "echo") else b"{}",
            (_LLAMA_KEEP_ALIVE if self.mock.dialect == "llama.cpp" else b"") if keep else b"connection: close\r\n",
            extra,
        )
        if cut_at is not None:
            self.transport.write(head + body[:cut_at])
            self.transport.close()
            return
        self.transport.write(head + body)
        self.busy = False
        if not keep:
            self.transport.close()

    def start_chunked(self, status: int = 200, content_type: bytes = b"text/event-stream") -> None:
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ntransfer-encoding: chunked\r\ncache-control: no-cache\r\n"
            b"x-mock-echo-headers: %s\r\n%s\r\n" % (status, _REASONS.get(status, b"Status"), content_type, self.echo,
                                                   _LLAMA_KEEP_ALIVE if self.mock.dialect == "llama.cpp" else b"")
        )

    def chunk(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_chunked(self) -> None:
        assert self.transport is not None
        self.transport.write(b"0\r\n\r\n")
        self.busy = False
        if not self.keep_alive or self.mock.dialect == "llama.cpp":
            # llama-server closes after every streamed answer although its head said Keep-Alive: its
            # chunked provider returns false after `sink.done()` (tools/server/server-http.cpp
            # `process_handler_response`), which cpp-httplib's `write_content_chunked` takes as
            # `Error::Canceled` (vendor/cpp-httplib/httplib.cpp), ending the keep-alive loop.
            self.transport.close()

    def abort(self) -> None:
        assert self.transport is not None
        self.transport.abort()


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


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
    finish = "stop"
    top: int | None = None
    dialect = conn.mock.dialect
    if dialect is not None:
        served = _as_dialect(conn, hdrs, body, text)
        if served is None:
            return None
        text, finish, top = served
    if req.stream:
        return _stream(conn, hdrs, req, text, finish, top)
    lp = None if top is None else _logprobs(dialect, split_text(text, None), top)
    doc = {
        "id": _completion_id(dialect),
        "object": "text_completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": [_finish({"index": i, "text": text, "logprobs": lp}, hdrs, finish) for i in range(req.n)],
        # llama-server's whole answer of several choices counts one choice's tokens (seen with n=3)
        "usage": _usage(req.prompt, text, 1 if dialect == "llama.cpp" else req.n),
    }
    conn.write(200, _json.encode(doc), cut_at=_faults(hdrs).drop_after)
    return None


async def _stream(conn: _Connection, hdrs: dict[str, str], req: _Completion, text: str, finish: str = "stop",
                  top: int | None = None) -> None:
    events = int(hdrs["x-mock-events"]) if "x-mock-events" in hdrs else None
    interval = float(hdrs.get("x-mock-interval-ms", "0")) / 1000
    hold = hdrs.get("x-mock-hold")
    created = int(time.time())
    dialect = conn.mock.dialect
    cid = _completion_id(dialect)
    faults = _faults(hdrs)
    conn.start_chunked()
    if faults.drop_after == 0:
        conn.transport.close()  # type: ignore[union-attr]
        return
    pieces = split_text(text, events)
    for k, piece in enumerate(pieces):
        for i in range(req.n):
            lp = None if top is None else _logprobs(dialect, [piece], top, k)
            conn.chunk(b"data: " + _json.encode({
                "id": cid, "object": "text_completion", "created": created, "model": req.model,
                "choices": [{"index": i, "text": piece, "logprobs": lp, "finish_reason": None}],
            }) + b"\n\n")
        if k == 0 and hold:
            try:
                await asyncio.wait_for(conn.mock.hold(hold).wait(), 10)
            except TimeoutError:
                pass
        if faults and await faults.after_event(conn, k + 1):
            return
        if interval and await conn.stall(interval):
            return
        if conn.closed:  # the caller left: stop, as a real server would
            return
    if dialect == "llama.cpp":  # each choice's last event carries its finish and its own usage, asked or not
        for i in range(req.n):
            conn.chunk(b"data: " + _json.encode({
                "id": cid, "object": "text_completion", "created": created, "model": req.model,
                "choices": [_finish({"index": i, "text": "", "logprobs": None}, hdrs, finish)],
                "usage": _usage(req.prompt, text, 1),
            }) + b"\n\n")
        conn.chunk(b"data: [DONE]\n\n")
        conn.end_chunked()
        return
    for i in range(req.n):
        conn.chunk(b"data: " + _json.encode({
            "id": cid, "object": "text_completion", "created": created, "model": req.model,
            "choices": [_finish({"index": i, "text": "", "logprobs": None}, hdrs, finish)],
        }) + b"\n\n")
    if req.stream_options and req.stream_options.get("include_usage"):
        conn.chunk(b"data: " + _json.encode({
            "id": cid, "object": "text_completion", "created": created, "model": req.model,
            "choices": [], "usage": _usage(req.prompt, text, req.n),
        }) + b"\n\n")
    conn.chunk(b"data: [DONE]\n\n")
    conn.end_chunked()


def _completion_id(dialect: str | None) -> str:
    """llama.cpp's completion ids are its chat ids: `"chatcmpl-" + random_string()`
    (tools/server/server-common.cpp `gen_chatcmplid`, used by `/v1/completions` too)."""
    return "chatcmpl-mock" if dialect == "llama.cpp" else "cmpl-mock"


def _logprobs(dialect: str | None, tokens: list[str], top: int, first: int = 0) -> dict[str, Any]:
    """Logprobs for these tokens (one per piece), in the dialect's shape, `top` alternatives each.

    llama.cpp answers the chat shape on `/v1/completions` too: `{"content": [{id, token, bytes,
    logprob, top_logprobs: [{id, token, bytes, logprob}]}]}` (tools/server/server-task.cpp
    `completion_token_output::probs_vector_to_json`, in `server_task_result_cmpl_final::to_json_oaicompat`
    and `..._partial::to_json_oaicompat`). vLLM, SGLang and OpenAI answer the legacy lists (`tokens`,
    `token_logprobs`, `top_logprobs` as {token: logprob}, `text_offset`)."""
    values = [-0.1 * ((first + k) % 7 + 1) for k in range(len(tokens))]
    alts = [[(tok, lp)] + [(f"alt{j}", lp - j) for j in range(1, top)] for tok, lp in zip(tokens, values)]
    if dialect == "llama.cpp":
        def item(i: int, tok: str, lp: float) -> dict[str, Any]:
            return {"id": 1000 + i, "token": tok, "bytes": list(tok.encode()), "logprob": lp}
        return {"content": [{**item(first + k, tok, lp), "top_logprobs": [item(j, t, v) for j, (t, v) in enumerate(a[:top])]}
                            for k, (tok, lp, a) in enumerate(zip(tokens, values, alts))]}
    offsets = [sum(len(t) for t in tokens[:k]) for k in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": [dict(a[:max(top, 1)]) for a in alts],
            "text_offset": offsets}


def _finish(choice: dict[str, Any], hdrs: dict[str, str], default: str = "stop") -> dict[str, Any]:
    choice["finish_reason"] = hdrs.get("x-mock-finish", default)
    if "x-mock-stop-reason" in hdrs:
        choice["stop_reason"] = hdrs["x-mock-stop-reason"]
    return choice


def _fault(conn: _Connection, hdrs: dict[str, str]) -> Any:
    """Failures staged before any answer (module docstring). Returns None when none is asked for."""
    status = hdrs.get("x-mock-status")
    if status is not None:
        body = hdrs.get("x-mock-body")
        retry = hdrs.get("x-mock-retry-after")
        conn.write(int(status), body.encode() if body is not None else _error(f"mock error {status}", "server_error"),
                   content_type=hdrs.get("x-mock-content-type", "application/json").encode(),
                   extra=b"retry-after: %s\r\n" % retry.encode() if retry else b"")
        return True
    if hdrs.get("x-mock-fault") == "drop":
        assert conn.transport is not None
        conn.transport.close()
        return True
    return None


class _Faults(msgspec.Struct):
    """Faults staged inside an answer, parsed once per request."""

    drop_after: int | None = None
    malformed_after: int | None = None
    stall_after: int | None = None
    stall_s: float = 0.0

    def __bool__(self) -> bool:
        return self.drop_after is not None or self.malformed_after is not None or self.stall_after is not None

    async def after_event(self, conn: _Connection, k: int) -> bool:
        """Act after the K-th stream event; True when the stream must end here."""
        if k == self.malformed_after:
            conn.chunk(MALFORMED_EVENT)
        if k == self.drop_after:
            assert conn.transport is not None
            conn.transport.close()  # no chunked terminator: the answer is cut short
            return True
        if k == self.stall_after:
            return await conn.stall(self.stall_s)
        return False


_NO_FAULTS = _Faults()


def _faults(hdrs: dict[str, str]) -> _Faults:
    if "x-mock-fault" not in hdrs and "x-mock-stall-after" not in hdrs:
        return _NO_FAULTS  # the benchmark's path: no parsing
    fault = hdrs.get("x-mock-fault", "")
    kind, _, count = fault.partition("-after:")
    out = _Faults()
    if kind == "drop" and count:
        out.drop_after = int(count)
    elif fault == "malformed" or kind == "malformed":
        out.malformed_after = int(count or 1)
    after = int(hdrs.get("x-mock-stall-after", "0"))
    if after >= 1 and "x-mock-stall-ms" in hdrs:
        out.stall_after = after
        out.stall_s = float(hdrs["x-mock-stall-ms"]) / 1000
    return out


def _stall_before(hdrs: dict[str, str]) -> float:
    """Seconds to stall before the response head (`x-mock-stall-ms` without `x-mock-stall-after`)."""
    if "x-mock-stall-ms" not in hdrs or hdrs.get("x-mock-stall-after", "0") != "0":
        return 0.0
    return float(hdrs["x-mock-stall-ms"]) / 1000


def _stats(conn: _Connection, hdrs: dict[str, str], body: bytes, query: str) -> None:
    conn.write(200, _json.encode(conn.mock.stats(asking=conn)))


def _models(conn: _Connection, hdrs: dict[str, str], body: bytes, query: str) -> None:
    """`x-mock-models: a,b` names the models listed (default: `mock`), each with the served context."""
    ids = [m.strip() for m in hdrs.get("x-mock-models", "mock").split(",") if m.strip()]
    cards = [{"id": i, "object": "model", "owned_by": "mock", "max_model_len": conn.mock.context} for i in ids]
    conn.write(200, _json.encode({"object": "list", "data": cards}))


# --- the dialect fakes ---------------------------------------------------------------------------------

# OpenAI's legacy completions fields: a strict server refuses any other.
_OPENAI_FIELDS = frozenset({"model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs",
                            "max_tokens", "n", "presence_penalty", "seed", "stop", "stream", "stream_options",
                            "suffix", "temperature", "top_p", "user"})
SGLANG_TOKENIZER_LENGTH = 131072  # what SGLang's /tokenize reports: the tokenizer's model_max_length


def mock_tokens(prompt: str, add_special: bool = True) -> int:
    """The mock's tokenizer: one token per whitespace-separated word, and BOS when added."""
    return len(prompt.split()) + (1 if add_special else 0)


def _tokenize(conn: _Connection, hdrs: dict[str, str], body: bytes, query: str) -> None:
    dialect = conn.mock.dialect
    if dialect in ("openai", "llama.cpp"):  # llama.cpp's /tokenize answers tokens only; the proxy never asks it
        conn.write(404, _dialect_error(dialect, 404, "Not Found"))
        return
    try:
        doc = msgspec.json.decode(body)
        prompt = str(doc["prompt"] if "prompt" in doc else doc["content"])  # llama.cpp's field is `content`
        add_special = doc.get("add_special_tokens", True)
    except (msgspec.DecodeError, KeyError, TypeError):
        conn.write(400, _dialect_error(dialect, 400, "prompt is required"))
        return
    count = mock_tokens(prompt, add_special)
    length = SGLANG_TOKENIZER_LENGTH if dialect == "sglang" else conn.mock.context
    conn.write(200, _json.encode({"count": count, "max_model_len": length, "tokens": list(range(count))}))


def _dialect_error(dialect: str | None, status: int, message: str, param: str | None = None) -> bytes:
    """Each server's own error shape."""
    if dialect == "sglang":
        return _json.encode({"object": "error", "message": message, "type": "BadRequest", "param": param,
                             "code": status})
    if dialect == "llama.cpp":
        return _json.encode({"error": {"code": status, "message": message, "type": "invalid_request_error"}})
    if dialect == "openai":
        return _json.encode({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                       "code": None}})
    return _json.encode({"error": {"message": message, "type": "BadRequestError", "param": param, "code": status}})


def _as_dialect(conn: _Connection, hdrs: dict[str, str], body: bytes, text: str) -> tuple[str, str, int | None] | None:
    """The text, finish reason and logprobs' top-N this dialect's server would answer (None: no
    logprobs), or None after answering an error."""
    dialect = conn.mock.dialect
    try:
        doc = msgspec.json.decode(body)
    except msgspec.DecodeError:
        doc = None
    refusal = _refusal(dialect, doc, conn.mock.context) if isinstance(doc, dict) else "the body must be a JSON object"
    if refusal is not None:
        message, param = refusal
        conn.write(400, _dialect_error(dialect, 400, message, param))
        return None
    limit = doc.get("max_tokens", 16 if dialect != "llama.cpp" else -1)
    if dialect == "llama.cpp":
        limit = doc.get("n_predict", limit)
        limit = -1 if limit is None else limit
    elif limit is None:
        limit = 16  # vLLM's normalize_null_max_tokens; OpenAI's default
    if not _constrained(dialect, doc) and "x-mock-unconstrained" in hdrs:
        text = hdrs["x-mock-unconstrained"]
    top = doc.get("logprobs")
    if dialect == "llama.cpp":
        # `n_probs`, with `logprobs` as its alias (tools/server/server-schema.cpp); 0 gives none at all.
        top = doc.get("n_probs", top)
        top = top if isinstance(top, int) and top > 0 else None
    elif not isinstance(top, int) or isinstance(top, bool):
        top = None
    pieces = split_text(text, None)
    if 0 <= limit < len(pieces):
        return "".join(pieces[:limit]), "length", top
    return text, "stop", top


def _refusal(dialect: str | None, doc: dict[str, Any], context: int) -> tuple[str, str | None] | None:
    prompt = doc.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        return "Either prompt or prompt_embeds must be provided and non-empty.", "prompt"
    count = mock_tokens(prompt, doc.get("add_special_tokens", True) if dialect == "vllm" else True)
    if dialect == "vllm":  # vllm/entrypoints/openai/completion/protocol.py validators
        if doc.get("stream_options") and not doc.get("stream"):
            return "Stream options can only be defined when `stream=True`.", "stream_options"
        so = doc.get("structured_outputs")
        if isinstance(so, dict) and sum(so.get(k) is not None for k in ("json", "regex", "choice")) > 1:
            return "You can only use one kind of constraints for structured outputs ('json', 'regex' or 'choice').", \
                "structured_outputs"
        rf = doc.get("response_format")
        if isinstance(rf, dict) and rf.get("type") == "json_schema":
            if not isinstance(rf.get("json_schema"), dict) or "name" not in rf["json_schema"]:
                return "response_format.json_schema needs `name` (JsonSchemaResponseFormat)", "response_format"
        max_tokens = doc.get("max_tokens")
        max_tokens = 16 if max_tokens is None else max_tokens
        if count + max_tokens > context:
            return (f"This model's maximum context length is {context} tokens. However, you requested "
                    f"{count + max_tokens} tokens ({count} in the messages, {max_tokens} in the completion). "
                    "Please reduce the length of the messages or completion."), "max_tokens"
    elif dialect == "llama.cpp":
        # The pinned llama-server reads completions fields through tools/server/server-schema.cpp: `n` is
        # `n_cmpl`, `echo` a chat-parser flag, `best_of` and `suffix` are ignored (the older
        # `oaicompat_completion_params_parse` that refused them is no longer called); tests/engine checks.
        if "json_schema" in doc and not isinstance(doc["json_schema"], dict):
            return ("Field 'json_schema': \"json_schema\": JSON schema conversion failed:\nJSON schema error at #: "
                    "schema must be an object"), None
    elif dialect == "sglang":  # python/sglang/srt/entrypoints/openai/protocol.py CompletionRequest
        if "max_tokens" in doc and not isinstance(doc["max_tokens"], int):
            return "1 validation error: max_tokens: Input should be a valid integer", "max_tokens"
        max_tokens = doc.get("max_tokens", 16)
        if max_tokens <= 0:
            return "max_tokens must be positive", "max_tokens"
        if doc.get("json_schema") is not None and not isinstance(doc["json_schema"], str):
            return "1 validation error: json_schema: Input should be a valid string", "json_schema"
        rf = doc.get("response_format")
        if isinstance(rf, dict) and rf.get("type") == "json_schema":
            if not isinstance(rf.get("json_schema"), dict) or "name" not in rf["json_schema"]:
                return "1 validation error: response_format.json_schema.name: Field required", "response_format"
        if count + max_tokens >= context:  # tokenizer_manager.py
            return (f"Requested token count exceeds the model's maximum context length of {context} tokens. "
                    f"You requested a total of {count + max_tokens} tokens: {count} tokens from the input "
                    f"messages and {max_tokens} tokens for the completion."), None
    elif dialect == "openai":
        for key in doc:
            if key not in _OPENAI_FIELDS:
                return f"Unrecognized request argument supplied: {key}", None
        if isinstance(doc.get("stop"), list) and len(doc["stop"]) > 4:  # the API takes up to 4 sequences
            return f"{doc['stop']!r} is too long - 'stop'", "stop"
    return None


def _constrained(dialect: str | None, doc: dict[str, Any]) -> bool:
    """Whether the request carries a constraint this server honours."""
    rf = doc.get("response_format")
    rf_json = isinstance(rf, dict) and rf.get("type") in ("json_object", "json_schema", "structural_tag")
    if dialect == "vllm":
        so = doc.get("structured_outputs")
        keys = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")
        return rf_json or isinstance(so, dict) and any(so.get(k) is not None for k in keys)
    if dialect == "llama.cpp":  # response_format is not read on completions
        return isinstance(doc.get("json_schema"), dict) or bool(doc.get("grammar"))
    if dialect == "sglang":
        return rf_json or any(isinstance(doc.get(k), str) for k in ("json_schema", "regex", "ebnf"))
    return False


def _echo(conn: _Connection, hdrs: dict[str, str], body: bytes, query: str) -> None:
    conn.write(200, _json.encode({"headers": hdrs, "query": query, "body": body.decode("utf-8", "replace")}))


def _requests(conn: _Connection, hdrs: dict[str, str], body: bytes, query: str) -> None:
    conn.write(200, _json.encode(list(conn.mock.requests)))


def _release(conn: _Connection, hdrs: dict[str, str], body: bytes, query: str) -> None:
    for key in parse_qs(query).get("key", []):
        conn.mock.hold(key).set()
    conn.write(200, b"{}")


def _health(conn: _Connection, hdrs: dict[str, str], body: bytes, query: str) -> None:
    status = conn.mock.health_status
    conn.write(status, b"{}" if status < 400 else _error("mock is unhealthy", "server_error"))


def _metrics(conn: _Connection, hdrs: dict[str, str], body: bytes, query: str) -> None:
    mock = conn.mock
    mock.scrapes += 1
    if mock.metrics_text is None:
        conn.write(501, _error("This server does not support metrics endpoint. Start it with `--metrics`"))
    else:
        conn.write(200, mock.metrics_text.encode(), content_type=b"text/plain; version=0.0.4")


_ROUTES = {
    ("GET", "/health"): _health,
    ("GET", "/metrics"): _metrics,
    ("POST", "/v1/completions"): _completions,
    ("GET", "/v1/models"): _models,
    ("POST", "/tokenize"): _tokenize,
    ("POST", "/echo"): _echo,
    ("GET", "/echo"): _echo,
    ("GET", "/_mock/requests"): _requests,
    ("POST", "/_mock/release"): _release,
    ("GET", "/_mock/stats"): _stats,
}


def run(host: str = "127.0.0.1", port: int = 8019, dialect: str | None = None, context: int = 32768) -> None:
    """Serve until interrupted (the `llmproxy mock-upstream` command)."""

    async def main() -> None:
        server = await MockUpstream(dialect, context).serve(host, port)
        speaks = f"as {dialect}" if dialect else "lenient"
        print(f"mock upstream on http://{host}:{port} (legacy /v1/completions, {speaks})", flush=True)
        async with server:
            await server.serve_forever()

    try:
        import uvloop

        uvloop.run(main())
    except KeyboardInterrupt:
        pass
