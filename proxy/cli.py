"""`llmproxy serve | check | mock-upstream`.

Exit codes: 0 ok; 2 bad configuration or usage; 3 cannot start serving (the port is taken,
uvicorn's STARTUP_FAILURE); 4 `check --probe` found an upstream down.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapters.dialects import FACTS
from .errors import ConfigError
from .settings import DEFAULT_MAX_BODY, WorkerSettings, env_default
from .version import version

if TYPE_CHECKING:
    from .config import EngineConfig, KeyConfig
    from .routes import RouteTable

EXIT_CONFIG = 2
EXIT_STARTUP = 3  # uvicorn's STARTUP_FAILURE: cannot bind the port
EXIT_DOWN = 4  # `check --probe`: an upstream did not answer

log = logging.getLogger("llmproxy")


def ranged(kind: type[int] | type[float], low: float, high: float) -> Any:
    """An argparse `type=` that refuses values outside [low, high]: argparse then exits 2 with
    `argument --port: must be an integer from 1 to 65535, got 99999`, naming the option."""
    what = "an integer" if kind is int else "a number"
    span = " to ".join(str(int(x)) if float(x).is_integer() else str(x) for x in (low, high))

    def convert(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what} from {span}, got {text!r}") from None
        if not low <= value <= high:  # NaN fails this too
            raise argparse.ArgumentTypeError(f"must be {what} from {span}, got {text}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its own messages
    return convert


PORT = ranged(int, 1, 65535)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmproxy",
        description="A declarative proxy for local LLM servers. Routes come from YAML files in a folder "
        "(one route per file); the shipped default turns OpenAI chat requests into legacy completions.",
    )
    p.add_argument("--version", action="version", version=f"llmproxy {version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    routes_help = "folder of route files (default: $LLMPROXY_ROUTES or ./routes.d)"
    default_routes = env_default("routes") or WorkerSettings().routes

    s = sub.add_parser("serve", help="serve the routes", description="Validate the routes, then serve them with uvicorn.")
    s.add_argument("--routes", default=default_routes, help=routes_help)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=PORT, default=8080, help="port to listen on (default: 8080)")
    s.add_argument("--reload", action="store_true", help="watch the routes folder and swap in a new table on change")
    s.add_argument("--workers", type=ranged(int, 1, 256), default=1,
                   help="worker processes sharing the port, 1-256 (default: 1; routes with engine: need 1, or each "
                   "worker would start its own copy of the model)")
    s.add_argument("--max-body-size", type=ranged(int, 1, 2**31 - 1), default=DEFAULT_MAX_BODY, metavar="BYTES",
                   help="largest request body in bytes, 1 to 2^31-1 (default: 10 MiB)")
    s.add_argument("--max-upstream-connections", type=ranged(int, 0, 10**7), default=0, metavar="N",
                   help="upstream requests in flight per process; past it a request is refused at once with a 503 "
                   "(default 0: as many as the open-file limit leaves room for, two descriptors per stream)")
    s.add_argument("--backlog", type=ranged(int, 1, 2**31 - 1), default=4096,
                   help="pending connections the listening socket queues (default 4096; the kernel caps it at "
                   "net.core.somaxconn)")
    s.add_argument("--grace-period", type=ranged(float, 0, 86400), default=30.0, metavar="SECONDS",
                   help="on SIGTERM, stop accepting and let running responses finish for this long, "
                   "then cut them (default: 30)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="default: info (access lines are info: 'warning' silences them)")
    s.add_argument("--log-format", default="json", choices=["json", "text"],
                   help="json: one object per line (default); text: for a terminal")
    s.add_argument("--keys", default=env_default("keys"), metavar="FILE",
                   help="require an API key from this YAML file on every proxied request and /v1/models "
                   "(default: $LLMPROXY_KEYS; watched and reloaded on its own)")
    s.add_argument("--cors-origins", default=env_default("cors_origins"), metavar="ORIGINS",
                   help='answer browsers from these origins: "https://a.example,https://b.example" or "*" '
                   "(default: $LLMPROXY_CORS_ORIGINS; off)")
    s.add_argument("--ready-needs-upstreams", action="store_true",
                   help="/readyz answers 503 also while health checks have every upstream of some route out "
                   "(default off: readiness says whether this process can serve; one dead model must not "
                   "take every replica out of a Service)")
    _state_options(s)
    s.add_argument("--otlp-endpoint", metavar="URL", default=env_default("otlp_endpoint"),
                   help="send OpenTelemetry traces over OTLP/HTTP to URL (e.g. http://127.0.0.1:4318/v1/traces); "
                   "needs the `otel` extra (default: off, or $LLMPROXY_OTLP_ENDPOINT)")
    s.add_argument("--otlp-content", action="store_true",
                   help="with --otlp-endpoint: also record prompts and completions in spans (off: no text)")

    c = sub.add_parser("check", help="validate the routes and print the table",
                       description="Exit 0 when every route file is valid (warnings included), 2 otherwise; "
                       "with --probe, 4 when an upstream does not answer.")
    c.add_argument("--routes", default=default_routes, help=routes_help)
    c.add_argument("--probe", action="store_true",
                   help="also send GET /v1/models to every upstream's base URL and print its status and latency, "
                   "or why it is down (off by default: check stays offline)")
    c.add_argument("--keys", default=env_default("keys"), metavar="FILE",
                   help="also validate this keys file (default: $LLMPROXY_KEYS)")

    m = sub.add_parser("mock-upstream", help="run a development legacy-completions server",
                       description="A deterministic OpenAI legacy /v1/completions server (stream and non-stream) for demos and tests.")
    m.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    m.add_argument("--port", type=PORT, default=8019, help="default: 8019")
    m.add_argument("--dialect", choices=list(FACTS), default=None,
                   help="behave as that server's completions endpoint does (defaults, refusals, /tokenize); "
                   "default: accept anything")
    m.add_argument("--context", type=ranged(int, 1, 10**8), default=32768, help="context length the mock serves, in words (default: 32768)")
    return p


def _state_options(s: argparse.ArgumentParser) -> None:
    """`serve`'s shared-state options (proxy/state.py; README "Shared state (Redis)")."""
    from .state import FAILURE_POLICIES

    d = WorkerSettings()
    # A default from the environment stays a string: argparse passes string defaults through `type=`,
    # so `LLMPROXY_STATE_LEASE_TTL=0` is refused (exit 2, naming the option) like `--state-lease-ttl 0`.
    g = s.add_argument_group("shared state (limits, quotas, usage and stored responses across processes and replicas)")
    g.add_argument("--state", metavar="URL", default=env_default("state"),
                   help="a Redis or Valkey: redis://[:PASSWORD@]HOST:PORT/DB, rediss://…[?ssl_ca_certs=CA.pem] for "
                   "TLS (default: $LLMPROXY_STATE, better than the flag, which ps shows; unset: every limit, quota "
                   "and stored response is per process)")
    g.add_argument("--state-failure", choices=FAILURE_POLICIES, default=env_default("state_failure") or d.state_failure,
                   help="when the store does not answer: open serves with in-process limits (a warning each minute), "
                   "closed answers 503 (default: $LLMPROXY_STATE_FAILURE or open)")
    g.add_argument("--state-lease-ttl", type=ranged(float, 1, 300), metavar="SECONDS",
                   default=env_default("state_lease_ttl") or d.state_lease_ttl,
                   help=f"a shared slot's lease, renewed while its request runs: a killed process's slots come back "
                   f"within it (default: {d.state_lease_ttl:g})")
    g.add_argument("--responses-ttl", type=ranged(float, 0.001, 10**8), metavar="SECONDS",
                   default=env_default("responses_ttl") or d.responses_ttl,
                   help=f"how long a Responses answer can be continued with previous_response_id "
                   f"(default: {d.responses_ttl:g})")
    g.add_argument("--responses-max", type=ranged(int, 1, 10**8), metavar="N",
                   default=env_default("responses_max") or d.responses_max,
                   help=f"responses kept in memory per process without --state (default: {d.responses_max})")


