"""The app factory: Litestar with one catch-all over our own route table.

Litestar's runtime routes are add-only and cannot share a path+method, while
route files can be replaced at runtime and share a path by model; so one
catch-all handler asks our immutable `RouteTable` instead (shared/LITESTAR.md B1).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
from litestar import Litestar, Request, Response, get, route
from litestar.exceptions import HTTPException
from litestar.types import ASGIApp

from . import errors, headers, observe
from .errors import ProxyError
from .forward import prepare
from .reload import POLL_INTERVAL, TableHolder
from .routes import RouteTable
from .transport import make_client

log = logging.getLogger("llmproxy.app")

DEFAULT_MAX_BODY = 10 * 2**20
_PROXY_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]

log = logging.getLogger("llmproxy")


def create_app(
    table: RouteTable | TableHolder,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    max_body_size: int = DEFAULT_MAX_BODY,
    reload: bool = False,
    poll_interval: float = POLL_INTERVAL,
) -> Litestar:
    """Build the ASGI app serving `table`. `transport` replaces the network (tests).

    `reload`: watch the holder's folder and swap in a new table on change (needs a
    `TableHolder` with a folder, e.g. `TableHolder.load(folder)`). A holder with a
    folder also reloads on SIGHUP.
    """
    holder = table if isinstance(table, TableHolder) else TableHolder(table)
    if reload and holder.folder is None:
        raise ValueError("reload=True needs a TableHolder that knows its routes folder")

    @route(
        ["/", "/{path:path}"],
        http_method=_PROXY_METHODS,
        name="proxy",
        request_max_body_size=max_body_size,
        include_in_schema=False,
    )
    async def proxy(request: Request[Any, Any, Any]) -> ASGIApp:
        scope = request.scope
        meter = observe.Meter(scope)  # the clock starts; `_openai_error` finds it in the scope
        table = holder.current  # one read: the whole request uses this table
        meter.body = body = await request.body()
        meter.route = entry = table.match(request.method, _route_path(scope), body)
        return prepare(entry, scope, body)  # type: ignore[arg-type]

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with make_client(transport) as client, anyio.create_task_group() as tg:
            app.state.client = client
            if reload:
                tg.start_soon(holder.watch, poll_interval)
            try:
                with holder.reload_on_sighup():
                    yield
            finally:
                holder.stop()
                observe.worker_exit()
                tg.cancel_scope.cancel()

    app = Litestar(
        route_handlers=[proxy, healthz, readyz, models, metrics],
        lifespan=[lifespan],
        exception_handlers={ProxyError: _openai_error, HTTPException: _openai_error, 500: _openai_error},
        request_max_body_size=max_body_size,
        openapi_config=None,
        logging_config=None,
        debug=False,
    )
    app.state.holder = holder
    app.state.max_body_size = max_body_size  # named in the 413 message
    return app


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


def _route_path(scope: Any) -> str:
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
                _route_path(request.scope), getattr(request.app.state, "max_body_size", None),
            )
        else:
            exc, where = errors.internal(exc)
            log.error("internal error on %s %s: %s", request.method, _route_path(request.scope), where)
    rid = headers.request_id(request.scope["headers"])
    observe.rejected(request.scope, exc, rid)  # type: ignore[arg-type]
    return Response(
        errors.render(exc),
        status_code=exc.status,
        media_type="application/json",
        headers={**exc.headers, "x-request-id": rid.decode("latin-1")},
    )


def app_from_env() -> Litestar:
    """uvicorn factory (`--workers N` needs an import string): settings come from `LLMPROXY_*`."""
    import os

    observe.lean_log_records()
    folder = os.environ.get("LLMPROXY_ROUTES", "routes.d")
    holder = TableHolder.load(folder)
    max_body = int(os.environ.get("LLMPROXY_MAX_BODY", DEFAULT_MAX_BODY))
    reload = os.environ.get("LLMPROXY_RELOAD", "") not in ("", "0")
    return create_app(holder, max_body_size=max_body, reload=reload)
