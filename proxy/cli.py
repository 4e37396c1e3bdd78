"""`llmproxy serve | check | mock-upstream`. Exit codes: 0 ok, 2 bad configuration or usage."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .routes import RouteTable

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmproxy",
        description="A declarative proxy for local LLM servers. Routes come from YAML files in a folder "
        "(one route per file); the shipped default turns OpenAI chat requests into legacy completions.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    routes_help = "folder of route files (default: $LLMPROXY_ROUTES or ./routes.d)"
    default_routes = os.environ.get("LLMPROXY_ROUTES", "routes.d")

    s = sub.add_parser("serve", help="serve the routes", description="Validate the routes, then serve them with uvicorn.")
    s.add_argument("--routes", default=default_routes, help=routes_help)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8080, help="port to listen on (default: 8080)")
    s.add_argument("--reload", action="store_true", help="watch the routes folder and swap in a new table on change")
    s.add_argument("--workers", type=int, default=1, help="worker processes sharing the port (default: 1)")
    s.add_argument("--max-body-size", type=int, default=10 * 2**20, help="largest request body in bytes (default: 10 MiB)")
    s.add_argument("--max-upstream-connections", type=int, default=0, metavar="N",
                   help="upstream requests in flight per process; past it a request is refused at once with a 503 "
                   "(default 0: as many as the open-file limit leaves room for, two descriptors per stream)")
    s.add_argument("--backlog", type=int, default=4096,
                   help="pending connections the listening socket queues (default 4096; the kernel caps it at "
                   "net.core.somaxconn)")
    s.add_argument("--grace-period", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM, stop accepting and let running responses finish for this long, "
                   "then cut them (default: 30)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="default: info (access lines are info: 'warning' silences them)")
    s.add_argument("--log-format", default="json", choices=["json", "text"],
                   help="json: one object per line (default); text: for a terminal")

    c = sub.add_parser("check", help="validate the routes and print the table",
                       description="Exit 0 when every route file is valid (warnings included), 2 otherwise.")
    c.add_argument("--routes", default=default_routes, help=routes_help)
    c.add_argument("--probe", action="store_true",
                   help="also try a TCP connect to every upstream and print up/down (off by default: check stays offline)")

    m = sub.add_parser("mock-upstream", help="run a development legacy-completions server",
                       description="A deterministic OpenAI legacy /v1/completions server (stream and non-stream) for demos and tests.")
    m.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    m.add_argument("--port", type=int, default=8019, help="default: 8019")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "mock-upstream":
        from . import mock_upstream

        mock_upstream.run(args.host, args.port)
        return 0
    from .routes import RouteTable

    try:
        table = RouteTable.from_dir(args.routes)
    except ConfigError as exc:
        print(f"llmproxy: bad configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check":
        health = probe(table) if args.probe else None
        print(format_table(table, health))
        return 0
    return _serve(args)


def format_table(table: RouteTable, health: dict[str, str] | None = None) -> str:
    """The route table as `check` prints it: one row per route, one more per extra upstream,
    then the warnings. `health` maps an upstream URL to "up" or "down: reason"."""
    rows = [("PATH", "METHODS", "MODELS", "ADAPTER", "STREAM", "UPSTREAM", "NAME", "FILE")]
    for r in table.routes:
        c = r.config
        models = ",".join(c.models) or "* (fallback)"
        if c.upstream_model:
            models += f" -> {c.upstream_model}"
        ups = [f"{u} [{health.get(u, '?')}]" if health is not None else u for u in c.upstreams]
        rows.append((c.path, ",".join(c.methods), models, c.adapter, c.stream, ups[0], c.name, c.source))
        rows.extend(("", "", "", "", "", u, "", "") for u in ups[1:])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    warnings = table.warnings()
    lines.extend(f"warning: {w}" for w in warnings)
    summary = f"{len(table.routes)} route(s) OK on {len(table.paths)} path(s)"
    if warnings:
        summary += f", {len(warnings)} warning(s)"
    return "\n".join([*lines, summary])


def probe(table: RouteTable, timeout: float = 2.0) -> dict[str, str]:
    """TCP-connect to every distinct upstream host:port at once: "up" or "down: reason"."""
    import asyncio
    import socket
    from urllib.parse import urlsplit

    def address(url: str) -> tuple[str, int]:
        parts = urlsplit(url)
        return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)

    async def connect(host: str, port: int) -> str:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except TimeoutError:
            return f"down: no answer within {timeout:g}s"
        except ConnectionRefusedError:
            return "down: connection refused"
        except socket.gaierror:
            return "down: cannot resolve host"
        except OSError as exc:
            return f"down: {exc.strerror or type(exc).__name__}"
        writer.close()
        return "up"

    async def run() -> dict[str, str]:
        urls = list(dict.fromkeys(u for r in table.routes for u in r.upstreams))
        addrs = list(dict.fromkeys(address(u) for u in urls))
        results = dict(zip(addrs, await asyncio.gather(*(connect(h, p) for h, p in addrs))))
        return {u: results[address(u)] for u in urls}

    return asyncio.run(run())


def _serve(args: argparse.Namespace) -> int:
    import signal
    import logging.config

    import uvicorn

    os.environ["LLMPROXY_ROUTES"] = args.routes
    os.environ["LLMPROXY_MAX_BODY"] = str(args.max_body_size)
    if args.reload:
        os.environ["LLMPROXY_RELOAD"] = "1"
    if args.grace_period < 0:
        print("llmproxy: --grace-period must be >= 0", file=sys.stderr)
        return EXIT_CONFIG
    if args.max_upstream_connections < 0:
        print("llmproxy: --max-upstream-connections must be >= 0 (0: sized from the open-file limit)", file=sys.stderr)
        return EXIT_CONFIG
    os.environ["LLMPROXY_MAX_UPSTREAM_CONNECTIONS"] = str(args.max_upstream_connections)
    # Before `observe` is imported anywhere: prometheus-client picks its mode on import.
    own_dir = metrics_dir(args.workers)
    from . import observe

    log_config = observe.logging_config(args.log_level, args.log_format)
    logging.config.dictConfig(log_config)
    if os.environ.get(observe.MULTIPROC_ENV):
        logging.getLogger("llmproxy").info(
            "metrics of %d worker(s) are summed through %s", args.workers, os.environ[observe.MULTIPROC_ENV]
        )
    _log_capacity(args.max_upstream_connections, args.workers)
    signal.signal(signal.SIGTERM, _stopped)
    try:
        uvicorn.run(
            "proxy.app:app_from_env",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            loop="uvloop",
            http="httptools",
            access_log=False,
            log_config=log_config,
            log_level=args.log_level,
            timeout_graceful_shutdown=args.grace_period,
            backlog=args.backlog,
        )
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
    return 0


def _log_capacity(max_upstream: int, workers: int) -> None:
    """Raise the open-file limit (workers inherit it) and say what one process can hold."""
    import logging

    from . import descriptors

    before, after, hard = descriptors.raise_open_files()
    limit = max_upstream or descriptors.default_connections(after)
    how = "--max-upstream-connections" if max_upstream else "sized from the open-file limit"
    raised = f"raised from {before} to {after}" if after != before else f"{after}"
    logging.getLogger("llmproxy").info(
        "open files: soft limit %s (hard %s); upstream connections: at most %d per process (%s), %d process(es)",
        raised, "unlimited" if hard == -1 else hard, limit, how, workers,
    )


def _stopped(signum: int, frame: object) -> None:
    """SIGTERM is how services are stopped: exit 0. uvicorn replaces this handler while it
    serves and, after its graceful shutdown, restores it and re-raises the signal, which
    would otherwise kill the process with status -15."""
    raise SystemExit(0)


def metrics_dir(workers: int) -> str | None:
    """Make `PROMETHEUS_MULTIPROC_DIR` ready; return the folder to remove at exit, if we made it.

    Each worker counts in its own process, so with `--workers N` a scrape
    answered by one worker would see only its share: prometheus-client's
    multiprocess mode keeps the counts in files that every worker sums. An
    operator's folder is kept but emptied of a previous run's files (they
    would be summed in); otherwise several workers get a fresh temporary one.
    """
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if configured:
        folder = Path(configured)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.db"):
            stale.unlink()
        return None
    if workers <= 1:
        return None
    made = tempfile.mkdtemp(prefix="llmproxy-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = made
    return made


if __name__ == "__main__":
    sys.exit(main())
