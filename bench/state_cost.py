"""`just bench --state`: what a shared limit costs per request, with and without `serve --state`.

Three runs of the same non-streamed passthrough request, each against a fresh proxy process:
  open       no keys, no limits (the baseline);
  in-process a key with `max_concurrent` and `tokens_per_minute` (counted in the process);
  redis      the same key and limits, shared through a real `redis-server` on loopback
             (`--state`): per request one lease taken and given back, one quota check, one charge.
CPU per request is read from /proc for the proxy and for redis-server; latency from the client.
Needs `redis-server` (Debian's package); says so and stops when it is missing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import loadclient
import procs

KEY = "sk-bench-0123456789abcdef"
KEYS = f"""keys:
  - name: bench
    key: {KEY}
    max_concurrent: 64
    tokens_per_minute: 1000000000
"""
BODY = b'{"model": "qwen", "prompt": "Say hello to the benchmark.", "max_tokens": 16}'


def _redis(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = procs.free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", procs.HOST, "--save", "", "--appendonly", "no",
                             "--dir", str(tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(0.3)
    return proc, port


def _measure(stack: procs.Stack, redis_pid: int | None, concurrency: int, seconds: float, auth: bool) -> dict[str, Any]:
    hdrs = {"authorization": f"Bearer {KEY}", "x-mock-text": "one two three"} if auth else {"x-mock-text": "one two three"}
    request = loadclient.build_request(stack.proxy_port, "/v1/completions", BODY, hdrs)
    loadclient.run(loadclient.load(stack.proxy_port, request, concurrency, 1.0))  # warm-up
    p0 = stack.proxy.cpu()
    r0 = procs.cpu_seconds(redis_pid) if redis_pid else 0.0
    r = loadclient.run(loadclient.load(stack.proxy_port, request, concurrency, seconds))
    p1 = stack.proxy.cpu()
    r1 = procs.cpu_seconds(redis_pid) if redis_pid else 0.0
    n = max(r.requests, 1)  # type: ignore[attr-defined]
    return {
        "requests": r.requests, "errors": r.errors, "rps": round(r.requests / r.seconds),  # type: ignore[attr-defined]
        "p50_ms": round((r.q("latency", 50) or 0) * 1000, 3), "p99_ms": round((r.q("latency", 99) or 0) * 1000, 3),  # type: ignore[attr-defined]
        "proxy_us_per_req": round((p1 - p0) / n * 1e6), "redis_us_per_req": round((r1 - r0) / n * 1e6),
    }  # fmt: skip


def main(args: argparse.Namespace, src: Path) -> int:
    if not (shutil.which("redis-server") or Path("/usr/bin/redis-server").exists()):
        print("redis-server not found (apt-get install redis-server): the --state cost cannot be measured",
              file=sys.stderr)
        return 2
    seconds = 2.0 if args.quick else min(args.seconds, 5.0)
    concurrency = [int(c) for c in args.concurrency.split(",") if c]
    rows: list[tuple[str, int, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="llmproxy-bench-state-") as tmp_name:
        tmp = Path(tmp_name)
        keys = tmp / "keys.yaml"
        keys.write_text(KEYS)
        redis, port = _redis(tmp)
        try:
            runs = (("open", ()), ("in-process", ("--keys", str(keys))),
                    ("redis", ("--keys", str(keys), "--state", f"redis://{procs.HOST}:{port}/0")))
            for name, serve_args in runs:
                with procs.start(src, python=args.python, chat=False, serve_args=serve_args) as stack:
                    for c in concurrency:
                        print(f"  {name} c={c} ...", file=sys.stderr, flush=True)
                        row = _measure(stack, redis.pid if name == "redis" else None, c, seconds, name != "open")
                        rows.append((name, c, row))
        finally:
            redis.terminate()
            redis.wait(5)
    print(f"\nshared limits, non-streamed passthrough, {seconds:g} s per run (`just bench --state`)\n")
    print(f"{'run':<11} {'c':>3} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'proxy µs/req':>13} {'redis µs/req':>13}")
    for name, c, r in rows:
        print(f"{name:<11} {c:>3} {r['rps']:>7} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {r['proxy_us_per_req']:>13} "
              f"{r['redis_us_per_req'] if name == 'redis' else '-':>13}  errors {r['errors']}")
    base = {c: r for name, c, r in rows if name == "in-process"}
    for name, c, r in rows:
        if name == "redis" and c in base:
            print(f"--state at c={c}: +{r['proxy_us_per_req'] - base[c]['proxy_us_per_req']} µs proxy CPU, "
                  f"+{r['redis_us_per_req']} µs redis CPU, +{r['p50_ms'] - base[c]['p50_ms']:.2f} ms p50 per request")
    return 0
