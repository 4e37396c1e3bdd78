"""The app factory: a thin ASGI gate in front of a Litestar app.

Litestar's runtime routes are add-only and cannot share a path+method
(`Litestar.register` in litestar/app.py rebuilds the routing trie and never
removes a handler, https://docs.litestar.dev/2/usage/routing/overview.html "Registering
routes dynamically"; a second handler for one path+method raises
`ImproperlyConfiguredException` in litestar/routes/http.py), while route
files can be replaced at runtime and share a path by model; so routing asks our
immutable `RouteTable`. Paths in the table go straight from the gate to the
forwarder, an outer ASGI callable in front of Litestar (measured ~65 µs CPU less
per request than a Litestar catch-all handler, which builds a `Request` and
runs `to_kwargs` and `to_response`: litestar/routes/http.py); Litestar serves
everything else: its lifespan, the proxy's own endpoints, and 404/405 in the
OpenAI shape.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from litestar import Litestar, Request, Response, get
from litestar.datastructures import State
from litestar.exceptions import HTTPException

from . import capacity, catalog, errors, headers, observe, tracing
from .cors import Cors
from .capacity import UpstreamSlots, default_connections, raise_open_files
from .engines import Engines
from .errors import Overloaded, ProxyError
from .forward import Exchange, prepare, send_error
from .engine_load import LoadWatch
from .health import Monitor
from .keys import CREDENTIAL_HEADERS, Caller, Keyring, KeysHolder
from .limits import Hold, Limiter, Limiters
from .reload import LAST_GOOD_ENV, POLL_INTERVAL, TableHolder
from .routes import Route, RouteTable
from .scope_keys import CALLER_KEY
from .settings import DEFAULT_MAX_BODY, WorkerSettings
from .state import Admission, State
from .transport import ClientFactory, make_client

GC_YOUNG = 100_000  # allocations between young-generation collections (CPython's default: 700)
# Open without a key when keys are on: probes and scrapers carry none. Everything else,
# unknown paths and path variants included, answers 401 first.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

log = logging.getLogger("llmproxy")


def create_app(
    table: RouteTable | TableHolder,
    *,
    client: ClientFactory = make_client,
    max_body_size: int = DEFAULT_MAX_BODY,
    reload: bool = False,
    poll_interval: float = POLL_INTERVAL,
    keys: KeysHolder | Keyring | None = None,
    cors: Cors | None = None,
    max_upstream_connections: int = 0,
    ready_needs_upstreams: bool = False,
    state: State | None = None,
) -> Gateway:
    """Build the ASGI app serving `table`. `client` makes the upstream session (tests swap it).

    `reload`: watch the holder's folder and swap in a new table on change (needs a
    `TableHolder` with a folder, e.g. `TableHolder.load(folder)`). A holder with a
    folder also reloads on SIGHUP.
    `keys`: require an API key (a `KeysHolder` with a path is watched and reloaded on its own).
    `cors`: answer browsers from these origins.
    `max_upstream_connections`: upstream requests in flight past which a request is refused
    with a 503 (0: sized from the open-file limit).
    `ready_needs_upstreams`: `/readyz` also answers 503 while health checks have every upstream
    of some route out (off: readiness is about this process only).
    `state`: quotas, usage, stored responses and (with a store URL) shared slots; default in-process.
    """
    state = state if state is not None else State()
    holder = table if isinstance(table, TableHolder) else TableHolder(table)
    if reload and holder.source is None:
        raise ValueError("reload=True needs a TableHolder that knows its routes folder")
    key_holder = KeysHolder(keys) if isinstance(keys, Keyring) else keys
    monitor = Monitor(holder)
    engines = Engines()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with client() as session, state.running(), anyio.create_task_group() as tg:
            app.state.client = session
            engines.session = session  # before any request: engine health checks use it
            if reload:
                tg.start_soon(holder.watch, poll_interval)
            if key_holder is not None and key_holder.source is not None:
                tg.start_soon(key_holder.watch, poll_interval)
            tg.start_soon(monitor.run, session)
            tg.start_soon(LoadWatch(holder).run, session)
            tg.start_soon(capacity.watch)
            tg.start_soon(engines.run, holder, session)
            try:
                with holder.reload_on_sighup():
                    yield
            finally:
                await engines.close()  # after uvicorn let running responses finish (--grace-period)
                holder.stop()
                if key_holder is not None:
                    key_holder.stop()
                observe.worker_exit()
                tracing.flush()
                tg.cancel_scope.cancel()

    app = Litestar(
        route_handlers=[healthz, readyz, models, model, metrics, usage],
        lifespan=[lifespan],
        exception_handlers={ProxyError: _openai_error, HTTPException: _openai_error, 500: _openai_error},
        request_max_body_size=max_body_size,  # the one limit, also on the proxy's own endpoints
        openapi_config=None,
        logging_config=None,
        debug=False,
    )
    app.state.holder = holder
    app.state.engines = engines
    app.state.ready_needs_upstreams = ready_needs_upstreams
    app.state.max_body_size = max_body_size  # named in the 413 message
    app.state.slots = UpstreamSlots(max_upstream_connections or default_connections())
    app.state.shared = state
    app.state.key_holder = key_holder  # not `keys`: State is a mapping, and that is its method
    return Gateway(app, holder, max_body_size, key_holder, cors, state)


class Gateway:
    """The ASGI entry point: paths in the route table go to the forwarder, the rest to Litestar.

    With keys on, every path but `OPEN_PATHS` needs a valid key first, checked before the
    body is read; with limits, a slot is taken before the exchange and held to its end.
    """

    __slots__ = ("litestar", "holder", "max_body_size", "keys", "cors", "limiters", "shared")

    def __init__(self, litestar: Litestar, holder: TableHolder, max_body_size: int,
                 keys: KeysHolder | None = None, cors: Cors | None = None, state: State | None = None) -> None:  # fmt: skip
        self.litestar = litestar
        self.holder = holder
        self.max_body_size = max_body_size
        self.keys = keys
        self.cors = cors
        self.shared = state if state is not None else State()
        self.limiters = Limiters(self.shared)

    @property
    def state(self) -> State:
        return self.litestar.state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            if self.cors is not None:
                await self.cors(scope, receive, send, self._http)
                return
            await self._http(scope, receive, send)
            return
        await self.litestar(scope, receive, send)

    async def _http(self, scope: Any, receive: Any, send: Any) -> None:
        table = self.holder.current  # one read: the whole request uses this table
        path = route_path(scope)
        if table.has_path(path):
            scope["app"] = self.litestar  # where the Exchange finds the shared client
            await self._proxy(scope, receive, send, table, path)
            return
        if self.keys is not None and path not in OPEN_PATHS:
            try:
                scope[CALLER_KEY] = self.keys.current.authenticate(scope["headers"])
            except ProxyError as exc:
                observe.Meter(scope)
                await reject(scope, send, exc, table.face(path))
                return
        await self.litestar(scope, receive, send)

    async def _proxy(self, scope: Any, receive: Any, send: Any, table: RouteTable, path: str) -> None:
        meter = observe.Meter(scope)  # the clock starts; `reject` finds it in the scope
        caller: Caller | None = None
        admitted: Admission | None = None
        route: Route | None = None
        try:
            if self.keys is not None:  # before the body: an unknown client costs no read
                caller = scope[CALLER_KEY] = self.keys.current.authenticate(scope["headers"], scope["query_string"])
            body = await read_body(scope, receive, self.max_body_size)
            if body is None:
                return  # the client left while sending
            meter.body = body
            route, meter.model = table.match(scope["method"], path, body)
            meter.route = route
            if caller is not None:
                caller.check(route.name)
            previous = route.adapter.previous  # the Responses face's stored conversations
            if previous is not None and (rid := previous(body)) is not None:
                stored = await self.shared.load_response(rid)
                body = route.adapter.continued(body, rid, stored, _owner(caller))
            if caller is None:
                exchange = prepare(route, scope, body)
            else:
                admitted = await self.shared.admit(caller.config)  # its quotas; counts the request
                exchange = prepare(route, scope, body, CREDENTIAL_HEADERS)
        except ProxyError as exc:
            await reject(scope, send, exc, _face(table, path, route))
            return
        except Exception as exc:  # a bug, e.g. in an adapter's request(): a 500, not a dropped connection
            err, where = errors.internal(exc)
            log.error("internal error on %s %s: %s", scope["method"], path, where)
            await reject(scope, send, err, _face(table, path, route))
            return
        if exchange.call.kept is not None:
            send = self._keeping(send, exchange, _owner(caller))
        charging: _ChargeFirst | None = None
        if caller is not None:
            send = charging = _ChargeFirst(send, self.shared, caller.name, exchange, meter)
        forwarded = True
        try:
            if route.limits is None and (caller is None or caller.config.max_concurrent is None):
                await exchange(scope, receive, send)
            else:
                forwarded = await self._limited(scope, receive, send, exchange, caller)
        finally:
            if charging is not None and not charging.done:  # refused, failed, or the client left mid-answer
                # a request refused by its slots is not one of its requests_per_minute
                await self.shared.charge(charging.name, *_tokens(exchange, meter), None if forwarded else admitted)

    def _keeping(self, send: Any, exchange: Exchange, owner: str) -> Any:
        """`send`, storing a Responses answer before its last bytes go out (a client that continues
        it at once finds it)."""
        call = exchange.call
        kept = False

        async def keeping(message: dict[str, Any]) -> None:
            nonlocal kept
            if not kept and message["type"] == "http.response.body" and (record := call.kept(owner)) is not None:  # type: ignore[misc]
                kept = True
                try:
                    await self.shared.save_response(*record)
                except ProxyError as exc:  # --state-failure closed, store down: the answer still goes out
                    log.warning("response %s not stored: %s", record[0], exc.message)
            await send(message)

        return keeping

    async def _limited(self, scope: Any, receive: Any, send: Any, exchange: Exchange, caller: Caller | None) -> bool:
        """The exchange inside the key's and the route's slots (in that order), queued if need be;
        False when it never ran (refused by a limit or the store, or the client left the queue)."""
        route = exchange.route
        wanted: list[Limiter] = []
        if caller is not None and (k := caller.config).max_concurrent is not None:
            wanted.append(self.limiters.get("key", k.name, k.max_concurrent, k.queue, k.queue_timeout, k))
        if (lim := route.limits) is not None:
            wanted.append(self.limiters.get("route", route.name, lim.max_concurrent, lim.queue, lim.queue_timeout, lim))
        held: list[tuple[Limiter, Hold]] = []
        try:
            for limiter in wanted:
                try:
                    hold = await limiter.acquire(receive)
                except ProxyError as exc:  # 429 from the limit; 503 from a store down under --state-failure closed
                    await reject(scope, send, exc, route.face, rid=exchange.rid)
                    return False
                if hold is None:
                    observe.rejected(scope, errors.ClientLeftQueue("the client left while queued"), exchange.rid,
                                     face=None)  # fmt: skip
                    return False
                held.append((limiter, hold))
            await exchange(scope, receive, send)
            return True
        finally:
            for limiter, hold in held:
                limiter.release(hold)


class _ChargeFirst:
    """`send`, charging an answer's tokens to its key before the answer's last bytes go out: the
    key's next request, sent the moment this one ends (to any replica), finds them counted
    (README, "Quotas and usage per key": the request after the one that crossed a quota is refused).
    Only an answer the exchange relayed (its start line went through the meter) under 400; the rest
    (refusals, errors, a client gone mid-answer) is charged when the request ends."""

    __slots__ = ("send", "state", "name", "exchange", "meter", "done")

    def __init__(self, send: Any, state: State, name: str, exchange: Exchange, meter: observe.Meter) -> None:
        self.send = send
        self.state = state
        self.name = name
        self.exchange = exchange
        self.meter = meter
        self.done = False

    async def __call__(self, message: dict[str, Any]) -> None:
        if (not self.done and message["type"] == "http.response.body" and not message.get("more_body", False)
                and self.meter.status is not None and self.meter.status < 400):  # fmt: skip
            self.done = True  # before the await: charged once, whatever happens meanwhile
            await self.state.charge(self.name, *_tokens(self.exchange, self.meter))
        await self.send(message)


def _owner(caller: Caller | None) -> str:
    """Who may continue a stored response: the key's name ("" with keys off: anyone)."""
    return "" if caller is None else caller.name


