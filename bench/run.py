#!/usr/bin/env python3
"""`just bench`: the mock upstream directly vs through the proxy, on loopback, in one bounded run.

Starts `llmproxy mock-upstream` and `llmproxy serve` as separate processes,
then measures non-streaming (wrk) and streaming (a small asyncio client)
load at concurrency 1 and 32, each scenario ~`--seconds` long. CPU per
request comes from /proc/PID/stat of each server (utime + stime) before and
after a scenario: on a small shared machine it is the figure least disturbed
by noise. Prints one table and writes it as JSON (bench/results/latest.json).
Targets are reported as pass/miss, never asserted.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import fleet
import loadclient
import procs
import wrkload
from common import PATHS, ROOT, VIAS, body_for, columns, headers_for, meta, preamble

RSS_CHECKPOINTS = (1_000, 10_000)
RELAY_EVENTS, RELAY_INTERVAL_MS = 8, 25

GOALS = {
    "passthrough_us_per_req": 150.0,
    "chat_us_per_req": 200.0,
    "us_per_event": 10.0,
    "added_p50_ms": 0.3,
    "scale_c32_over_c1": 1.5,
    "rss_mib": 80.0,
    "rss_growth": 0.10,
}
# ---------------------------------------------------------------- scenarios

def measure(stack: procs.Stack, via: str, stream: bool, concurrency: int, seconds: float, use_wrk: bool) -> dict[str, Any]:
    port = stack.mock_port if via == "direct" else stack.proxy_port
    path, body, hdrs = PATHS[via], body_for(via, stream), headers_for(stream)
    p0, m0 = stack.proxy.cpu(), stack.mock.cpu()
    if use_wrk and not stream:
        r = wrkload.load(port, path, body, hdrs, concurrency, seconds)
        tool = "wrk"
    else:
        request = loadclient.build_request(port, path, body, hdrs)
        r = loadclient.run(loadclient.load(port, request, concurrency, seconds))  # type: ignore[assignment]
        tool = "asyncio client"
    p1, m1 = stack.proxy.cpu(), stack.mock.cpu()
    n = max(r.requests, 1)
    row: dict[str, Any] = {
        "scenario": f"{'stream' if stream else 'non-stream'} c={concurrency}", "via": via, "stream": stream,
        "concurrency": concurrency, "tool": tool, "requests": r.requests, "errors": r.errors,
        "statuses": {str(k): v for k, v in r.statuses.items()}, "seconds": round(r.seconds, 3),
        "rps": r.requests / r.seconds if r.seconds else 0.0,
        "p50_ms": _ms(r.q("latency", 50)), "p99_ms": _ms(r.q("latency", 99)),
        "mock_us_per_req": (m1 - m0) / n * 1e6,
        "proxy_cpu_s": None if via == "direct" else p1 - p0,
        "proxy_us_per_req": None if via == "direct" else (p1 - p0) / n * 1e6,
    }
    if stream:
        row |= {"events": r.events, "events_per_s": r.events / r.seconds if r.seconds else 0.0,
                "ttfb_p50_ms": _ms(r.q("ttfb", 50)), "ttfb_p99_ms": _ms(r.q("ttfb", 99)),
                "mock_us_per_event": (m1 - m0) / max(r.events, 1) * 1e6,
                "proxy_us_per_event": None if via == "direct" else (p1 - p0) / max(r.events, 1) * 1e6}
    return row


def missing_row(via: str, stream: bool, concurrency: int, reason: str) -> dict[str, Any]:
    return {"scenario": f"{'stream' if stream else 'non-stream'} c={concurrency}", "via": via, "stream": stream,
            "concurrency": concurrency, "skipped": reason}


def rss_phase(stack: procs.Stack, vias: list[str]) -> dict[str, Any]:
    """RSS idle, then after 1k and 10k non-streaming requests spread over the proxied routes."""
    out: dict[str, Any] = {"idle_mib": stack.proxy.rss(), "vias": vias}
    sent = 0
    for checkpoint in RSS_CHECKPOINTS:
        todo = checkpoint - sent
        for i, via in enumerate(vias):
            share = todo // len(vias) + (1 if i < todo % len(vias) else 0)
            req = loadclient.build_request(stack.proxy_port, PATHS[via], body_for(via, False), headers_for(False))
            r = loadclient.run(loadclient.load(stack.proxy_port, req, 32, 120.0, count=share))
            sent += r.requests + r.errors  # type: ignore[attr-defined]
        out[f"after_{checkpoint}_mib"] = stack.proxy.rss()
    out["requests"] = sent
    return out


def relay_check(stack: procs.Stack, via: str) -> dict[str, Any]:
    """Events spaced by the upstream must reach the client spaced the same: relayed one by one."""
    text = " ".join(f"e{i}" for i in range(RELAY_EVENTS))
    req = loadclient.build_request(stack.proxy_port, PATHS[via], body_for(via, True),
                                   headers_for(True, RELAY_EVENTS, text, RELAY_INTERVAL_MS))
    reads = loadclient.run(loadclient.timeline(stack.proxy_port, req))
    times = [t for t, n in reads if n]  # type: ignore[union-attr]
    span_ms = (times[-1] - times[0]) * 1e3 if times else 0.0
    expected = (RELAY_EVENTS - 1) * RELAY_INTERVAL_MS
    ok = len(times) >= RELAY_EVENTS and span_ms >= 0.8 * expected
    return {"via": via, "reads_with_events": len(times), "span_ms": round(span_ms, 1),
            "expected_span_ms": expected, "pass": ok}


# ---------------------------------------------------------------- targets

def evaluate(rows: list[dict[str, Any]], rss: dict[str, Any] | None, relay: list[dict[str, Any]],
             chat_missing: str | None) -> list[dict[str, Any]]:
    def get(via: str, stream: bool, c: int) -> dict[str, Any] | None:
        for r in rows:
            if r["via"] == via and r["stream"] == stream and r["concurrency"] == c and "skipped" not in r:
                return r
        return None

    goals: list[dict[str, Any]] = []

    def goal(name: str, values: dict[str, float | None], ok: bool | None, limit: str) -> None:
        goals.append({"goal": name, "limit": limit, "values": values,
                      "result": "n/a" if ok is None else ("pass" if ok else "miss")})

    conc = sorted({r["concurrency"] for r in rows})
    for via, key in (("passthrough", "passthrough_us_per_req"), ("chat", "chat_us_per_req")):
        vals = {f"c={c}": (get(via, False, c) or {}).get("proxy_us_per_req") for c in conc}
        got = [v for v in vals.values() if v is not None]
        na = via == "chat" and chat_missing
        goal(f"{via} non-stream proxy CPU", vals, None if (na or not got) else max(got) <= GOALS[key],
             f"<= {GOALS[key]:.0f} µs/req")
    for via in ("passthrough", "chat"):
        vals = {f"c={c}": (get(via, True, c) or {}).get("proxy_us_per_event") for c in conc}
        got = [v for v in vals.values() if v is not None]
        vals |= {f"marginal c={c}": (get(via, True, c) or {}).get("proxy_marginal_us_per_event") for c in conc}
        goal(f"{via} stream proxy CPU", vals, max(got) <= GOALS["us_per_event"] if got else None,
             f"<= {GOALS['us_per_event']:.0f} µs/event")
    for check in relay:
        goal(f"{check['via']} events relayed one by one",
             {"reads": check["reads_with_events"], "span_ms": check["span_ms"]}, check["pass"],
             f">= {RELAY_EVENTS} reads over ~{check['expected_span_ms']} ms")
    for via in ("passthrough", "chat"):
        r = get(via, False, 1)
        v = r.get("added_p50_ms") if r else None
        goal(f"{via} added latency c=1 p50", {"ms": v}, None if v is None else v <= GOALS["added_p50_ms"],
             f"<= {GOALS['added_p50_ms']} ms")
    for via in ("passthrough", "chat"):
        a, b = get(via, False, 1), get(via, False, 32)
        v = b["rps"] / a["rps"] if a and b and a["rps"] else None
        goal(f"{via} req/s c=32 / c=1", {"x": v}, None if v is None else v >= GOALS["scale_c32_over_c1"],
             f">= {GOALS['scale_c32_over_c1']} x")
    if rss:
        first, last = rss[f"after_{RSS_CHECKPOINTS[0]}_mib"], rss[f"after_{RSS_CHECKPOINTS[-1]}_mib"]
        growth = (last - first) / first
        rss["growth"] = growth
        goal("proxy RSS", {"idle": rss["idle_mib"], "1k": first, "10k": last, "growth": growth},
             max(rss["idle_mib"], first, last) <= GOALS["rss_mib"] and abs(growth) <= GOALS["rss_growth"],
             f"<= {GOALS['rss_mib']:.0f} MiB, 1k->10k within {GOALS['rss_growth']:.0%}")
    return goals


def add_deltas(rows: list[dict[str, Any]]) -> None:
    """Latency the proxy adds: proxied p50/p99 minus direct, same mode and concurrency."""
    direct = {(r["stream"], r["concurrency"]): r for r in rows if r["via"] == "direct" and "skipped" not in r}
    for r in rows:
        d = direct.get((r["stream"], r["concurrency"]))
        if r["via"] == "direct" or "skipped" in r or d is None:
            continue
        for k in ("p50_ms", "p99_ms", "ttfb_p50_ms"):
            if r.get(k) is not None and d.get(k) is not None:
                r["added_" + k] = r[k] - d[k]
    # A stream's CPU beyond a non-streaming request's, per event: the relay alone, without the per-request part.
    plain = {(r["via"], r["concurrency"]): r for r in rows if not r["stream"] and "skipped" not in r}
    for r in rows:
        p = plain.get((r["via"], r["concurrency"]))
        if r["stream"] and "skipped" not in r and p and r.get("proxy_us_per_req") is not None and r["events"]:
            r["proxy_marginal_us_per_event"] = (r["proxy_us_per_req"] - p["proxy_us_per_req"]) / (r["events"] / r["requests"])


# ---------------------------------------------------------------- report

def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _value(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if key == "growth":
        return f"{v:+.1%}"
    return format(v, ".3g") if isinstance(v, float) else str(v)


def render(report: dict[str, Any]) -> str:
    m = report["meta"]
    out = preamble(m, "bench", f"   ({m['seconds_per_scenario']} s per scenario)")
    out.append(f"load: non-stream {m['load_tools']['non-stream']}; stream {m['load_tools']['stream']}")
    if report.get("chat_missing"):
        out.append(f"chat route: n/a (chat adapter missing): {report['chat_missing']}")
    head = ("scenario", "via", "req/s", "p50 ms", "p99 ms", "+p50 ms", "ttfb p50", "ttfb p99", "events/s",
            "proxy µs/req", "µs/event", "mock µs/req", "errors")
    table: list[tuple[str, ...]] = []
    skipped: list[tuple[str, str, str]] = []
    for r in report["rows"]:
        if "skipped" in r:
            skipped.append((r["scenario"], r["via"], r["skipped"]))
            continue
        table.append((
            r["scenario"], r["via"], _f(r["rps"], ".0f"), _f(r["p50_ms"], ".3f"), _f(r["p99_ms"], ".3f"),
            _f(r.get("added_p50_ms"), "+.3f"), _f(r.get("ttfb_p50_ms"), ".3f"), _f(r.get("ttfb_p99_ms"), ".3f"),
            _f(r.get("events_per_s"), ".0f"), _f(r["proxy_us_per_req"], ".0f"), _f(r.get("proxy_us_per_event"), ".1f"),
            _f(r["mock_us_per_req"], ".0f"), str(r["errors"]),
        ))
    out += columns(head, table, left=(0, 1))
    for scenario, via, reason in skipped:
        out.append(f"{scenario:<16}  {via:<11}  {reason}")
    rss = report.get("rss")
    if rss:
        out.append(f"proxy RSS: idle {rss['idle_mib']:.1f} MiB, after 1k {rss['after_1000_mib']:.1f}, "
                   f"after 10k {rss['after_10000_mib']:.1f} (routes: {', '.join(rss['vias'])}); "
                   f"end of run {report['rss_end_mib']:.1f}")
    out.append("targets:")
    for g in report["goals"]:
        vals = ", ".join(f"{k} {_value(k, v)}" for k, v in g["values"].items())
        out.append(f"  {g['result'].upper():<4}  {g['goal']:<38} {g['limit']:<34} {vals}")
    return "\n".join(out)


# ---------------------------------------------------------------- main

def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], prog="bench/run.py")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each scenario (default 10)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 s per scenario")
    p.add_argument("--via", default=None,
                   help="comma list of direct,passthrough,chat (default all); with --scale also pipe, a bare byte "
                        "relay (bench/pipe.py) that shows the floor of CPU per event (default with --scale: all four)")
    p.add_argument("--modes", default="non-stream,stream", help="comma list of non-stream,stream")
    p.add_argument("--concurrency", default="1,32", help="comma list (default 1,32)")
    p.add_argument("--no-rss", action="store_true", help="skip the RSS phase (1k + 10k requests)")
    p.add_argument("--no-wrk", action="store_true", help="non-stream load with the asyncio client too")
    p.add_argument("--src", type=Path, default=ROOT, help="folder holding the `proxy` package under test (default: this repo)")
    p.add_argument("--python", default=sys.executable, help="interpreter for the two servers (default: this one)")
    p.add_argument("--label", default="", help="a name for this run in the table and the JSON")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/latest.json", help="JSON output")
    p.add_argument("--profile", action="store_true", help="profile the proxy with py-spy instead of measuring")
    p.add_argument("--native", action="store_true", help="with --profile: sample C frames too (uvloop, httptools)")
    p.add_argument("--scale", action="store_true",
                   help="the scale scenario instead: N slow streams at once (bench/scale.py); writes scale.json")
    p.add_argument("--streams", default="500,1000,2000,4000",
                   help="with --scale: comma list of N (default 500,1000,2000,4000); with --profile: the first N")
    p.add_argument("--ramp", action="store_true",
                   help="with --profile --scale: record the first 2 s (streams starting) instead of the steady state")
    p.add_argument("--clients", type=int, default=1, help="with --scale: load client processes (default 1)")
    fleet.add_args(p)
    p.add_argument("--state", action="store_true",
                   help="measure the cost of a shared limit per request: in-process vs serve --state (a real "
                   "redis-server on loopback; bench/state_cost.py)")
    p.add_argument("--serve-args", default="", help="more `llmproxy serve` options, e.g. '--workers 2'")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds = 2.0
    if args.via is None:
        args.via = ",".join(("direct", "pipe", "passthrough", "chat") if args.scale else VIAS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # SIGTERM unwinds like Ctrl-C, so the `finally` blocks stop both servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    src = args.src.resolve()
    vias = [v for v in args.via.split(",") if v]
    if args.profile:
        import profiling

        return profiling.main(args, src)
    if args.state:
        import state_cost

        return state_cost.main(args, src)
    if args.scale:
        import scale

        return scale.main(args, src)
    if args.fleet:
        return fleet.main(args, src)
    use_wrk = wrkload.available() and not args.no_wrk
    if not use_wrk and not args.no_wrk:
        print("wrk not found: non-stream load uses the asyncio client (apt-get install wrk)", file=sys.stderr)
    modes = [m == "stream" for m in args.modes.split(",") if m]
    concurrency = [int(c) for c in args.concurrency.split(",") if c]
    report: dict[str, Any] = {"meta": meta(args, src, use_wrk)}
    t0 = time.monotonic()
    with procs.start(src, python=args.python, chat="chat" in vias) as stack:
        report["chat_missing"] = stack.chat_missing if "chat" in vias else None
        live = [v for v in vias if v != "chat" or stack.chat_missing is None]
        proxied = [v for v in live if v != "direct"]
        report["rss"] = None if args.no_rss or not proxied else rss_phase(stack, proxied)
        report["relay"] = [relay_check(stack, v) for v in proxied] if True in modes else []
        rows = []
        for stream in modes:
            for c in concurrency:
                for via in vias:
                    if via not in live:
                        rows.append(missing_row(via, stream, c, "n/a (chat adapter missing)"))
                        continue
                    print(f"  {'stream' if stream else 'non-stream'} c={c} {via} ...", file=sys.stderr, flush=True)
                    rows.append(measure(stack, via, stream, c, args.seconds, use_wrk))
                    time.sleep(0.2)  # let closing connections settle before the next baseline
        add_deltas(rows)
        report["rows"] = rows
        report["rss_end_mib"] = stack.proxy.rss()
        report["mock_rss_end_mib"] = stack.mock.rss()
    report["goals"] = evaluate(rows, report["rss"], report["relay"], report["chat_missing"])
    report["meta"]["wall_seconds"] = round(time.monotonic() - t0, 1)
    print(render(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"written: {args.out}  ({report['meta']['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