def _state_invalid(args: argparse.Namespace) -> str | None:
    """What is wrong with the shared-state flags, or None (never quoting the store's password)."""
    from .state import check_url

    if args.state:  # the numbers are range-checked by argparse (`ranged`)
        try:
            check_url(args.state)
        except ConfigError as exc:
            return str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "mock-upstream":
        from . import mock_upstream

        mock_upstream.run(args.host, args.port, args.dialect, args.context)
        return 0
    # Before anything imports `observe` (the route table does): prometheus-client picks its mode on import.
    own_dir = metrics_dir(args.workers) if args.command == "serve" else None
    try:
        return _command(args)
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)


def _command(args: argparse.Namespace) -> int:
    """`check` or `serve`, once the route files (and the keys file) load."""
    from .config import load_keys
    from .routes import RouteTable

    try:
        table = RouteTable.from_dir(args.routes)
        keys = load_keys(args.keys) if args.keys else None
    except ConfigError as exc:
        print(f"llmproxy: bad configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check":
        health = probe(table) if args.probe else None
        code = EXIT_DOWN if health and any(h.startswith("down") for h in health.values()) else 0
        try:
            print(format_table(table, health), flush=True)
            if keys is not None:
                print(format_keys(args.keys, keys, table), flush=True)
        except BrokenPipeError:  # `llmproxy check | head -1`: the reader left; not an error of ours
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush stays quiet
        return code
    return _serve(args, table)


def format_keys(path: str, keys: tuple[KeyConfig, ...], table: RouteTable) -> str:
    """The keys file as `check --keys` prints it: names, routes, limits; never a key."""
    from fnmatch import fnmatchcase

    lines = []
    for k in keys:
        routes = "all routes" if k.routes == ("*",) else ", ".join(k.routes)
        limit = f", max_concurrent {k.max_concurrent}" if k.max_concurrent is not None else ""
        limit += _quotas(k)
        lines.append(f"key {k.name}: {routes}{limit}")
        for g in k.routes:
            if not any(fnmatchcase(r.name, g) for r in table.routes):
                lines.append(f"warning: {path}: key {k.name!r}: routes: {g!r} matches no route of the table")
    lines.append(f"{len(keys)} key(s) OK in {path}")
    return "\n".join(lines)


def _quotas(k: KeyConfig) -> str:
    from .config import QUOTAS

    return "".join(f", {q} {getattr(k, q)}" for q in QUOTAS if getattr(k, q) is not None) + (
        ", admin" if k.admin else "")


def format_table(table: RouteTable, health: dict[str, str] | None = None) -> str:
    """The route table as `check` prints it: one row per route, one more per extra upstream,
    then the warnings. `health` maps an upstream URL to "up" or "down: reason"."""
    # DIALECT once route files have that key (the upstream server kind), whoever adds it.
    dialect = any(hasattr(r.config, "dialect") for r in table.routes)
    rows = [("PATH", "METHODS", "MODELS", "ADAPTER", "STREAM", "UPSTREAM", *(("DIALECT",) if dialect else ()),
             "NAME", "FILE")]  # fmt: skip
    for r in table.routes:
        c = r.config
        models = ",".join(c.models) or "* (fallback)"
        if c.upstream_model:
            models += f" -> {c.upstream_model}"
        unknown = "not probed: its engine starts on demand" if c.engine is not None else "?"
        ups = [f"{u} [{health.get(u, unknown)}]" if health is not None else u for u in c.upstreams]
        b = c.balancing
        if len(ups) > 1 and (b.policy != "round-robin" or b.session is not None):
            load = f", engine load every {c.balance_load.interval:g} s" if c.balance_load is not None else ""
            ups[0] += f" (balance: {b.policy}{', session' if b.session is not None else ''}{load})"
        extra = (str(getattr(c, "dialect", "") or "-"),) if dialect else ()
        rows.append((c.path, ",".join(c.methods), models, c.adapter, c.stream, ups[0], *extra, c.name, c.source))
        rows.extend(("", "", "", "", "", u, *("" for _ in extra), "", "") for u in ups[1:])
        if c.engine is not None:
            rows.append(("", "", "", "", "", describe_engine(c.engine), *("" for _ in extra), "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    warnings = table.warnings()
    lines.extend(f"warning: {w}" for w in warnings)
    summary = f"{len(table.routes)} route(s) OK on {len(table.paths)} path(s)"
    beside = sorted(table.paths - {r.config.path for r in table.routes})
    if beside:  # a face's own extra paths (count_tokens, input_tokens) are not rows of the table
        summary += f" ({len(beside)} answered beside their route: {', '.join(beside)})"
    if warnings:
        summary += f", {len(warnings)} warning(s)"
    return "\n".join([*lines, summary])


def describe_engine(e: EngineConfig) -> str:
    """One line for `check` and the start-up log: what runs, and when."""
    when = f"idle_ttl {e.idle_ttl:g} s" if e.idle_ttl else "never stopped when idle"
    group = f", group {e.group}" if e.group else ""
    start = "started at start-up (preload)" if e.preload else "started on the first request"
    return f"engine: {e.shown()} ({when}{group}; {start})"


def probe(table: RouteTable, timeout: float = 2.0) -> dict[str, str]:
    """Ask every distinct upstream server at once, with the route's default headers (servers
    started with an API key want them), what the proxy itself would ask: `GET <origin><path>`
    of the route's `health:` when it has one (up on a 2xx, as the health checks count it),
    else `GET /v1/models` (up below 500, but a 404 is "not an OpenAI-compatible server").
    "up: GET PATH STATUS in N ms", else "down: reason". A real HTTP request, not a TCP
    connect: a port that accepts but is not the model server (a proxy's 502 page) shows as such.

    `/v1/models` is served by vLLM (`vllm/entrypoints/openai/api_server.py`), llama.cpp's server
    (`tools/server/server.cpp`) and SGLang (`python/sglang/srt/entrypoints/http_server.py`).
    """
    import asyncio
    from time import perf_counter
    from urllib.parse import urlsplit

    import aiohttp

    from .upstreams import models_url

    async def get(session: aiohttp.ClientSession, url: str, hdrs: dict[str, str], health: bool) -> str:
        started = perf_counter()
        try:
            async with session.get(url, headers=hdrs, allow_redirects=False) as response:
                status = response.status
        except TimeoutError:
            return f"down: no answer within {timeout:g}s"
        except aiohttp.ClientConnectorDNSError:
            return "down: cannot resolve host"
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, ConnectionRefusedError):
                return "down: connection refused"
            return f"down: {exc.os_error.strerror or type(exc.os_error).__name__}"
        except aiohttp.ClientError as exc:  # connected, then no usable HTTP answer
            return f"down: {type(exc).__name__}"
        ms = (perf_counter() - started) * 1000
        said = f"GET {_path_of(url)} {status} in {ms:.0f} ms"
        if health:
            return f"{'up' if 200 <= status < 300 else 'down'}: {said} (health.path)"
        if status == 404:
            return f"down: {said}: not an OpenAI-compatible server (no /v1/models)"
        return f"{'up' if status < 500 else 'down'}: {said}"

    async def run() -> dict[str, str]:
        checks: dict[str, tuple[str, dict[str, str], bool]] = {}
        for r in table.routes:
            h = r.config.health
            for u in r.upstreams if r.engine is None else ():  # an engine is not up until a request starts it
                if h is not None:
                    parts = urlsplit(u)
                    checks.setdefault(u, (f"{parts.scheme}://{parts.netloc}{h.path}", dict(r.config.default_headers), True))
                else:
                    checks.setdefault(u, (models_url(u), dict(r.config.default_headers), False))
        asks = {url: (hdrs, health) for url, hdrs, health in checks.values()}
        t = aiohttp.ClientTimeout(total=timeout)
        async with aiohttp.ClientSession(timeout=t, trust_env=False) as session:
            results = dict(zip(asks, await asyncio.gather(*(get(session, b, h, hl) for b, (h, hl) in asks.items()))))
        return {u: results[b] for u, (b, _, _) in checks.items()}

    return asyncio.run(run())


def _path_of(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).path


def _serve(args: argparse.Namespace, table: RouteTable) -> int:
    """Validate the flags, hand the workers their settings, run."""
    from .config import workers_refused

    problem = _invalid(args) or workers_refused([r.config for r in table.routes], args.workers)
    if problem is not None:
        print(f"llmproxy: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    _export(args)
    return _run(args, table)


def _invalid(args: argparse.Namespace) -> str | None:
    """What is wrong with the `serve` flags, or None."""
    if args.otlp_endpoint:
        from . import tracing

        problem = tracing.missing()
        if problem:
            return f"--otlp-endpoint: {problem}"
    return _state_invalid(args)  # numbers are range-checked by argparse (`ranged`)


def _export(args: argparse.Namespace) -> WorkerSettings:
    """The flags the app reads, into the environment each worker inherits (proxy/settings.py)."""
    settings = WorkerSettings(
        routes=args.routes,
        max_body=args.max_body_size,
        # With workers the supervisor watches the folder and signals them (proxy/workers.py).
        reload=args.reload and args.workers <= 1,
        # Absolute (workers may not share the cwd's view) but not resolved: on a Kubernetes Secret
        # volume `keys.yaml -> ..data/keys.yaml` and `..data` is swapped on update; the resolved
        # path names the first timestamped folder, which the kubelet deletes (tests/test_secret_rotation.py).
        keys=str(Path(args.keys).absolute()) if args.keys else None,
        cors_origins=args.cors_origins or None,
        otlp_endpoint=args.otlp_endpoint or None,
        otlp_content=bool(args.otlp_endpoint and args.otlp_content),
        max_upstream_connections=args.max_upstream_connections,
        ready_needs_upstreams=args.ready_needs_upstreams,
        state=args.state or None,  # the environment, never a command line or a log
        state_failure=args.state_failure,
        state_lease_ttl=args.state_lease_ttl,
        responses_ttl=args.responses_ttl,
        responses_max=args.responses_max,
    )
    settings.export()
    return settings


def _run(args: argparse.Namespace, table: RouteTable) -> int:
    """Set up logging and metrics, say what will be served, and serve until stopped."""
    import signal
    import logging.config

    import uvicorn

    from . import observe

    log_config = observe.logging_config(args.log_level, args.log_format)
    logging.config.dictConfig(log_config)
    if os.environ.get(observe.MULTIPROC_ENV):
        logging.getLogger("llmproxy").info(
            "metrics of %d worker(s) are summed through %s", args.workers, os.environ[observe.MULTIPROC_ENV]
        )
    _log_capacity(args.max_upstream_connections, args.workers)
    if args.state:
        from .state import redact

        log.info("shared state: %s (--state-failure %s, slot leases %g s)", redact(args.state), args.state_failure,
                 args.state_lease_ttl)
    if not args.keys and not is_loopback(args.host):
        logging.getLogger("llmproxy").warning(
            "serving on %s without --keys: anyone who reaches this address uses the upstreams with the routes' "
            "default_headers credentials; give a keys file (README \"API keys\")", args.host,
        )
    log_table(table)
    signal.signal(signal.SIGTERM, _stopped)
    settings: dict[str, Any] = dict(
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
    if args.workers > 1:
        from . import workers

        workers.run(uvicorn.Config("proxy.app:app_from_env", **settings), args.routes, watch=args.reload)
    else:
        uvicorn.run("proxy.app:app_from_env", **settings)
    return 0


def _log_capacity(max_upstream: int, workers: int) -> None:
    """Raise the open-file limit (workers inherit it) and say what one process can hold."""
    import logging

    from . import capacity

    before, after, hard = capacity.raise_open_files()
    limit = max_upstream or capacity.default_connections(after)
    how = "--max-upstream-connections" if max_upstream else "sized from the open-file limit"
    raised = f"raised from {before} to {after}" if after != before else f"{after}"
    logging.getLogger("llmproxy").info(
        "open files: soft limit %s (hard %s); upstream connections: at most %d per process (%s), %d process(es)",
        raised, "unlimited" if hard == -1 else hard, limit, how, workers,
    )


def is_loopback(host: str) -> bool:
    """Whether `--host` only accepts connections from this machine."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def log_table(table: RouteTable) -> None:
    """Start-up says once (in the main process, whatever `--workers`) what it will serve: the
    table as `check` prints it, one log line per row, then each warning (an upstream on its
    built-in default address among them). Upstream URLs carry no secret: config refuses
    user-info and query strings in them."""
    lines = format_table(table).splitlines()
    for line in lines:
        if line.startswith("warning: "):
            log.warning("%s", line.removeprefix("warning: "))
        else:
            log.info("route table: %s", line)


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
