"""Active upstream health checks for routes with `health:` (the balancer's side is in upstreams.py).

One task per app checks every upstream of every such route of the current
table: `GET <origin><path>` every `interval` seconds, healthy on a 2xx within
`timeout`. The servers llmproxy fronts all answer one: vLLM `GET /health`
(vllm/entrypoints/openai/api_server.py: 200, or 503 once its engine is dead),
llama.cpp `GET /health` (tools/server/server.cpp: 503 "Loading model" until
ready, then 200), SGLang `GET /health` (python/sglang/srt/entrypoints/http_server.py).
The route's `default_headers` are sent along, for servers behind an
authenticating gateway.

A reload builds new `Upstream` objects; their state is carried over from the
previous table's by (route name, URL), so a dead upstream does not get a fresh
chance at every route edit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import aiohttp

from . import errors

if TYPE_CHECKING:
    from .reload import TableHolder
    from .routes import Route, RouteTable
    from .upstreams import Upstream

log = logging.getLogger("llmproxy.health")

MAX_TICK = 1.0  # seconds between looks at the table (a reload is noticed within this)


class Monitor:
    """Runs the checks of the holder's current table until cancelled."""

    def __init__(self, holder: TableHolder) -> None:
        self.holder = holder
        self._table: RouteTable | None = None
        self._probes: set[asyncio.Task[None]] = set()

    async def run(self, client: aiohttp.ClientSession) -> None:
        try:
            while True:
                table = self.holder.current
                if table is not self._table:
                    self._adopt(table)
                await asyncio.sleep(self._tick(client, table))
        finally:
            for t in self._probes:
                t.cancel()

    def _tick(self, client: aiohttp.ClientSession, table: RouteTable) -> float:
        """Start the checks that are due; the seconds until the next one (MAX_TICK at most)."""
        now = time.monotonic()
        wait = MAX_TICK
        for route in table.routes:
            h = route.pool.health
            if h is None:
                continue
            for m in route.pool.members:
                if m.next_check <= now:
                    m.next_check = now + h.interval
                    task = asyncio.get_running_loop().create_task(self._probe(client, route, m))
                    self._probes.add(task)
                    task.add_done_callback(self._probes.discard)
                wait = min(wait, m.next_check - now)
        return max(wait, 0.01)

    def _adopt(self, table: RouteTable) -> None:
        old = self._table
        if old is not None:
            before = {(r.name, m.url): m for r in old.routes for m in r.pool.members}
            for r in table.routes:
                for m in r.pool.members:
                    prev = before.get((r.name, m.url))
                    if prev is not None:
                        m.down_until, m.reason, m.fails, m.passes = prev.down_until, prev.reason, prev.fails, prev.passes
                        m.next_check = prev.next_check
        for r in table.routes:
            r.pool.publish()
        self._table = table

    async def _probe(self, client: aiohttp.ClientSession, route: Route, member: Upstream) -> None:
        h = route.pool.health
        assert h is not None
        url = member.origin + h.path
        try:
            async with client.get(
                url, headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in route.defaults],
                timeout=aiohttp.ClientTimeout(total=h.timeout), allow_redirects=False,
            ) as response:  # fmt: skip
                ok = 200 <= response.status < 300
                reason = "" if ok else f"GET {h.path} answered {response.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok = False
            reason = errors.connect_failure(exc) or (
                f"GET {h.path} gave no answer within {h.timeout:g} s" if isinstance(exc, TimeoutError)
                else f"GET {h.path} failed: {type(exc).__name__}"
            )
        except Exception:  # a bug must not end the checks
            log.exception("health check of %s (route %r) failed unexpectedly", member.label, route.name)
            return
        route.pool.checked(member, ok, reason)

