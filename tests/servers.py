"""Real servers on loopback ephemeral ports, each in its own thread and event loop."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from proxy.mock_upstream import MockUpstream


class MockServer:
    def __init__(self, mock: MockUpstream, port: int, loop: asyncio.AbstractEventLoop) -> None:
        self.mock = mock
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.loop = loop

    @property
    def requests(self) -> list[Any]:
        return list(self.mock.requests)

    @property
    def lookups(self) -> list[Any]:
        """`POST /tokenize` calls (kept apart from `requests`)."""
        return list(self.mock.lookups)

    def release(self, key: str) -> None:
        self.loop.call_soon_threadsafe(self.mock.hold(key).set)


@contextmanager
def run_mock(dialect: str | None = None, context: int = 32768) -> Iterator[MockServer]:
    """The mock upstream; with `dialect`, the fake of that server (proxy/mock_upstream.py)."""
    mock = MockUpstream(dialect, context)
    ready = threading.Event()
    box: dict[str, Any] = {}

    def main() -> None:
        loop = asyncio.new_event_loop()
        box["loop"] = loop
        server = loop.run_until_complete(mock.serve("127.0.0.1", 0))
        box["server"] = server
        box["port"] = server.sockets[0].getsockname()[1]
        ready.set()
        loop.run_forever()
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()

    t = threading.Thread(target=main, daemon=True)
    t.start()
    assert ready.wait(5)
    try:
        yield MockServer(mock, box["port"], box["loop"])
    finally:
        box["loop"].call_soon_threadsafe(box["loop"].stop)
        t.join(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def run_app(app: Any, **kw: Any) -> Iterator[str]:
    """Serve an ASGI app with uvicorn (uvloop + httptools, as in production) on loopback.

    The listening socket is bound here and handed to uvicorn: a port picked free and bound later
    could be taken in between (a client connection's ephemeral port, another server)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn sets on the sockets it binds
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                            access_log=False, log_level="warning", lifespan="on", **kw)
    server = uvicorn.Server(config)
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "proxy did not start"
        assert t.is_alive(), "proxy thread died"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(10)
        sock.close()


def wait_ready(proc: Any, base: str, err: Any, within: float = 30, path: str = "/readyz") -> None:
    """Wait for a server subprocess (`llmproxy serve`; an engine with `path="/health"`) to answer
    200 at `path`; fail with its output file `err` when it exits or is not ready in time."""
    import httpx

    deadline = time.monotonic() + within
    while True:
        assert proc.poll() is None, err.read_text()
        assert time.monotonic() < deadline, "not ready in time\n" + err.read_text()
        try:
            if httpx.get(f"{base}{path}", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)


def wait_workers(proc: Any, err: Any, workers: int, within: float = 30) -> None:
    """Wait until `workers` workers of `llmproxy serve --workers N` have started (uvicorn logs
    "Application startup complete." once per worker, a replaced one included): `wait_ready`
    returns when the first answers, and one still starting reads the routes folder later."""
    deadline = time.monotonic() + within
    while err.read_text().count("Application startup complete.") < workers:
        assert proc.poll() is None, err.read_text()
        assert time.monotonic() < deadline, f"{workers} workers not started in time\n" + err.read_text()
        time.sleep(0.05)


def stop(proc: Any) -> int:
    """SIGTERM to a server the test started (only that one); its exit code."""
    import signal
    import subprocess

    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)
