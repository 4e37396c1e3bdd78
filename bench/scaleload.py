#!/usr/bin/env python3
"""The scale scenario's load client: N slow streams opened at once, run in its own process.

`bench/scale.py` starts one or more of these (`--clients`) so that the client's
CPU is its own process's, measurable apart from the proxy's, and the parent can
sample the servers' RSS while the streams are open. Each stream is one
connection and one request; the client records when it sent the request, when
the first body byte came, when the response ended, and how many SSE events
arrived. It prints one JSON object on stdout and exits.

Bounded: every stream is aborted at `--deadline` seconds after the start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time

import httptools

HOST = "127.0.0.1"  # loopback only, always


class _Stream(asyncio.Protocol):
    __slots__ = ("parser", "transport", "request", "sent", "first", "end", "events", "status", "error", "_last",
                 "done", "sample")  # fmt: skip

    def __init__(self, request: bytes, done: asyncio.Future[None]) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.request = request
        self.sent = self.first = self.end = 0.0
        self.events = 0
        self.status = 0
        self.error: str | None = None
        self._last = b""
        self.done = done
        self.sample = b""  # the start of a non-200 body: what the error said

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.sent = time.perf_counter()
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._finish(f"parse: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(f"closed: {exc!r}" if exc else "closed before the end")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self.status != 200 and len(self.sample) < 300:
            self.sample += body[: 300 - len(self.sample)]
        if not self.first:
            self.first = time.perf_counter()
        self.events += (self._last + body).count(b"\n\n")  # an SSE event ends with a blank line
        self._last = body[-1:]

    def on_message_complete(self) -> None:
        self.end = time.perf_counter()
        self._finish(None)
        assert self.transport is not None
        self.transport.close()

    def _finish(self, error: str | None) -> None:
        if not self.done.done():
            self.error = error
            self.done.set_result(None)


def build_request(port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"host: {HOST}:{port}", "content-type: application/json",
             f"content-length: {len(body)}", "connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def run(port: int, request: bytes, n: int, deadline: float) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    streams: list[_Stream] = []
    connect_errors: dict[str, int] = {}

    async def one() -> None:
        done = loop.create_future()
        stream = _Stream(request, done)
        streams.append(stream)
        try:
            await loop.create_connection(lambda: stream, HOST, port)
        except OSError as exc:
            key = type(exc).__name__ + (f" errno {exc.errno}" if exc.errno else "")
            connect_errors[key] = connect_errors.get(key, 0) + 1
            stream._finish(f"connect: {key}")
            return
        await done

    tasks = [loop.create_task(one()) for _ in range(n)]
    _, pending = await asyncio.wait(tasks, timeout=deadline)
    for t in pending:
        t.cancel()
    for s in streams:
        if not s.done.done():
            s._finish("deadline")
        if s.transport is not None and not s.transport.is_closing():
            s.transport.abort()
    wall = time.perf_counter() - start
    ok = [s for s in streams if s.error is None and s.status == 200]
    errors: dict[str, int] = dict(connect_errors)
    for s in streams:
        if s.error is not None and not s.error.startswith("connect:"):
            key = s.error.split(":")[0] if s.status == 200 else f"status {s.status}: {s.error.split(':')[0]}"
            errors[key] = errors.get(key, 0) + 1
        elif s.error is None and s.status != 200:
            errors[f"status {s.status}"] = errors.get(f"status {s.status}", 0) + 1
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "n": n, "completed": len(ok), "errors": errors, "wall_s": wall,
        "events": sum(s.events for s in streams),
        "ttfb_s": [s.first - s.sent for s in ok],
        "duration_s": [s.end - s.sent for s in ok],
        # Spread of the connect phase: the last request left this long after the first.
        "send_spread_s": (max(s.sent for s in streams if s.sent) - min(s.sent for s in streams if s.sent))
        if any(s.sent for s in streams) else None,
        "client_cpu_s": usage.ru_utime + usage.ru_stime,
        "error_sample": next((s.sample.decode("utf-8", "replace") for s in streams if s.sample), None),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--body", required=True, help="request body (JSON text)")
    p.add_argument("--header", action="append", default=[], help="NAME: VALUE (repeatable)")
    p.add_argument("--n", type=int, required=True, help="streams to open at once")
    p.add_argument("--deadline", type=float, default=60.0, help="abort what is still open after this many seconds")
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    headers = dict(h.split(": ", 1) for h in args.header)
    request = build_request(args.port, args.path, args.body.encode(), headers)
    # Wait for the parent's go (one line on stdin) so that several clients start together.
    sys.stdin.readline()
    try:
        import uvloop

        result = uvloop.run(run(args.port, request, args.n, args.deadline))
    except ImportError:
        result = asyncio.run(run(args.port, request, args.n, args.deadline))
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
