"""`balance_load:` each upstream's engine's own queue depth, for the balancer.

Proxy replicas (and the workers of `--workers N`) cannot see each other's
requests in flight; the engine sees them all. For each route with
`balance_load:` one task reads every upstream's load report every `interval`
seconds (where it is and which gauges: the dialect's `Facts.load`,
proxy/adapters/dialects.py, with the sources) and sets the member's
`reported`: what the engine holds beyond this process's own requests to it
(its count minus `busy` when the answer came, at least 0). The balancer adds
`reported` to `busy` (least-busy, the load guard), so this process's requests
are not counted twice and `spill_margin` still counts requests.

A scrape that fails (no answer within `timeout`, not a 200, none of the
gauges, more than `MAX_BYTES`) marks nothing down, which is health's to do:
the member's `reported` goes back to 0 until a scrape succeeds again, logged
once when it starts failing and once when it is back. Bounded: one task per
route, one scrape per upstream in flight at a time; a reload (a new table)
cancels the old table's tasks and starts the new one's.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Collection
from typing import TYPE_CHECKING

import aiohttp

from . import errors
from .adapters.dialects import FACTS, LoadReport, server_root
from .transport import send

if TYPE_CHECKING:
    from .config import BalanceLoad
    from .reload import TableHolder
    from .routes import Route, RouteTable
    from .upstreams import Upstream

log = logging.getLogger("llmproxy.engine_load")

MAX_TICK = 1.0  # seconds between looks at the table (a reload is noticed within this)
MAX_BYTES = 4 << 20  # a /metrics answer read at most (vLLM's is ~100 KiB)
# What to say when the report is not there: the servers that serve it only when asked to.
_ENABLE = {"llama.cpp": "start llama-server with --metrics", "sglang": "start SGLang with --enable-metrics"}


class Unreadable(Exception):
    """The load report could not be read (why: the message)."""


def queue_depth(text: bytes, gauges: Collection[bytes]) -> float | None:
    """The sum of the samples of `gauges` in Prometheus text (`name{labels} value [ts]`), over
    all their series; None when none is there. Names match whole (`vllm:num_requests_waiting`
    is not `vllm:num_requests_waiting_by_reason`)."""
    total: float | None = None
    for line in text.splitlines():
        if not line or line[:1] == b"#":
            continue
        brace, space = line.find(b"{"), line.find(b" ")
        end = space if brace < 0 or 0 <= space < brace else brace
        if end <= 0 or line[:end] not in gauges:
            continue
        rest = line[line.rfind(b"}") + 1:] if end == brace else line[end:]
        try:
            value = float(rest.split()[0])
        except (IndexError, ValueError):
            continue
        if math.isfinite(value):
            total = (total or 0.0) + value
    return total


class LoadWatch:
    """Runs one scraping task per route of the holder's current table with `balance_load:`."""

    def __init__(self, holder: TableHolder) -> None:
        self.holder = holder

    async def run(self, client: aiohttp.ClientSession) -> None:
        table: RouteTable | None = None
        tasks: list[asyncio.Task[None]] = []
        try:
            while True:
                current = self.holder.current
                if current is not table:
                    for t in tasks:
                        t.cancel()
                    loop = asyncio.get_running_loop()
                    tasks = [loop.create_task(watch(client, r, r.config.balance_load)) for r in current.routes
                             if r.config.balance_load is not None and r.pool.balancer is not None]
                    table = current
                await asyncio.sleep(MAX_TICK)
        finally:
            for t in tasks:
                t.cancel()


async def watch(client: aiohttp.ClientSession, route: Route, load: BalanceLoad) -> None:
    """Scrape every upstream of `route` every `load.interval` seconds until cancelled."""
    report = FACTS[route.config.dialect].load
    assert report is not None  # config validation: the dialect reports its load
    gauges = frozenset(g.encode() for g in report.gauges)
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in route.defaults]
    timeout = aiohttp.ClientTimeout(total=load.timeout)
    failing: set[Upstream] = set()
    members = route.pool.members
    while True:
        started = time.monotonic()
        await asyncio.gather(*(_scrape(client, route, m, report, gauges, headers, timeout, failing) for m in members))
        await asyncio.sleep(max(0.0, load.interval - (time.monotonic() - started)))


async def _scrape(client: aiohttp.ClientSession, route: Route, member: Upstream, report: LoadReport,
                  gauges: frozenset[bytes], headers: list[tuple[str, str]], timeout: aiohttp.ClientTimeout,
                  failing: set[Upstream]) -> None:
    dialect = route.config.dialect
    try:
        response = await send(client, "GET", server_root(member.url) + report.path, headers=headers,
                              timeout=timeout, allow_redirects=False)
        async with response:
            if response.status != 200:
                hint = f" ({_ENABLE[dialect]})" if dialect in _ENABLE else ""
                raise Unreadable(f"GET {report.path} answered {response.status}{hint}")
            body = await response.content.read(MAX_BYTES + 1)
            while len(body) <= MAX_BYTES and not response.content.at_eof():
                body += await response.content.read(MAX_BYTES + 1 - len(body))
        if len(body) > MAX_BYTES:
            raise Unreadable(f"GET {report.path} answered more than {MAX_BYTES >> 20} MiB")
        depth = queue_depth(body, gauges)
        if depth is None:
            raise Unreadable(f"GET {report.path} names none of {', '.join(sorted(report.gauges))} "
                             f"(is the server what `dialect: {dialect}` says?)")
    except Unreadable as exc:
        why = str(exc)
    except (aiohttp.ClientError, TimeoutError) as exc:
        why = errors.connect_failure(exc) or (
            f"GET {report.path} gave no answer within {timeout.total:g} s" if isinstance(exc, TimeoutError)
            else f"GET {report.path} failed: {type(exc).__name__}")
    except Exception:  # a bug must not end the scraping
        log.exception("reading the load of %s (route %r) failed unexpectedly", member.label, route.name)
        why = "unexpected error"
    else:
        member.reported = max(0, round(depth) - member.busy)
        if member in failing:
            failing.discard(member)
            log.info("load of upstream %s of route %r is read again", member.label, route.name)
        return
    member.reported = 0
    if member not in failing:
        failing.add(member)
        log.warning("load of upstream %s of route %r not read, its engine's other requests are not counted until "
                    "it is: %s", member.label, route.name, why)
