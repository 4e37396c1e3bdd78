"""CPU per request of the proxy's own Python path, in process, with no sockets: the gate, routing,
`prepare`, the Exchange, header policy and observation, over a fake upstream session.

`just bench` runs the load generators, the mock and the proxy on the same cores; this measures the
proxy's own code alone, so alternating runs of two copies (`--src`) compare them with less noise.
It leaves out uvicorn, httptools and aiohttp, which a change to the proxy's code does not touch.

    .venv/bin/python bench/inproc.py                       # this checkout's proxy/
    .venv/bin/python bench/inproc.py --src /tmp/other      # another copy (a folder holding proxy/)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BODY = b'{"model": "m", "prompt": "hello", "max_tokens": 8}'
ANSWER = b'{"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":"hi","finish_reason":"stop"}]}'


class _Content:
    def __init__(self) -> None:
        self._eof = False

    async def iter_any(self) -> Any:
        self._eof = True
        yield ANSWER

    def at_eof(self) -> bool:
        return self._eof


class _Response:
    status = 200
    raw_headers = ((b"Content-Type", b"application/json"), (b"Content-Length", str(len(ANSWER)).encode()))
    headers: dict[str, str] = {"content-type": "application/json"}

    def __init__(self) -> None:
        self.content = _Content()

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Session:
    async def request(self, method: str, url: str, **kw: Any) -> _Response:
        return _Response()


async def _run(app: Any, n: int) -> float:
    never = asyncio.get_running_loop().create_future()

    async def send(message: dict[str, Any]) -> None:
        pass

    start = time.process_time()
    for _ in range(n):
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": BODY, "more_body": False}
            await never
            return {"type": "http.disconnect"}

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions",
                 "query_string": b"", "scheme": "http", "client": ("127.0.0.1", 5000),
                 "headers": [(b"host", b"proxy"), (b"content-type", b"application/json"),
                             (b"content-length", str(len(BODY)).encode()), (b"user-agent", b"bench")]}
        await app(scope, receive, send)
    return (time.process_time() - start) / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", help="a folder holding the `proxy` package to measure")
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if args.src:
        sys.path.insert(0, args.src)
    from proxy.app import create_app
    from proxy.routes import RouteTable

    logging.getLogger("llmproxy.access").setLevel(logging.WARNING)  # as `just bench` serves
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "r.yaml").write_text("path: /v1/completions\nupstream: http://127.0.0.1:9/v1/completions\n")
        app = create_app(RouteTable.from_dir(tmp))
    app.litestar.state.client = _Session()
    import proxy

    import gc

    loop = asyncio.new_event_loop()
    loop.run_until_complete(_run(app, 2_000))  # warm-up
    gc.collect()
    gc.freeze()  # as `app_from_env` does
    runs = [loop.run_until_complete(_run(app, args.requests)) for _ in range(args.repeats)]
    print(f"{Path(proxy.__file__).parent}: {statistics.median(runs):.1f} µs CPU/request "
          f"(median of {args.repeats} x {args.requests}; runs {', '.join(f'{r:.1f}' for r in runs)})")


if __name__ == "__main__":
    main()
