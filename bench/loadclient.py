"""A small HTTP/1.1 load client on raw asyncio + httptools (uvloop when present).

Used where wrk does not fit: streams (time to first byte, events counted as
they arrive), exact request counts (the RSS phase), and the relay check. It
keeps one keep-alive connection per worker and costs little CPU, because it
shares the two cores with the processes it measures.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httptools

from procs import HOST

REQUEST_TIMEOUT = 10.0


@dataclass
class Result:
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    events: int = 0
    latency: list[float] = field(default_factory=list)  # seconds, whole response
    ttfb: list[float] = field(default_factory=list)  # seconds, first body byte
    statuses: dict[int, int] = field(default_factory=dict)
    quantiles: dict[str, float] = field(default_factory=dict)  # given by wrk instead of samples

    def q(self, kind: str, pct: int) -> float | None:
        """Percentile `pct` of `latency` or `ttfb`, in seconds."""
        key = f"{kind}_p{pct}"
        return self.quantiles[key] if key in self.quantiles else percentile(getattr(self, kind), pct)


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def build_request(port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"host: {HOST}:{port}", "content-type: application/json",
             f"content-length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _Conn(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self, on_chunk: Callable[[float, int], None] | None = None) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] | None = None
        self.on_chunk = on_chunk
        self.first = 0.0
        self.events = 0
        self.status = 0
        self._last = b""

    def reset(self) -> asyncio.Future[None]:
        self.first = 0.0
        self.events = 0
        self.status = 0
        self._last = b""
        self.done = asyncio.get_running_loop().create_future()
        return self.done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("connection closed"))

    def _fail(self, exc: BaseException) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(exc)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        now = time.perf_counter()
        if not self.first:
            self.first = now
        # An SSE event ends with a blank line; count "\n\n" across read boundaries.
        n = (self._last + body).count(b"\n\n")
        self._last = body[-1:]
        self.events += n
        if self.on_chunk is not None:
            self.on_chunk(now, n)

    def on_message_complete(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(None)


async def _connect(port: int, on_chunk: Callable[[float, int], None] | None = None) -> _Conn:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: _Conn(on_chunk), HOST, port)
    return conn


async def _one(conn: _Conn, request: bytes) -> float:
    loop = asyncio.get_running_loop()
    done = conn.reset()
    # A timeout is an error of that request; a cancellation (Ctrl-C) must stop the run.
    timer = loop.call_later(REQUEST_TIMEOUT, _expire, done)
    t0 = time.perf_counter()
    assert conn.transport is not None
    conn.transport.write(request)
    try:
        await done
    finally:
        timer.cancel()
    return t0


def _expire(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_exception(TimeoutError(f"no complete response in {REQUEST_TIMEOUT:.0f} s"))


async def load(port: int, request: bytes, concurrency: int, seconds: float, count: int | None = None) -> Result:
    """Send `request` from `concurrency` connections for `seconds` (or until `count` are sent)."""
    result = Result()
    budget = [count if count is not None else 1 << 62]
    start = time.perf_counter()
    deadline = start + seconds

    async def worker() -> None:
        conn = await _connect(port)
        try:
            while budget[0] > 0 and time.perf_counter() < deadline:
                budget[0] -= 1
                try:
                    t0 = await _one(conn, request)
                except (OSError, httptools.HttpParserError):  # TimeoutError is an OSError
                    result.errors += 1
                    if conn.transport is not None:
                        conn.transport.abort()
                    conn = await _connect(port)
                    continue
                end = time.perf_counter()
                result.statuses[conn.status] = result.statuses.get(conn.status, 0) + 1
                if conn.status != 200:
                    result.errors += 1
                result.requests += 1
                result.events += conn.events
                result.latency.append(end - t0)
                result.ttfb.append((conn.first or end) - t0)
                if not conn.parser.should_keep_alive():
                    assert conn.transport is not None
                    conn.transport.close()
                    conn = await _connect(port)
        finally:
            if conn.transport is not None:
                conn.transport.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.seconds = time.perf_counter() - start
    return result


async def timeline(port: int, request: bytes) -> list[tuple[float, int]]:
    """One request; (arrival time, events in that read) for every body read that arrives."""
    reads: list[tuple[float, int]] = []
    conn = await _connect(port, lambda t, n: reads.append((t, n)))
    try:
        await _one(conn, request)
    finally:
        assert conn.transport is not None
        conn.transport.close()
    return reads


def run(coro: object) -> object:
    """Run on uvloop when installed (it is, with uvicorn[standard]): a cheaper client."""
    try:
        import uvloop

        return uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]
