"""A small stand-in for a model server, for the engine-on-demand tests (proxy/engines.py).

Speaks what the proxy needs of llama-server / vLLM: `GET /health` (503 while "loading", then
200) and `POST /v1/completions` (JSON or SSE), on 127.0.0.1. Knobs, to play every lifecycle:

  --port P              where to listen (the route passes ${PORT})
  --name N              put in every answer (tells two engines apart)
  --load-seconds S      /health answers 503 for S seconds first (a model loading)
  --fail TEXT           print TEXT on stderr and exit 1 at once (a bad model path)
  --exit-after N        exit with code 3 after answering N completions (a crash)
  --ignore-term         ignore SIGTERM (only SIGKILL stops it)
  --events N --interval S   streamed answers: N events, S seconds apart
  --log DIR             write DIR/<pid>.start at start and DIR/<pid>.exit at exit (monotonic
                        clock readings): how many processes ran, and in which order

Every answer carries the engine's pid (`x-engine-pid`, and the completion text).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", default="engine")
    p.add_argument("--load-seconds", type=float, default=0.0)
    p.add_argument("--fail", default=None)
    p.add_argument("--exit-after", type=int, default=0)
    p.add_argument("--ignore-term", action="store_true")
    p.add_argument("--events", type=int, default=3)
    p.add_argument("--interval", type=float, default=0.0)
    p.add_argument("--log", default=None)
    p.add_argument("--api-key", default=None)  # accepted, as llama-server and vLLM do (the secret-hiding test)
    p.add_argument("--hf-token", default=None)
    a = p.parse_args()
    pid = os.getpid()
    log = Path(a.log) if a.log else None

    def mark(what: str) -> None:
        if log is not None:
            (log / f"{pid}.{what}").write_text(repr(time.monotonic()))

    print(f"engine {a.name} pid {pid}: loading model", flush=True)
    if a.fail:
        print(a.fail, file=sys.stderr, flush=True)
        sys.exit(1)
    mark("start")
    if a.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        def on_term(signum: int, frame: object) -> None:
            mark("exit")
            os._exit(0)

        signal.signal(signal.SIGTERM, on_term)
    ready_at = time.monotonic() + a.load_seconds
    served = [0]
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: object) -> None:  # the proxy captures stdout: keep it short
            print(f"request {self.command} {self.path}", flush=True)

        def _json(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.send_header("x-engine-pid", str(pid))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/health":
                if time.monotonic() < ready_at:
                    self._json(503, {"error": {"code": 503, "message": "Loading model"}})
                else:
                    self._json(200, {"status": "ok"})
                return
            self._json(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
            text = f"{a.name} pid {pid}" + (f" {os.environ['ENGINE_GREETING']}" if "ENGINE_GREETING" in os.environ else "")
            if body.get("stream"):
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("x-engine-pid", str(pid))
                self.send_header("connection", "close")
                self.end_headers()
                for i in range(a.events):
                    chunk = {"id": "cmpl-1", "object": "text_completion", "model": body.get("model"),
                             "choices": [{"index": 0, "text": f"{text} #{i} ", "finish_reason": None}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                    time.sleep(a.interval)
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True
            else:
                self._json(200, {"id": "cmpl-1", "object": "text_completion", "model": body.get("model"),
                                 "choices": [{"index": 0, "text": text, "finish_reason": "stop"}]})
            with lock:
                served[0] += 1
                if a.exit_after and served[0] >= a.exit_after:
                    print(f"engine {a.name}: exiting after {served[0]} request(s)", flush=True)
                    mark("exit")
                    threading.Timer(0.05, os._exit, (3,)).start()

    server = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    server.daemon_threads = True
    print(f"engine {a.name} listening on 127.0.0.1:{a.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
