"""`llmproxy serve | check | mock-upstream`. Exit codes: 0 ok, 2 bad configuration or usage."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .errors import ConfigError

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
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="default: info (access lines are info: 'warning' silences them)")
    s.add_argument("--log-format", default="json", choices=["json", "text"],
                   help="json: one object per line (default); text: for a terminal")

    c = sub.add_parser("check", help="validate the routes and print the table", description="Exit 0 when every route file is valid, 2 otherwise.")
    c.add_argument("--routes", default=default_routes, help=routes_help)

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
        print(format_table(table))
        return 0
    return _serve(args)


def format_table(table: object) -> str:
    from .routes import RouteTable

    assert isinstance(table, RouteTable)
    rows = [("NAME", "METHODS", "PATH", "MODELS", "ADAPTER", "STREAM", "UPSTREAM", "FILE")]
    for r in table.routes:
        c = r.config
        rows.append((c.name, ",".join(c.methods), c.path, ",".join(c.models) or "*", c.adapter, c.stream, " ".join(c.upstreams), c.source))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines) + f"\n{len(table.routes)} route(s) OK"


def _serve(args: argparse.Namespace) -> int:
    import logging.config

    import uvicorn

    os.environ["LLMPROXY_ROUTES"] = args.routes
    os.environ["LLMPROXY_MAX_BODY"] = str(args.max_body_size)
    if args.reload:
        os.environ["LLMPROXY_RELOAD"] = "1"
    # Before `observe` is imported anywhere: prometheus-client picks its mode on import.
    own_dir = metrics_dir(args.workers)
    from . import observe

    log_config = observe.logging_config(args.log_level, args.log_format)
    logging.config.dictConfig(log_config)
    if os.environ.get(observe.MULTIPROC_ENV):
        logging.getLogger("llmproxy").info(
            "metrics of %d worker(s) are summed through %s", args.workers, os.environ[observe.MULTIPROC_ENV]
        )
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
            timeout_graceful_shutdown=30,
        )
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
    return 0


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
