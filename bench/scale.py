"""`bench/run.py --scale`: thousands of slow streams at once, direct vs passthrough vs chat in one run.

Each scenario opens N streams at once (one connection each), every stream
40 events 250 ms apart (`x-mock-events`, `x-mock-interval-ms`), i.e. 10 s
long. Reported per scenario: streams completed, time to first byte p50/p99,
stretch (duration minus the ideal 10 s) p50/p99, CPU per relayed event of
the proxy, the mock and the load client, and the proxy's RSS per open stream
(peak RSS while the streams are open minus RSS just before, over N).

The load client runs in its own process(es) (`scaleload.py`, `--clients`) so
its CPU is measured apart; if it burns a large share of a core it is the
bottleneck and the row says so. Every scenario is bounded (`DEADLINE`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import procs
from loadclient import percentile
from common import CHAT, COMPLETION, PATHS, columns, meta, preamble

EVENTS, INTERVAL_MS = 40, 250
IDEAL_S = EVENTS * INTERVAL_MS / 1000  # the mock pauses after every event: 10 s
DEADLINE = IDEAL_S + 50  # a stream still open after this is aborted and counted as not completed
STEADY = (3.0, 8.0)  # seconds after the go: the window where every stream is open and past its start
SETTLE_S = 2.0  # between scenarios: closing connections, TIME_WAIT, the proxy's idle pool
TEXT = " ".join(f"t{i}" for i in range(EVENTS))
HERE = Path(__file__).resolve().parent


def body(via: str) -> str:
    """The request: chat for the chat route, completions otherwise (`pipe` and `direct` reach the mock)."""
    doc = dict(CHAT if via == "chat" else COMPLETION) | {"stream": True, "max_tokens": EVENTS}
    return json.dumps(doc, separators=(",", ":"))


def scenario(stack: procs.Stack, via: str, n: int, clients: int, python: str, idle_mib: float | None = None,
             pipe: tuple[procs.Child, int] | None = None) -> dict[str, Any]:
    """One row. `via == "pipe"` measures the byte pipe (`pipe.py`) in the proxy's place."""
    relay, port = pipe if via == "pipe" and pipe else (stack.proxy, stack.proxy_port)
    if via == "direct":
        port = stack.mock_port
    hdrs = {"x-mock-text": TEXT, "x-mock-events": str(EVENTS), "x-mock-interval-ms": str(INTERVAL_MS)}
    shares = [n // clients + (1 if i < n % clients else 0) for i in range(clients)]
    load_before = os.getloadavg()[0]
    rss0 = relay.rss()
    p0, m0 = relay.cpu(), stack.mock.cpu()
    s0 = procs.tree_split(relay.pid)[1]
    kids = []
    for share in shares:
        argv = [python, str(HERE / "scaleload.py"), "--port", str(port), "--path", PATHS.get(via, PATHS["direct"]), "--body", body(via),
                "--n", str(share), "--deadline", str(DEADLINE)]
        for k, v in hdrs.items():
            argv += ["--header", f"{k}: {v}"]
        kids.append(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=HERE))
    time.sleep(0.5)  # interpreters up and waiting for the go
    peak = [rss0]
    steady: dict[str, float] = {}  # proxy CPU at the start and the end of the steady window
    stop = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not stop.wait(0.25):
            peak[0] = max(peak[0], relay.rss())
            t = time.monotonic() - t0
            for key, at in (("a", STEADY[0]), ("b", STEADY[1])):
                if key not in steady and t >= at:
                    steady[key] = relay.cpu()
                    steady[key + "_t"] = t

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    client_cpu0 = sum(procs.cpu_seconds(k.pid) for k in kids)  # interpreter start-up, not load
    for k in kids:
        assert k.stdin is not None
        k.stdin.write(b"go\n")
        k.stdin.flush()
    results = []
    for k in kids:
        out, _ = k.communicate(timeout=DEADLINE + 30)
        results.append(json.loads(out))
    stop.set()
    sampler.join()
    p1, m1 = relay.cpu(), stack.mock.cpu()
    s1 = procs.tree_split(relay.pid)[1]
    ttfb = [x for r in results for x in r["ttfb_s"]]
    dur = [x for r in results for x in r["duration_s"]]
    events = sum(r["events"] for r in results)
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    client_cpu = sum(r["client_cpu_s"] for r in results) - client_cpu0
    wall = max(r["wall_s"] for r in results)
    proxied = via != "direct"
    return {
        "via": via, "n": n, "clients": clients, "completed": sum(r["completed"] for r in results), "errors": errors,
        "events": events, "wall_s": round(wall, 2),
        "ttfb_p50_s": percentile(ttfb, 50), "ttfb_p99_s": percentile(ttfb, 99),
        "stretch_p50_s": _minus(percentile(dur, 50), IDEAL_S), "stretch_p99_s": _minus(percentile(dur, 99), IDEAL_S),
        "proxy_cpu_s": p1 - p0 if proxied else None,
        "proxy_us_per_event": (p1 - p0) / max(events, 1) * 1e6 if proxied else None,
        "proxy_sys_share": (s1 - s0) / (p1 - p0) if proxied and p1 > p0 else None,  # kernel part of the CPU
        "proxy_cpu_share": (p1 - p0) / wall if proxied and wall else None,  # cores busy, on average
        # Only the relay: CPU while every stream is open and past its start, over the events the mock
        # sends meanwhile (N streams, one event per interval). n/a when streams were still starting.
        "proxy_steady_us_per_event": (steady["b"] - steady["a"]) / (n * (steady["b_t"] - steady["a_t"]) / (INTERVAL_MS / 1000)) * 1e6
        if proxied and "b" in steady and ttfb and percentile(ttfb, 100) < STEADY[0] - 0.5 else None,
        "mock_us_per_event": (m1 - m0) / max(events, 1) * 1e6,
        "client_us_per_event": client_cpu / max(events, 1) * 1e6,
        "client_cpu_share": client_cpu / wall if wall else None,
        "proxy_rss_before_mib": rss0, "proxy_rss_peak_mib": peak[0],
        "proxy_kib_per_stream": (peak[0] - rss0) * 1024 / n if proxied else None,
        # Against the freshly started proxy instead: heap grown by earlier scenarios and idle pooled
        # upstream connections count too, so this is the upper bound.
        "proxy_kib_per_stream_vs_idle": (peak[0] - idle_mib) * 1024 / n if proxied and idle_mib and via != "pipe" else None,
        "loadavg_before": load_before,
        "error_sample": next((r["error_sample"] for r in results if r.get("error_sample")), None),
    }


