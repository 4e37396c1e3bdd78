"""Metrics and the access log: one observation per request, secrets kept out by construction.

A request is observed once, when it ends: the `Exchange` calls `finish` in its
`finally`; a request refused before an Exchange exists (404, 405, 413, 400)
is observed by the app's error handler through `rejected`. Both build a
`RequestRecord` and hand it to `record`, which counts it and writes its one
access-log line.

The log line is built from an allow-list, never from headers or bodies: no
header value but `user-agent`, no query string, no error message (an
upstream's error text may quote the key it refused), and the upstream as
`scheme://host:port/path` without user-info. So default headers,
`Authorization`, `Cookie` and API keys cannot reach it.

Hot path: per chunk only a byte count and the first-byte time (`Meter.send`);
per request a few cached label lookups, two histogram observations and one
log record.

With several workers, prometheus-client's multiprocess mode sums the
workers' counts from files in `PROMETHEUS_MULTIPROC_DIR` (the CLI makes one);
that mode is chosen when prometheus-client is imported, so the variable must
be set before this module is.
"""

from __future__ import annotations

import logging
import os
import time
from fnmatch import fnmatchcase
from time import perf_counter
from typing import TYPE_CHECKING, Any

import msgspec
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

from .balance import REASONS
from .errors import ProxyError, render
from .request_model import UNREAD, Unread, read_once
from .scope_keys import CALLER_KEY, METER_KEY

if TYPE_CHECKING:
    from .forward import Exchange
    from .routes import Route

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OTHER = "other"  # the model label for a model no `models` glob of the route names
UNMATCHED = "unmatched"  # the route label for requests no route took (404, 405, 413 before matching)
CLIENT_CLOSED = 499  # nginx's convention: the client left before the answer began

access_log = logging.getLogger("llmproxy.access")

# `_created` series double the exposition and are not emitted in multiprocess mode anyway.
disable_created_metrics()

# LLM requests run from milliseconds (cached, short) to the 600 s read timeout.
_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

requests = Counter("llmproxy_requests", "Requests answered, by route, model and status.", ["route", "model", "status"])
duration = Histogram(
    "llmproxy_request_duration_seconds", "Time from the request to the last byte of the answer.", ["route"],
    buckets=_DURATION_BUCKETS,
)
ttfb = Histogram(
    "llmproxy_time_to_first_byte_seconds", "Time from the request to the first body byte of a 2xx answer.", ["route"],
    buckets=_TTFB_BUCKETS,
)
active = Gauge(
    "llmproxy_active_streams", "Exchanges in progress: sent upstream, answer not finished.", ["route"],
    multiprocess_mode="livesum",
)
upstream_errors = Counter(
    "llmproxy_upstream_errors", "Upstream failures by kind: unreachable, timeout, reset, non_2xx.", ["route", "kind"]
)
disconnects = Counter("llmproxy_client_disconnects", "Clients that left before the answer was complete.", ["route"])
reloads = Counter("llmproxy_reloads", "Route table reloads, by result (ok, failed).", ["result"])
prompt_tokens = Counter("llmproxy_prompt_tokens", "Prompt tokens the upstream reported in `usage`.", ["route", "model"])
completion_tokens = Counter(
    "llmproxy_completion_tokens", "Completion tokens the upstream reported in `usage`.", ["route", "model"]
)
# LLM latency as users feel it, for streamed 2xx answers. Time to first token: request -> first
# body byte of the stream (the upstream sends its first event once the first token exists).
# Time per output token: first byte -> last byte over (completion_tokens - 1), where the
# adapter reads `usage`. Buckets as vLLM's own histograms of the same names
# (vllm/v1/metrics/loggers.py), so both can be read side by side.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160, 640)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
ttft = Histogram(
    "llmproxy_time_to_first_token_seconds", "Streams: time from the request to the first token event.",
    ["route", "model"], buckets=_TTFT_BUCKETS,
)  # fmt: skip
tpot = Histogram(
    "llmproxy_time_per_output_token_seconds",
    "Streams with usage: time from the first to the last token event over (completion tokens - 1).",
    ["route", "model"], buckets=_TPOT_BUCKETS,
)  # fmt: skip

