"""`GET /v1/models`: the table's concrete names, plus what glob-only routes' upstreams serve.

A route whose `models` are all globs (`models: ["Qwen/*"]`) names no model a client
could pick; its upstream knows which ones it serves. So the list asks each such
upstream's own `GET /v1/models` (the route's default headers, a short timeout, the
answer cached for `TTL` seconds) and lists the ids that match the route's globs and
that the table would really route to it. Routes with `upstream_model` are skipped:
their upstream's ids are not names clients send. A table without glob-only routes is
answered from the bytes built with it, with no network at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec

from . import served
from .errors import ProxyError
from .routes import Route, RouteTable, _ModelEntry, _ModelList, is_glob

if TYPE_CHECKING:
    from .engines import Engines

log = logging.getLogger("llmproxy.catalog")

TTL = 60.0  # seconds an upstream's model list is reused
TIMEOUT = 2.0  # seconds to wait for an upstream's list; the answer never waits longer


_cache: dict[str, Any] = {"table": None, "at": 0.0, "found": []}  # the ids each learner's upstream listed


def learners(table: RouteTable) -> list[Route]:
    """Routes whose names can only be learned from their upstream: glob-only routes, and
    fallback routes with `upstream_model: auto` (listed under the model their upstream serves,
    which is a name they accept, instead of their route name)."""
    return [r for r in table.routes if (r.models and all(is_glob(g) for g in r.models) and not r.config.upstream_model)
            or (not r.models and r.config.upstream_model == served.AUTO)]


class _EngineEntry(msgspec.Struct):
    """A model whose route starts its engine on demand: listed whether it runs or not, with
    `status.value` as llama.cpp's router mode says it (its `GET /models`, tools/server/README.md):
    `loaded` (running), `loading` (starting), `unloaded`."""

    id: str
    owned_by: str
    created: int
    status: dict[str, str]
    object: str = "model"


async def models_json(table: RouteTable, session: aiohttp.ClientSession | None,
                      may_use: Callable[[str], bool] | None = None, engines: Engines | None = None) -> bytes:
    """The list for one caller (`may_use`: the routes its key may use; None: all)."""
    routes = learners(table)
    on_demand = engines is not None and any(r.engine is not None for r in table.routes)
    if (not routes or session is None) and not on_demand:
        return table.models_json if may_use is None else table.models_json_for(may_use)
    now = time.monotonic()
    if routes and session is not None and (_cache["table"] is not table or now - _cache["at"] >= TTL):
        found = await asyncio.gather(*(_ids(session, r) for r in routes))
        _cache.update(table=table, at=now, found=found)
    entries: dict[str, Any] = table.model_entries(may_use)
    for route, ids in zip(routes, _cache["found"] if _cache["table"] is table else ()):
        if may_use is not None and not may_use(route.name):
            continue
        if ids and not route.models and entries.get(route.name, None) is not None \
                and entries[route.name].owned_by == route.name:
            del entries[route.name]  # a fallback that learnt its model: listed under that name instead
        for name in ids:
            if name not in entries and _routes_to(table, route, name):
                entries[name] = _ModelEntry(id=name, owned_by=route.name, created=table.created)
    if on_demand:
        assert engines is not None
        return _with_status(table, entries, engines)
    return msgspec.json.encode(_ModelList(data=list(entries.values())))


def model_json(table: RouteTable, name: str, may_use: Callable[[str], bool] | None, engines: Engines) -> bytes | None:
    """`GET /v1/models/{name}`: the table's entry, with its engine's state when its route has one."""
    entry = table.model(name, may_use)
    if entry is None or not any(r.engine is not None for r in table.routes):
        return entry
    doc = msgspec.json.decode(entry, type=_ModelEntry)
    if not any(r.name == doc.owned_by and r.engine is not None for r in table.routes):
        return entry
    return msgspec.json.encode(_EngineEntry(id=doc.id, owned_by=doc.owned_by, created=doc.created,
                                            status={"value": engines.status(doc.owned_by) or "unloaded"}))


def _with_status(table: RouteTable, entries: dict[str, Any], engines: Engines) -> bytes:
    """Every name an engine route serves, running or not, with its engine's state."""
    started = {r.name for r in table.routes if r.engine is not None}
    data = [
        _EngineEntry(id=e.id, owned_by=e.owned_by, created=e.created,
                     status={"value": engines.status(e.owned_by) or "unloaded"})
        if e.owned_by in started else e
        for e in entries.values()
    ]  # fmt: skip
    return msgspec.json.encode(_ModelList(data=data))


def _routes_to(table: RouteTable, route: Route, name: str) -> bool:
    """Whether a request for `name` on the route's path would be served by `route` (an
    earlier file's glob may win it)."""
    body = msgspec.json.encode({"model": name})
    try:
        return all(table.match(m, route.config.path, body)[0] is route for m in route.config.methods)
    except Exception:  # noqa: BLE001 - a name no route serves on that path
        return False


async def _ids(session: aiohttp.ClientSession, route: Route) -> list[str]:
    """The names the route's upstream lists that the route would list: those its globs match,
    or, for a fallback with `upstream_model: auto`, the one model it serves."""
    try:
        # `pool.members[0]`: an engine route's upstream, on the port of its engine's current run.
        ids = await served.listed(session, route.pool.members[0].url, route, timeout=TIMEOUT)
    except (ProxyError, aiohttp.ClientError, TimeoutError) as exc:
        log.info("route %r: its upstream's models are not listed (%s)", route.name,
                 exc.message if isinstance(exc, ProxyError) else type(exc).__name__)  # fmt: skip
        return []
    if route.config.upstream_model == served.AUTO:
        return list(ids) if len(ids) == 1 else []
    return [i for i in ids if route.serves(i)]