ESTIMATED_BYTES_PER_TOKEN = 4  # an answer without `usage` is charged its request and answer bytes over this


def _tokens(exchange: Exchange, meter: observe.Meter) -> tuple[int, int]:
    """(prompt, completion) tokens to charge: the answer's `usage`, else an estimate from its bytes."""
    usage = exchange.call.usage
    if usage is not None:
        return usage
    if meter.status is None or meter.status >= 400:
        return 0, 0
    per = ESTIMATED_BYTES_PER_TOKEN
    return -(-len(meter.body or b"") // per), -(-meter.bytes_out // per)


async def read_body(scope: Any, receive: Any, limit: int) -> bytes | None:
    """The whole request body, refused past `limit` bytes (early when Content-Length says so)."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise errors.too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise errors.too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def reject(scope: Any, send: Any, exc: ProxyError, face: str = "openai", *, rid: bytes | None = None) -> None:
    """Answer a refused request in the path's error shape, and count it once."""
    rid = rid or headers.request_id(scope["headers"])
    observe.rejected(scope, exc, rid, face)
    await send_error(send, exc, rid, face)


def _face(table: RouteTable, path: str, route: Route | None) -> str:
    """The error shape of a refusal: the matched route's, else the path's (error path only)."""
    return route.face if route is not None else table.face(path)


@get("/healthz", include_in_schema=False, sync_to_thread=False)
def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@get("/readyz", include_in_schema=False, sync_to_thread=False)
def readyz(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    """Whether *this process* can serve: a route table with routes is loaded and the shared
    client is open. Routes whose every upstream is out by health checks are named in `down` but
    do not make the process unready (they answer their own 503 `no_healthy_upstream`): one dead
    model must not take every replica out of a Service, as Envoy's `/ready` and nginx's readiness
    speak for the proxy, not its backends. With `--ready-needs-upstreams` they do.

    It never answers "shutting down": on SIGTERM uvicorn closes the listener first
    (uvicorn/server.py `Server.shutdown`: `server.close()`, then the drain, then the lifespan's
    end), so a probe is refused from then on. A terminating pod leaves the Service's endpoints
    without it; the Deployment's preStop sleep delays SIGTERM until that has spread (deploy/README.md)."""
    state = request.app.state
    holder: TableHolder = state.holder
    routes = holder.current.routes
    down = [r.name for r in routes if r.pool.all_out()]
    why = ("no routes are loaded" if not routes
           else "the upstream client is not open" if getattr(state, "client", None) is None
           else "every upstream is down (health checks) on route(s) " + ", ".join(repr(d) for d in down)
           if down and getattr(state, "ready_needs_upstreams", False) else "")  # fmt: skip
    body: dict[str, Any] = {"status": "not ready" if why else "ok", "routes": len(routes)}
    if down:
        body["down"] = down
    if why:
        body["reason"] = why
    return Response(body, status_code=503 if why else 200)


@get("/v1/models", include_in_schema=False)
async def models(request: Request[Any, Any, Any]) -> Response[bytes]:
    """OpenAI's model list, from the route table (built with it, so usually one attribute read;
    glob-only routes add what their upstreams list: proxy/catalog.py); with keys on, only the
    models of routes the caller's key may use."""
    caller: Caller | None = request.scope.get(CALLER_KEY)  # type: ignore[call-overload]
    body = await catalog.models_json(request.app.state.holder.current, getattr(request.app.state, "client", None),
                                     None if caller is None else caller.may_use, request.app.state.engines)
    return Response(body, media_type="application/json")


@get("/v1/models/{model_id:path}", include_in_schema=False, sync_to_thread=False)
def model(request: Request[Any, Any, Any], model_id: str) -> Response[bytes]:
    """OpenAI's retrieve-model: a name some route serves, else 404 `model_not_found`.
    A path parameter: model ids carry slashes (`Qwen/Qwen2.5-7B-Instruct`)."""
    name = model_id.lstrip("/")
    caller: Caller | None = request.scope.get(CALLER_KEY)  # type: ignore[call-overload]
    entry = catalog.model_json(request.app.state.holder.current, name, None if caller is None else caller.may_use,
                               request.app.state.engines)  # fmt: skip
    if entry is None:
        raise errors.ModelNotFound(f"model {name!r} is not served by any route", param="model")
    return Response(entry, media_type="application/json")


@get("/v1/usage", include_in_schema=False)
async def usage(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    """A key's usage (current minute and day, totals); every key's for a key with `admin: true`."""
    caller: Caller | None = request.scope.get(CALLER_KEY)  # type: ignore[call-overload]
    holder: KeysHolder | None = request.app.state.key_holder
    if caller is None or holder is None:
        raise errors.NotFound("usage is counted per API key: serve with --keys to see it")
    keys = [c.config for c in holder.current.callers] if caller.config.admin else [caller.config]
    state: State = request.app.state.shared
    rows, shared = await state.usage([k.name for k in keys])
    return Response({"object": "list", "data": [u.as_json(k, shared) for u, k in zip(rows, keys)]})


@get("/metrics", include_in_schema=False, sync_to_thread=True)
def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Prometheus text format; with several workers, every worker's counts summed.

    In a thread: in multiprocess mode it reads one file per worker and metric.
    """
    routes = {r.name for r in request.app.state.holder.current.routes}
    body, content_type = observe.exposition(routes)
    # As a header, not `media_type`: Litestar appends its own `; charset=utf-8` to a text/*
    # media type, and prometheus-client's already has one.
    return Response(body, headers={"content-type": content_type})


def route_path(scope: Any) -> str:
    """The path as the client sent it (Litestar rewrites `scope["path"]`), minus a trailing `/`."""
    raw = scope.get("raw_path")
    path = raw.decode("latin-1").split("?", 1)[0] if raw else scope["path"]
    return path.rstrip("/") or "/"


def _openai_error(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """Every error the app raises, in the OpenAI shape (the only error renderer)."""
    if not isinstance(exc, ProxyError):
        if isinstance(exc, HTTPException):
            exc = errors.from_http_exception(
                exc.status_code, str(exc.detail), dict(exc.headers or {}), request.method,
                route_path(request.scope), getattr(request.app.state, "max_body_size", None),
            )
        else:
            exc, where = errors.internal(exc)
            log.error("internal error on %s %s: %s", request.method, route_path(request.scope), where)
    rid = headers.request_id(request.scope["headers"])
    observe.rejected(request.scope, exc, rid)  # type: ignore[arg-type]
    return Response(
        errors.render(exc),
        status_code=exc.status,
        media_type="application/json",
        headers={**exc.headers, "x-request-id": rid.decode("latin-1")},
    )


def app_from_env() -> Gateway:
    """uvicorn factory (`--workers N` needs an import string): settings come from `LLMPROXY_*`
    (proxy/settings.py)."""
    settings = WorkerSettings.from_env()
    observe.lean_log_records()
    if settings.otlp_endpoint:
        tracing.setup(settings.otlp_endpoint, content=settings.otlp_content)
    holder = TableHolder.load(settings.routes, last_good=os.environ.get(LAST_GOOD_ENV))
    keys = KeysHolder.load(settings.keys) if settings.keys else None
    raise_open_files()  # the CLI did it already (and logged it); not so under a bare `uvicorn --factory`
    app = create_app(holder, max_body_size=settings.max_body, reload=settings.reload, keys=keys,
                     cors=Cors.parse(settings.cors_origins), max_upstream_connections=settings.max_upstream_connections,
                     ready_needs_upstreams=settings.ready_needs_upstreams,
                     state=State(settings.state, failure=settings.state_failure, lease_ttl=settings.state_lease_ttl,
                                 responses_ttl=settings.responses_ttl, responses_max=settings.responses_max))
    # Move the start-up heap (Litestar, aiohttp, the route table) out of the collector's
    # reach: it is never garbage, and scanning it cost ~30 µs per request (`just bench`).
    gc.collect()
    gc.freeze()
    # A young collection every 700 allocations rescanned, and promoted to the old generations,
    # every object that lives from one relayed event to the next (a stream's read waiter, 250 ms),
    # and the old generations grow with the streams open: at 2 000 streams (`just bench --scale`)
    # gc callbacks counted 1.1 s of collections in ~5.7 s of proxy CPU; 0.09 s with this threshold.
    # Steady streaming makes no cyclic garbage (4 objects collected in that run), so collect
    # rarely; memory held by a cycle waits at most ~100k allocations.
    gc.set_threshold(GC_YOUNG, 20, 100)
    return app
