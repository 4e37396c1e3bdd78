"""The app factory: a thin ASGI gate in front of a Litestar app.

Litestar's runtime routes are add-only and cannot share a path+method, while
route files can be replaced at runtime and share a path by model; so routing
asks our immutable `RouteTable` (shared/LITESTAR.md B1). Paths in the table go
straight from the gate to the forwarder (LITESTAR.md B7, hatch 3: measured
~65 µs CPU less per request than a Litestar catch-all handler); Litestar serves
everything else: its lifespan, the proxy's own endpoints, and 404/405 in the
OpenAI shape.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from litestar import Litestar, Request, Response, get
from litestar.datastructures import State
from litestar.exceptions import HTTPException

from . import descriptors, errors, headers, observe
from .descriptors import UpstreamSlots, default_connections, raise_open_files
from .errors import ProxyError
from .forward import prepare, send_error
from .reload import POLL_INTERVAL, TableHolder
from .routes import RouteTable
from .transport import ClientFactory, make_client

DEFAULT_MAX_BODY = 10 * 2**20
GC_YOUNG = 100_000  # allocations between young-generation collections (CPython's default: 700)

log = logging.getLogger("llmproxy")


def create_app(
    table: RouteTable | TableHolder,
    *,
    client: ClientFactory = make_client,
    max_body_size: int = DEFAULT_MAX_BODY,
    reload: bool = False,
    poll_interval: float = POLL_INTERVAL,
    max_upstream_connections: int = 0,
) -> Gateway:
    """Build the ASGI app serving `table`. `client` makes the upstream session (tests swap it).

    `reload`: watch the holder's folder and swap in a new table on change (needs a
    `TableHolder` with a folder, e.g. `TableHolder.load(folder)`). A holder with a
    folder also reloads on SIGHUP. `max_upstream_connections`: upstream requests in flight
    past which a request is refused with a 503 (0: sized from the open-file limit).
    """
    holder = table if isinstance(table, TableHolder) else TableHolder(table)
    if reload and holder.folder is None:
        raise ValueError("reload=True needs a TableHolder that knows its routes folder")

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with client() as session, anyio.create_task_group() as tg:
            app.state.client = session
            if reload:
                tg.start_soon(holder.watch, poll_interval)
            tg.start_soon(descriptors.watch)
            try:
                with holder.reload_on_sighup():
                    yield
            finally:
                holder.stop()
                observe.worker_exit()
                tg.cancel_scope.cancel()

    app = Litestar(
        route_handlers=[healthz, readyz, models, metrics],
        lifespan=[lifespan],
        exception_handlers={ProxyError: _openai_error, HTTPException: _openai_error, 500: _openai_error},
        request_max_body_size=max_body_size,  # the one limit, also on the proxy's own endpoints
        openapi_config=None,
        logging_config=None,
        debug=False,
    )
    app.state.holder = holder
    app.state.max_body_size = max_body_size  # named in the 413 message
    app.state.slots = UpstreamSlots(max_upstream_connections or default_connections())
    return Gateway(app, holder, max_body_size)


class Gateway:
    """The ASGI entry point: paths in the route table go to the forwarder, the rest to Litestar."""

    __slots__ = ("litestar", "holder", "max_body_size")

    def __init__(self, litestar: Litestar, holder: TableHolder, max_body_size: int) -> None:
        self.litestar = litestar
        self.holder = holder
        self.max_body_size = max_body_size

    @property
    def state(self) -> State:
        return self.litestar.state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            table = self.holder.current  # one read: the whole request uses this table
            path = route_path(scope)
            if table.has_path(path):
                scope["app"] = self.litestar  # where the Exchange finds the shared client
                await self._proxy(scope, receive, send, table, path)
                return
        await self.litestar(scope, receive, send)

    async def _proxy(self, scope: Any, receive: Any, send: Any, table: RouteTable, path: str) -> None:
        meter = observe.Meter(scope)  # the clock starts; `reject` finds it in the scope
        try:
            body = await read_body(scope, receive, self.max_body_size)
            if body is None:
                return  # the client left while sending
            meter.body = body
            route, meter.model = table.match(scope["method"], path, body)
            meter.route = route
            exchange = prepare(route, scope, body)
        except ProxyError as exc:
            await reject(scope, send, exc)
            return
        except Exception as exc:  # a bug, e.g. in an adapter's request(): a 500, not a dropped connection
            err, where = errors.internal(exc)
            log.error("internal error on %s %s: %s", scope["method"], path, where)
            await reject(scope, send, err)
            return
        await exchange(scope, receive, send)


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


async def reject(scope: Any, send: Any, exc: ProxyError) -> None:
    """Answer a refused request in the OpenAI shape, and count it once."""
    rid = headers.request_id(scope["headers"])
    observe.rejected(scope, exc, rid)
    await send_error(send, exc, rid)


@get("/healthz", include_in_schema=False, sync_to_thread=False)
def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@get("/readyz", include_in_schema=False, sync_to_thread=False)
def readyz(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    """A route table is loaded and the shared client is open."""
    holder: TableHolder = request.app.state.holder
    ready = bool(holder.current.routes) and getattr(request.app.state, "client", None) is not None
    return Response({"status": "ok" if ready else "not ready", "routes": len(holder.current.routes)}, status_code=200 if ready else 503)


@get("/v1/models", include_in_schema=False, sync_to_thread=False)
def models(request: Request[Any, Any, Any]) -> Response[bytes]:
    """OpenAI's model list, from the route table (built with it, so this is one attribute read)."""
    return Response(request.app.state.holder.current.models_json, media_type="application/json")


@get("/metrics", include_in_schema=False, sync_to_thread=True)
def metrics() -> Response[bytes]:
    """Prometheus text format; with several workers, every worker's counts summed.

    In a thread: in multiprocess mode it reads one file per worker and metric.
    """
    body, content_type = observe.exposition()
    return Response(body, media_type=content_type)


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
    """uvicorn factory (`--workers N` needs an import string): settings come from `LLMPROXY_*`."""
    import os

    observe.lean_log_records()
    folder = os.environ.get("LLMPROXY_ROUTES", "routes.d")
    holder = TableHolder.load(folder)
    max_body = int(os.environ.get("LLMPROXY_MAX_BODY", DEFAULT_MAX_BODY))
    reload = os.environ.get("LLMPROXY_RELOAD", "") not in ("", "0")
    raise_open_files()  # the CLI did it already (and logged it); not so under a bare `uvicorn --factory`
    max_upstream = int(os.environ.get("LLMPROXY_MAX_UPSTREAM_CONNECTIONS", "0"))
    app = create_app(holder, max_body_size=max_body, reload=reload, max_upstream_connections=max_upstream)
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
