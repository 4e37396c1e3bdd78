"""A request that lands on a keep-alive connection the server has just closed.

llama-server closes the socket right after the last chunk of every streamed answer although its
head said `Keep-Alive` (tools/server/server-http.cpp: its chunked provider returns false after
`sink.done()`, which cpp-httplib takes as a cancel and ends the connection). The proxy had put that
connection back in its pool; a request that took it in that instant died with a 502 "closed the
connection without answering". Such a request was never processed: it is sent once more on a new
connection. Nothing is resent once a byte of answer came back, nor after a new connection fails.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from servers import run_mock

STREAM = (b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m",'
          b'"choices":[{"index":0,"text":"Hi","logprobs":null,"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')
TOKENIZED = (b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 34\r\n\r\n'
             b'{"count": 3, "max_model_len": 999}')
HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
        b"Keep-Alive: timeout=5, max=100\r\n\r\n")


class OneAnswerPerConnection:
    """A loopback server that streams one answer per connection, its head saying keep-alive, and
    then will not answer on that connection again: like llama-server, except that it closes at the
    moment the next request arrives (`then="close"`), the instant of the race made certain; or it
    first sends the start of a status line (`then="partial"`: an answer had begun).
    `first="close"`: even a new connection's first request is closed unanswered. `POST /tokenize`
    is answered as vLLM's (`count`, `max_model_len`), in JSON."""

    def __init__(self, then: str = "close", first: str = "answer") -> None:
        self.then = then
        self.first = first
        self.seen: list[tuple[int, int]] = []  # (connection number, request number on it)
        self.paths: list[str] = []
        self._conns = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns += 1
        conn, n = self._conns, 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
                n += 1
                self.seen.append((conn, n))
                path = head.split(b" ", 2)[1].decode()
                self.paths.append(path)
                if n == 1 and self.first == "answer":
                    if path == "/tokenize":
                        writer.write(TOKENIZED)
                    else:
                        writer.write(HEAD + b"%x\r\n%s\r\n0\r\n\r\n" % (len(STREAM), STREAM))
                    await writer.drain()
                    continue
                if self.then == "partial" and n > 1:
                    writer.write(b"HTTP/1.1 2")
                    await writer.drain()
                break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    @contextmanager
    def running(self) -> Iterator[str]:
        ready = threading.Event()
        box: dict[str, object] = {}

        def main() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            server = loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
            box["loop"], box["port"] = loop, server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            server.close()
            pending = asyncio.all_tasks(loop)  # connections idle in the proxy's pool
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        t = threading.Thread(target=main, daemon=True)
        t.start()
        assert ready.wait(5)
        try:
            yield f"http://127.0.0.1:{box['port']}"
        finally:
            box["loop"].call_soon_threadsafe(box["loop"].stop)  # type: ignore[attr-defined]
            t.join(5)


def proxy(routes_dir, proxy_for, upstream: str, dialect: str = "vllm", extra: str = "") -> str:
    return proxy_for(routes_dir(r=f"path: /v1/completions\nupstream: {upstream}/v1/completions\n"
                                  f"dialect: {dialect}\n{extra}"))


def post(base: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "stream": True}, timeout=10)


def resends(base: str) -> float:
    """`llmproxy_retries_total{reason="reused_connection"}` of route r (counters live as long as the process)."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    found = re.search(r'llmproxy_retries_total\{reason="reused_connection",route="r"\} (\S+)', text)
    return float(found.group(1)) if found else 0.0


def test_a_request_swallowed_by_a_closed_keep_alive_connection_is_sent_again(routes_dir, proxy_for):
    server = OneAnswerPerConnection()
    with server.running() as url:
        base = proxy(routes_dir, proxy_for, url)
        before = resends(base)
        assert post(base).status_code == 200
        second = post(base)
        assert second.status_code == 200, second.text
        assert STREAM in second.content
        # on the pooled connection, unanswered; then once more, on a new one
        assert server.seen == [(1, 1), (1, 2), (2, 1)]
        assert resends(base) == before + 1


def test_a_context_lookup_swallowed_the_same_way_is_sent_again(routes_dir, proxy_for):
    """`max_tokens: auto` asks the server's `/tokenize` first, on the same pooled connections."""
    server = OneAnswerPerConnection()
    with server.running() as url:
        base = proxy(routes_dir, proxy_for, url, extra="body: {defaults: {max_tokens: auto}}\n")
        assert post(base).status_code == 200
        second = post(base)
        assert second.status_code == 200, second.text
        # the second request's lookup went out on the connection the first one's stream left in the pool
        assert list(zip(server.seen, server.paths)) == [
            ((1, 1), "/tokenize"), ((1, 2), "/v1/completions"), ((2, 1), "/v1/completions"),
            ((2, 2), "/tokenize"), ((3, 1), "/tokenize"), ((3, 2), "/v1/completions"), ((4, 1), "/v1/completions")]


def test_nothing_is_resent_once_a_byte_of_answer_came(routes_dir, proxy_for):
    server = OneAnswerPerConnection(then="partial")
    with server.running() as url:
        base = proxy(routes_dir, proxy_for, url)
        before = resends(base)
        assert post(base).status_code == 200
        assert post(base).status_code == 502
        assert server.seen == [(1, 1), (1, 2)]
        assert resends(base) == before


def test_a_new_connection_closed_unanswered_is_not_resent(routes_dir, proxy_for):
    server = OneAnswerPerConnection(first="close")
    with server.running() as url:
        base = proxy(routes_dir, proxy_for, url)
        before = resends(base)
        assert post(base).status_code == 502
        assert server.seen == [(1, 1)]
        assert resends(base) == before


def test_many_streams_to_a_server_that_closes_after_each_get_no_502(routes_dir, proxy_for):
    """The mock's llama.cpp dialect closes after every stream as llama-server does; before the
    resend, 10 to 30 of 200 streams 8 at a time got a 502 (five runs on this 2-core VM)."""
    with run_mock("llama.cpp") as up:
        base = proxy(routes_dir, proxy_for, up.url, "llama.cpp")

        async def run() -> list[int]:
            async with httpx.AsyncClient(timeout=10) as client:
                sem = asyncio.Semaphore(8)

                async def one(i: int) -> int:
                    async with sem:
                        r = await client.post(f"{base}/v1/completions", headers={"x-mock-text": f"answer {i}"},
                                              json={"prompt": "Hi", "stream": True, "max_tokens": 4})
                        return r.status_code

                return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(200))), 60)

        assert asyncio.run(run()) == [200] * 200