def _minus(a: float | None, b: float) -> float | None:
    return None if a is None else a - b


def add_deltas(rows: list[dict[str, Any]]) -> None:
    """Proxied minus direct at the same N: what the proxy adds, measured in the same run."""
    direct = {r["n"]: r for r in rows if r["via"] == "direct"}
    for r in rows:
        d = direct.get(r["n"])
        if r["via"] == "direct" or d is None:
            continue
        for k in ("ttfb_p99_s", "stretch_p99_s"):
            if r.get(k) is not None and d.get(k) is not None:
                r["added_" + k] = r[k] - d[k]


def render(report: dict[str, Any]) -> str:
    m = report["meta"]
    out = preamble(m, "scale bench")
    out.append(f"proxy: {report['serve_args'] or 'one process'}; {EVENTS} events {INTERVAL_MS} ms apart "
               f"(ideal {IDEAL_S:g} s); client processes: {report['clients']}")
    head = ("N", "via", "completed", "ttfb p50", "ttfb p99", "stretch p50", "stretch p99", "+ttfb p99",
            "+stretch p99", "proxy µs/ev", "steady µs/ev", "sys %", "proxy cores", "KiB/stream", "vs idle", "mock µs/ev", "client µs/ev", "client cores",
            "load", "errors")
    rows = []
    for r in report["rows"]:
        rows.append((
            str(r["n"]), r["via"], f"{r['completed']}/{r['n']}", _s(r["ttfb_p50_s"]), _s(r["ttfb_p99_s"]),
            _s(r["stretch_p50_s"]), _s(r["stretch_p99_s"]), _s(r.get("added_ttfb_p99_s"), "+.3f"),
            _s(r.get("added_stretch_p99_s"), "+.3f"), _s(r["proxy_us_per_event"], ".1f"),
            _s(r["proxy_steady_us_per_event"], ".1f"), _s(r["proxy_sys_share"] and r["proxy_sys_share"] * 100, ".0f"),
            _s(r["proxy_cpu_share"], ".2f"), _s(r["proxy_kib_per_stream"], ".1f"),
            _s(r.get("proxy_kib_per_stream_vs_idle"), ".1f"), _s(r["mock_us_per_event"], ".1f"),
            _s(r["client_us_per_event"], ".1f"), _s(r["client_cpu_share"], ".2f"), f"{r['loadavg_before']:.1f}",
            ",".join(f"{k}={v}" for k, v in r["errors"].items()) or "0",
        ))
    return "\n".join(out + columns(head, rows, left=(1, len(head) - 1)))


def _s(v: float | None, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def main(args: argparse.Namespace, src: Path) -> int:
    vias = [v for v in args.via.split(",") if v]
    ns = [int(x) for x in args.streams.split(",") if x]
    serve_args = tuple(args.serve_args.split()) if args.serve_args else ()
    report: dict[str, Any] = {"meta": meta(args, src, False), "serve_args": " ".join(serve_args),
                              "clients": args.clients, "events": EVENTS, "interval_ms": INTERVAL_MS}
    t0 = time.monotonic()
    rows = []
    with ExitStack() as ctx:
        stack = ctx.enter_context(procs.start(src, python=args.python, chat="chat" in vias, serve_args=serve_args))
        time.sleep(1.0)  # every worker up
        report["proxy_idle_mib"] = idle = stack.proxy.rss()
        live = [v for v in vias if v != "chat" or stack.chat_missing is None]
        pipe = ctx.enter_context(procs.pipe(stack, args.python, HERE / "pipe.py")) if "pipe" in vias else None
        for n in ns:
            for via in live:
                print(f"  scale N={n} {via} ...", file=sys.stderr, flush=True)
                rows.append(scenario(stack, via, n, args.clients, args.python, idle, pipe))
                time.sleep(SETTLE_S)
        report["chat_missing"] = stack.chat_missing if "chat" in vias else None
    add_deltas(rows)
    report["rows"] = rows
    report["meta"]["wall_seconds"] = round(time.monotonic() - t0, 1)
    print(render(report))
    out = args.out if args.out.name != "latest.json" else args.out.with_name("scale.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"written: {out}  ({report['meta']['wall_seconds']} s)")
    return 0