# Gatekeeping and resilience (README "Gatekeeping and resilience"). `kind` is `route` or `key`,
# `name` the route or key name (never the key itself).
limit_in_flight = Gauge(
    "llmproxy_limit_in_flight", "Requests holding a `limits` / `max_concurrent` slot.", ["kind", "name"],
    multiprocess_mode="livesum",
)
limit_queued = Gauge(
    "llmproxy_limit_queued", "Requests waiting in a limit's queue.", ["kind", "name"], multiprocess_mode="livesum"
)
limit_wait = Histogram(
    "llmproxy_limit_queue_wait_seconds", "Time spent waiting in a limit's queue (served or not).", ["kind", "name"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
limit_rejections = Counter(
    "llmproxy_limit_rejections", "Requests answered 429 by a limit: queue_full or queue_timeout.",
    ["kind", "name", "reason"],
)
retries = Counter("llmproxy_retries", "Upstream requests sent again, by the reason (status, connect, timeout).",
                  ["route", "reason"])
upstream_choices = Counter(
    "llmproxy_upstream_choices", "Requests sent to each upstream of a route with `balance:`, by why it was chosen: "
    f"{', '.join(REASONS)}.", ["route", "upstream", "reason"],
)
upstream_up = Gauge(
    "llmproxy_upstream_up", "1 while the upstream takes requests, 0 while it is skipped as down.", ["route", "upstream"],
    multiprocess_mode="livemin",
)
key_requests = Counter("llmproxy_key_requests", "Requests by the key name that made them, and status.", ["key", "status"])
auth_failures = Counter("llmproxy_auth_failures", "Requests refused by the keys file: 401 or 403.", ["status"])
keys_reloads = Counter("llmproxy_keys_reloads", "Keys file reloads, by result (ok, failed).", ["result"])
# Usage per key and the shared state store (proxy/state.py).
key_tokens = Counter("llmproxy_key_tokens", "Tokens charged to a key's quotas, by key name and kind (prompt, completion).",
                     ["key", "kind"])
state_unavailable = Counter(
    "llmproxy_state_unavailable", "Operations the shared state store did not serve, by policy: open (served with "
    "in-process limits) or closed (answered 503).", ["policy"],
)
state_up = Gauge("llmproxy_state_up", "1 while the shared state store answers, 0 while it is skipped as down.",
                 multiprocess_mode="livemin")

# Engines on demand (proxy/engines.py): routes with `engine:`.
engine_starts = Counter("llmproxy_engine_starts", "Engine starts of routes with engine:, by result (ok, failed).",
                        ["route", "result"])
engine_stops = Counter(
    "llmproxy_engine_stops", "Engine stops, by cause: idle, group, reload, crash, shutdown.", ["route", "cause"]
)
engine_start_seconds = Histogram(
    "llmproxy_engine_start_seconds", "Time from spawning an engine to its first passing health check.", ["route"],
    buckets=(0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600),
)
engines_running = Gauge(
    "llmproxy_engines_running", "1 while the route's engine runs (ready), 0 otherwise.", ["route"],
    multiprocess_mode="livesum",
)


class _Children:
    """`metric.labels(...)` validates, stringifies and locks on every call; cache the children."""

    __slots__ = ("metric", "children")

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.children: dict[tuple[Any, ...], Any] = {}

    def __call__(self, *labels: Any) -> Any:
        child = self.children.get(labels)
        if child is None:
            child = self.children[labels] = self.metric.labels(*(str(v) for v in labels))
        return child


_requests = _Children(requests)
_duration = _Children(duration)
_ttfb = _Children(ttfb)
_active = _Children(active)
_upstream_errors = _Children(upstream_errors)
_disconnects = _Children(disconnects)
_prompt_tokens = _Children(prompt_tokens)
tools_left_out = Counter(
    "llmproxy_tools_left_out", "Tools a Messages/Responses face left out of the prompt because a local model "
    "cannot run them (web_search, code_interpreter, ...), by route and tool type.", ["route", "tool"]
)
_tools_left_out = _Children(tools_left_out)
_completion_tokens = _Children(completion_tokens)
_key_requests = _Children(key_requests)
limit_children = (_Children(limit_in_flight), _Children(limit_queued), _Children(limit_wait), _Children(limit_rejections))
_ttft = _Children(ttft)
_upstream_choices = _Children(upstream_choices)
_tpot = _Children(tpot)


class RequestRecord(msgspec.Struct, tag_field="event", tag="access"):
    """One access-log line. Every field is safe to log: see the module docstring."""

    time: str
    request_id: str
    method: str
    path: str
    route: str | None
    model: str | None  # as the client sent it (clipped)
    upstream: str | None
    status: int
    duration_ms: float
    ttfb_ms: float | None
    bytes_out: int
    streamed: bool
    disconnected: bool
    error: str | None = None  # upstream failure kind, or the OpenAI error code of a refusal
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    client: str | None = None
    user_agent: str | None = None
    key: str | None = None  # the keys file entry's name, never the key
    ttft_ms: float | None = None  # streams: time to the first token event
    tpot_ms: float | None = None  # streams with usage: time per output token after the first
    choice: str | None = None  # routes with `balance:`: why this upstream (affinity, spill, session, ...)
    engine_wait_ms: float | None = None  # `engine:` routes: time spent waiting for the engine to start; null: it ran


class Meter:
    """What one request did on the wire; lives in the ASGI scope from the handler to the log line."""

    __slots__ = (
        "start", "route", "body", "model", "status", "first_byte", "bytes_out", "streamed",
        "disconnected", "recorded", "_send",
    )  # fmt: skip

    def __init__(self, scope: dict[str, Any]) -> None:
        self.start = perf_counter()
        self.route: Route | None = None
        self.body: bytes | None = None  # the client's body, read for `model` when the request is logged
        self.model: str | None | Unread = UNREAD  # the body's `model`, when routing read it
        self.status: int | None = None
        self.first_byte: float | None = None
        self.bytes_out = 0
        self.streamed = False
        self.disconnected = False
        self.recorded = False
        scope[METER_KEY] = self

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            body = message.get("body")
            if body:
                if self.first_byte is None:
                    self.first_byte = perf_counter()
                self.bytes_out += len(body)
        elif message["type"] == "http.response.start":
            self.status = message["status"]
            for name, value in message.get("headers", ()):
                if name == b"content-type":
                    self.streamed = value.startswith(b"text/event-stream")
        await self._send(message)


def meter(scope: dict[str, Any]) -> Meter:
    """The request's meter (made by the handler, or here when an Exchange runs on its own)."""
    m = scope.get(METER_KEY)
    return m if m is not None else Meter(scope)


def begin(scope: dict[str, Any], route: Route, send: Any) -> Meter:
    """An exchange starts: its meter wraps `send`; one more active stream."""
    m = meter(scope)
    m.route = route
    m._send = send
    _active(route.name).inc()
    return m


def finish(m: Meter, exchange: Exchange, scope: dict[str, Any]) -> None:
    """An exchange ended, however: record it once."""
    route = exchange.route
    _active(route.name).dec()
    # scope -> meter -> the server's send -> its cycle -> scope: without this the request's
    # objects wait for the cycle collector (measured: twice the GC time per request).
    m._send = None
    m.disconnected = exchange.disconnected  # the Exchange's watcher is the one judge of that
    if m.recorded:
        return
    status = m.status
    err: ProxyError | None = getattr(exchange, "error", None)
    name = _error_name(err)
    if status is None:  # nothing was answered: the client left, or the exchange crashed (the app answers 500)
        status = CLIENT_CLOSED if m.disconnected else 500
        name = name or (None if m.disconnected else "internal_error")
    usage = exchange.call.usage
    model = read_once(m)
    record(
        _record(
            scope, m, exchange.rid, route.name, model, status,
            upstream=exchange.upstream.label,
            error=name,
            usage=usage,
            choice=exchange.choice,
            engine_wait=exchange.engine_wait,
        ),
        model=model_label(route, model),
        kind=err.kind if err is not None else None,
    )  # fmt: skip


def rejected(scope: dict[str, Any], exc: ProxyError, rid: bytes, face: str | None = "openai") -> None:
    """A request answered with an error before (or instead of) an exchange: record it once.
    `face`: the error shape its body was sent in (its size is `bytes_out`); None: nothing was
    sent (the client had left)."""
    m = scope.get(METER_KEY)
    if m is None:  # refused by the router (405 on an unlisted method) before the handler ran
        m = Meter(scope)
    if m.recorded:
        return
    route = m.route
    model = read_once(m)
    if not m.bytes_out and face is not None:  # the error body went out without the meter: count it
        m.bytes_out = len(render(exc, face))
    record(
        _record(scope, m, rid, route.name if route else None, model, exc.status, error=_error_name(exc)),
        model=model_label(route, model) if route else OTHER,
        kind=exc.kind,
    )


def record(rec: RequestRecord, *, model: str = OTHER, kind: str | None = None) -> None:
    """Count `rec` and write its access-log line: the one observation of a request."""
    route = rec.route or UNMATCHED
    _requests(route, model, rec.status).inc()
    _duration(route).observe(rec.duration_ms / 1000)
    if rec.ttfb_ms is not None and rec.status < 400:
        _ttfb(route).observe(rec.ttfb_ms / 1000)
    if kind is not None:
        _upstream_errors(route, kind).inc()
    if rec.disconnected:
        _disconnects(route).inc()
    if rec.prompt_tokens:
        _prompt_tokens(route, model).inc(rec.prompt_tokens)
    if rec.completion_tokens:
        _completion_tokens(route, model).inc(rec.completion_tokens)
    if rec.key is not None:
        _key_requests(rec.key, rec.status).inc()
    if rec.status in (401, 403):
        auth_failures.labels(status=str(rec.status)).inc()
    if rec.choice is not None:
        _upstream_choices(route, rec.upstream, rec.choice).inc()
    if rec.ttft_ms is not None:
        _ttft(route, model).observe(rec.ttft_ms / 1000)
        if rec.tpot_ms is not None:
            _tpot(route, model).observe(rec.tpot_ms / 1000)
    access_log.info(rec)


_logged_left_out: set[tuple[str, str]] = set()


def left_out_tools(route: str, kinds: list[str]) -> None:
    """A face dropped tools it cannot offer the model (`hosted_tools: ignore`): count them, and log
    each route and tool once (Codex sends `web_search` with every request: a line each would be noise)."""
    for kind in kinds:
        _tools_left_out(route, kind).inc()
        if (route, kind) not in _logged_left_out:
            _logged_left_out.add((route, kind))
            logging.getLogger("llmproxy.faces").info(
                "route %r: left the tool %r out of the prompt (the upstream model cannot run it); "
                "further ones are counted in llmproxy_tools_left_out_total", route, kind)


def engine_started(route: str, seconds: float | None) -> None:
    """An engine start ended: `seconds` from spawn to healthy, or None when it failed."""
    if seconds is None:
        engine_starts.labels(route=route, result="failed").inc()
        return
    engine_starts.labels(route=route, result="ok").inc()
    engine_start_seconds.labels(route=route).observe(seconds)
    engines_running.labels(route=route).set(1)


def engine_stopped(route: str, cause: str) -> None:
    """The gauge first, the count last: a reader (another thread, a scrape) that sees the stop
    counted sees the engine no longer running."""
    engines_running.labels(route=route).set(0)
    engine_stops.labels(route=route, cause=cause).inc()


def reloaded(ok: bool) -> None:
    """Count a route-table reload (`llmproxy_reloads_total{result}`)."""
    reloads.labels(result="ok" if ok else "failed").inc()


def keys_reloaded(ok: bool) -> None:
    keys_reloads.labels(result="ok" if ok else "failed").inc()


def retried(route: str, reason: str) -> None:
    retries.labels(route=route, reason=reason).inc()


def upstream_state(route: str, upstream: str, up: bool) -> None:
    upstream_up.labels(route=route, upstream=upstream).set(1 if up else 0)


FALLBACK_MODELS = 20  # distinct `model` labels a fallback route keeps per process; later names count as `other`
_fallback_seen: dict[str, set[str]] = {}  # route name -> the model labels it has used


def model_label(route: Route, model: str | None) -> str:
    """The bounded `model` label: the route's `models` glob that matched (the glob, not the
    client's string: `qwen2.5-*` matches unboundedly many names); on a fallback route (no
    `models`: the shipped ones) the name the client asked for, for the first
    `FALLBACK_MODELS` distinct names it sees, then `other`. A name a table route lists is
    the same label everywhere."""
    if model is None:
        return OTHER
    if route.models:
        for glob in route.models:
            if fnmatchcase(model, glob):
                return glob
        return OTHER
    if len(model) > 128 or not model.isprintable():
        return OTHER
    seen = _fallback_seen.setdefault(route.name, set())
    if model in seen:
        return model
    if len(seen) >= FALLBACK_MODELS:
        return OTHER
    seen.add(model)
    return model


def exposition(routes: set[str] | frozenset[str] | None = None) -> tuple[bytes, str]:
    """The metrics page: this process's registry, or every worker's files in multiprocess mode.

    With `routes` (the current table's names), series of routes a reload removed are left
    out: prometheus-client cannot delete from the multiprocess files, so the page filters.
    """
    registry: Any = REGISTRY
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    if routes is not None:
        registry = _OnlyRoutes(registry, {*routes, UNMATCHED})
    return generate_latest(registry), CONTENT_TYPE_LATEST


class _OnlyRoutes:
    """A registry view without the samples of routes no longer in the table: those labelled
    `route`, and a route's limit series (`kind="route"`, `name`)."""

    def __init__(self, source: Any, routes: set[str]) -> None:
        self.source = source
        self.routes = routes

    def _kept(self, labels: dict[str, str]) -> bool:
        if labels.get("kind") == "route":
            return labels.get("name") in self.routes
        return labels.get("route", UNMATCHED) in self.routes

    def collect(self) -> Any:
        for family in self.source.collect():
            samples = [s for s in family.samples if self._kept(s.labels)]
            if len(samples) != len(family.samples):
                family.samples = samples
            yield family


def worker_exit() -> None:
    """Drop this worker's live gauges (active streams) from the shared files when it stops."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(os.getpid())


# --- building a record ------------------------------------------------------------------------

_CLIP = 200


def _record(
    scope: dict[str, Any],
    m: Meter,
    rid: bytes,
    route: str | None,
    model: str | None,
    status: int,
    *,
    upstream: str | None = None,
    error: str | None = None,
    usage: tuple[int, int] | None = None,
    choice: str | None = None,
    engine_wait: float | None = None,
) -> RequestRecord:
    now = perf_counter()
    m.recorded = True
    client = scope.get("client")
    ua = None
    for name, value in scope.get("headers", ()):
        if name == b"user-agent":
            ua = value[:_CLIP].decode("latin-1")
            break
    ttft_ms = tpot_ms = None
    if m.streamed and m.first_byte is not None and status < 400:
        ttft_ms = round((m.first_byte - m.start) * 1000, 3)
        if usage and usage[1] > 1:
            tpot_ms = round((now - m.first_byte) * 1000 / (usage[1] - 1), 3)
    return RequestRecord(
        time=_iso(time.time()),
        request_id=rid.decode("latin-1"),
        method=scope.get("method", ""),
        path=_path(scope),
        route=route,
        model=model[:_CLIP] if model is not None else None,
        upstream=upstream,
        status=status,
        duration_ms=round((now - m.start) * 1000, 3),
        ttfb_ms=round((m.first_byte - m.start) * 1000, 3) if m.first_byte is not None else None,
        bytes_out=m.bytes_out,
        streamed=m.streamed,
        disconnected=m.disconnected,
        error=error,
        prompt_tokens=usage[0] if usage else None,
        completion_tokens=usage[1] if usage else None,
        client=client[0] if client else None,
        user_agent=ua,
        key=_caller_name(scope),
        ttft_ms=ttft_ms,
        tpot_ms=tpot_ms,
        choice=choice,
        engine_wait_ms=round(engine_wait * 1000, 3) if engine_wait is not None else None,
    )


def _caller_name(scope: dict[str, Any]) -> str | None:
    caller = scope.get(CALLER_KEY)  # set by the gate when keys are on
    return caller.name if caller is not None else None


def _path(scope: dict[str, Any]) -> str:
    """The path as sent, never the query string (clients put API keys there)."""
    raw = scope.get("raw_path")
    path = raw.split(b"?", 1)[0].decode("latin-1") if raw else scope.get("path", "")
    return path[:1024]


def _error_name(err: ProxyError | None) -> str | None:
    if err is None:
        return None
    if err.kind is not None:
        return err.kind
    return str(err.code) if err.code is not None else type(err).__name__


_second: list[Any] = [None, ""]  # the last whole second and its formatted prefix


def _iso(t: float) -> str:
    """UTC with milliseconds; strftime runs once per second, not once per line."""
    sec = int(t)
    if sec != _second[0]:
        _second[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _second[0] = sec
    return f"{_second[1]}.{int(t * 1000) % 1000:03d}Z"


# --- logging ----------------------------------------------------------------------------------

_encode = msgspec.json.Encoder().encode


class JsonFormatter(logging.Formatter):
    """One JSON object per line: access records as they are, other records as time/level/logger/message."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.msg
        if isinstance(msg, RequestRecord):
            return _encode(msg).decode()
        doc: dict[str, Any] = {
            "time": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return _encode(doc).decode()


class TextFormatter(logging.Formatter):
    """For a terminal: `TIME LEVEL LOGGER: message`; access records as `key=value` pairs."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return _iso(record.created)

    def format(self, record: logging.LogRecord) -> str:
        msg = record.msg
        if isinstance(msg, RequestRecord):
            head = f"{msg.time} {msg.method} {msg.path} {msg.status}"
            pairs = " ".join(
                f"{f}={_text_value(getattr(msg, f))}" for f in msg.__struct_fields__ if f not in _TEXT_HEAD
            )
            return f"{head} {pairs}"
        return super().format(record)


_TEXT_HEAD = frozenset({"time", "method", "path", "status"})


def _text_value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "true" if v else "false"
    s = str(v)
    return _encode(s).decode() if (" " in s or '"' in s or not s) else s


class GraceOver(logging.Filter):
    """uvicorn logs the end of `--grace-period` as an ERROR ("Cancel N running task(s), timeout
    graceful shutdown exceeded", uvicorn/server.py): for the proxy it is the documented way a
    shutdown cuts what still runs (each cut request has its access line), so a warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.error" and str(record.msg).startswith("Cancel %s running task"):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = "grace period over: cutting %s running response(s) (each one's access line says shutting_down)"
        return True


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")


def lean_log_records() -> None:
    """Skip the LogRecord fields our formatters never print (Python's logging HOWTO, "Optimization").

    Measured: the caller lookup (a frame walk) and thread/process names were
    about a fifth of the cost of observing a request. Process-wide, so only
    the served app (`app_from_env`) calls it, never a library user or a test.
    """
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def logging_config(level: str = "info", fmt: str = "json") -> dict[str, Any]:
    """A `logging.config.dictConfig` for the proxy and uvicorn (each worker applies it).

    Access lines go to stdout, everything else to stderr (uvicorn's split);
    uvicorn's own access log stays off: ours has one line per request already.
    Access lines are INFO, so `--log-level warning` silences them.
    """
    formatter = "proxy.observe.JsonFormatter" if fmt == "json" else "proxy.observe.TextFormatter"
    lvl = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"llmproxy": {"()": formatter}},
        "filters": {"grace": {"()": "proxy.observe.GraceOver"}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "llmproxy", "stream": "ext://sys.stderr",
                       "filters": ["grace"]},
            "access": {"class": "logging.StreamHandler", "formatter": "llmproxy", "stream": "ext://sys.stdout"},
        },
        "loggers": {
            "llmproxy.access": {"handlers": ["access"], "level": lvl, "propagate": False},
            "uvicorn": {"handlers": ["stderr"], "level": lvl, "propagate": False},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
        "root": {"handlers": ["stderr"], "level": lvl},
    }
