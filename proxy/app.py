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

import httpx
from litestar import Litestar, Request, Response, get, route
from litestar.exceptions import HTTPException
from litestar.types import ASGIApp

from . import errors, headers, observe
from .errors import ProxyError
from .forward import prepare
from .reload import TableHolder
from .routes import RouteTable
from .transport import make_client

DEFAULT_MAX_BODY = 10 * 2**20
_PROXY_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]

log = logging.getLogger("llmproxy")


def create_app(
    table: RouteTable | TableHolder,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    max_body_size: int = DEFAULT_MAX_BODY,
) -> Litestar:
    """Build the ASGI app serving `table`. `transport` replaces the network (tests)."""
    holder = table if isinstance(table, TableHolder) else TableHolder(table)

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
        async with make_client(transport) as client:
            app.state.client = client
            try:
                yield
            finally:
                observe.worker_exit()

    app = Litestar(
        route_handlers=[proxy, healthz, readyz, metrics],
        lifespan=[lifespan],
        exception_handlers={ProxyError: _openai_error, HTTPException: _openai_error, 500: _openai_error},
        request_max_body_size=max_body_size,
        openapi_config=None,
        logging_config=None,
        debug=False,
    )
    app.state.holder = holder
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
            status = exc.status_code
            code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(status)
            kind = errors.BadRequest if status < 500 else errors.ProxyError
            err = kind(str(exc.detail), code=code, headers=dict(exc.headers or {}))
            err.status = status
        else:
            log.error("internal error on %s %s", request.method, _route_path(request.scope), exc_info=exc)
            err = errors.ProxyError("internal error in the proxy", code="internal_error")
        exc = err
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
    holder = TableHolder(RouteTable.from_dir(folder), folder)
    max_body = int(os.environ.get("LLMPROXY_MAX_BODY", DEFAULT_MAX_BODY))
    return create_app(holder, max_body_size=max_body)
