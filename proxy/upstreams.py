"""A route's upstream list: which base URL gets the next request, and which ones are down.

Round-robin by default: one counter step per request and no accounting.
`balance:` chooses otherwise (least-busy, prefix affinity, sessions:
proxy/balance.py), for LLM servers whose prefix caches make replicas unequal.

Without `health:`, health is passive: a connect failure marks an upstream
down for `DOWN_FOR` seconds, during which the others get its turn; after that
a real request probes it again. Nothing else marks an upstream down: once a
request reached it, its answer (even a 5xx) is its own to give.

With `health:` (proxy/health.py runs the checks), an upstream is out after
`unhealthy_after` consecutive failures, of checks or of real requests'
connects, and back after `healthy_after` passed checks; while it is out its
`down_until` is infinite, so the balancer's one test covers both kinds. When
every upstream of such a route is out, `pick` fails fast with 503.

A skipped upstream's turn goes to the next one up, and the turn then resumes
after the one picked: with one of three down, the other two share its
traffic evenly (resuming at the fixed next slot gave the first one up after
the down one twice the share of the other).

With `balance:` (proxy/balance.py) the route's `Balancer` chooses instead, and
then each member counts its requests in flight (`busy`): the one place that
ends an exchange (`Exchange.__call__`'s `finally`) gives the count back. A
member marked down forgets the prompts it served. With `balance_load:`
(proxy/engine_load.py) each member's `reported` adds what its engine says it
holds beyond this process's own requests.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from . import observe
from .errors import NoHealthyUpstream

if TYPE_CHECKING:
    from .balance import Balancer
    from .config import Balance, Health

log = logging.getLogger("llmproxy.upstreams")

DOWN_FOR = 10.0  # seconds an upstream sits out after a connect failure


class Upstream:
    """One base URL of a route, with its passive health."""

    __slots__ = ("url", "label", "origin", "down_until", "reason", "fails", "passes", "next_check", "busy", "reported",
                 "epoch")

    def __init__(self, url: str) -> None:
        self.url = url
        self.label = upstream_label(url)  # for logs and metrics, made once
        parts = urlsplit(url)
        self.origin = f"{parts.scheme}://{parts.netloc}"  # health paths are taken from here
        self.down_until = 0.0  # monotonic time; 0: up; inf: out until health checks pass
        self.reason = ""
        self.fails = 0  # consecutive failures (with `health:`)
        self.passes = 0  # consecutive passed checks while out
        self.next_check = 0.0  # monotonic time of the next health check
        self.busy = 0  # requests in flight here (counted only on routes with `balance:`)
        # `balance_load:` the requests its engine reported holding beyond this process's own (engine_load.py)
        self.reported = 0
        self.epoch = 0  # `balance: prefix` ignores the prompts it remembers of an older epoch

    def forget(self) -> None:
        """Marked down: its engine may come back with an empty cache."""
        self.epoch += 1

    def moved(self, url: str) -> None:
        """The server behind it now listens at `url` (a route's `engine:` started on a new port):
        a fresh start, its passive health forgotten."""
        self.url = url  # `label` stays: the URL as written, so restarts add no metric series
        parts = urlsplit(url)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.down_until = 0.0
        self.reason = ""
        self.fails = 0

    def target(self, query: bytes = b"") -> str:
        """The URL to send to, with the client's query string."""
        return f"{self.url}?{query.decode('latin-1')}" if query else self.url


def upstream_label(url: str) -> str:
    """`scheme://host:port/path`: no user-info (a password), no query (a key)."""
    parts = urlsplit(url)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # an `engine:` route's `${PORT}`, kept as written: one label whatever port a start picks
        port = ":" + parts.netloc.rpartition(":")[2]
    return f"{parts.scheme}://{parts.hostname}{port}{parts.path}"


def models_url(upstream: str) -> str:
    """The `GET /v1/models` of the server behind an upstream URL: the path up to `/v1`, else the
    origin. vLLM (`vllm/entrypoints/openai/api_server.py`), llama.cpp's server
    (`tools/server/server.cpp`) and SGLang (`python/sglang/srt/entrypoints/http_server.py`) serve it."""
    parts = urlsplit(upstream)
    path = parts.path
    base = path[: path.index("/v1/")] if "/v1/" in path else path[:-3] if path.endswith("/v1") else ""
    return f"{parts.scheme}://{parts.netloc}{base}/v1/models"


class Pool:
    """The upstreams of one route, in file order."""

    __slots__ = ("route", "members", "health", "balancer", "_turn")

    def __init__(self, route: str, urls: Sequence[str], health: Health | None = None,
                 balance: Balance | None = None) -> None:  # fmt: skip
        self.route = route
        self.members = tuple(Upstream(u) for u in urls)
        self.health = health
        self._turn = 0
        self.balancer: Balancer | None = None  # None: round-robin by `pick`, nothing counted
        if balance is not None and (balance.policy != "round-robin" or balance.session is not None):
            from .balance import Balancer

            self.balancer = Balancer(self, balance)

    def pick(self) -> Upstream:
        """The upstream for a new request: the next one in turn that is not sitting out.

        Raises `NoHealthyUpstream` when health checks have every upstream out.
        """
        members = self.members
        n = len(members)
        if n == 1 and self.health is None:
            return members[0]
        start = self._turn
        now = time.monotonic()
        for k in range(n):
            i = (start + k) % n
            m = members[i]
            if m.down_until <= now:
                self._turn = (i + 1) % n if n > 1 else 0
                return m
        if self.health is not None:
            raise self.all_out_error()
        self._turn = (start + 1) % n
        return members[start]  # all down: try anyway rather than refuse; it may be back

    def least_busy(self, among: Sequence[Upstream]) -> Upstream:
        """The member of `among` with the fewest requests in flight (with `balance_load:`, plus those
        its engine reported from elsewhere); ties go in turn (`turned` moves the turn past the one
        chosen), so an idle fleet is not served by its first member."""
        members = self.members
        n = len(members)
        start = self._turn
        best: Upstream | None = None
        for k in range(n):
            i = (start + k) % n
            m = members[i]
            if m in among and (best is None or m.busy + m.reported < best.busy + best.reported):
                best = m
        assert best is not None
        return best

    def turned(self, member: Upstream) -> None:
        """`member` was chosen as the least busy: the next tie starts after it."""
        self._turn = (self.members.index(member) + 1) % len(self.members)

    def next_after(self, tried: Sequence[Upstream]) -> Upstream | None:
        """Failover: the next upstream not tried yet for this request, healthy ones first
        (only healthy ones when health checks run)."""
        members = self.members
        n = len(members)
        first = members.index(tried[0])
        rest = [m for k in range(1, n) if (m := members[(first + k) % n]) not in tried]
        now = time.monotonic()
        for m in rest:
            if m.down_until <= now:
                return m
        return rest[0] if rest and self.health is None else None

    def all_out(self) -> bool:
        """Every upstream is out by health checks (`/readyz` names such routes)."""
        return self.health is not None and all(m.down_until == math.inf for m in self.members)

    def all_out_error(self) -> Exception:
        why = "; ".join(f"{m.label}: {m.reason or 'down'}" for m in self.members)
        return NoHealthyUpstream(f"every upstream of route {self.route!r} is down (health checks): {why}")

    def failed(self, member: Upstream, reason: str) -> None:
        """`member` refused or did not answer the connect: let it sit out `DOWN_FOR` seconds,
        or, with health checks, count it towards `unhealthy_after`."""
        if self.health is not None:
            self.checked(member, False, reason)
            return
        now = time.monotonic()
        logged = member.down_until > now  # concurrent failures: one line per sit-out
        was_up = member.down_until == 0.0
        member.down_until = now + DOWN_FOR
        member.reason = reason
        if was_up:
            member.forget()
            self._publish(member, False)
        if not logged:
            log.warning(
                "upstream %s of route %r %s for %gs: %s",
                member.url, self.route, "marked down" if was_up else "still down", DOWN_FOR, reason,
            )

    def succeeded(self, member: Upstream) -> None:
        """`member` answered. On the hot path: two attribute tests when all is well."""
        if member.fails:
            member.fails = 0
        if member.down_until and member.down_until != math.inf:  # out by health checks: theirs to end
            member.down_until = 0.0
            member.reason = ""
            self._publish(member, True)
            log.info("upstream %s of route %r is back up", member.url, self.route)

    def checked(self, member: Upstream, ok: bool, reason: str = "") -> None:
        """A health check's result (or, with `ok` False, a real request's failed connect)."""
        health = self.health
        assert health is not None
        if ok:
            member.fails = 0
            if member.down_until:
                member.passes += 1
                if member.passes >= health.healthy_after:
                    member.down_until = 0.0
                    member.passes = 0
                    member.reason = ""
                    self._publish(member, True)
                    log.info("upstream %s of route %r is back up (health check passed)", member.url, self.route)
            return
        member.passes = 0
        member.fails += 1
        member.reason = reason
        if member.down_until != math.inf and member.fails >= health.unhealthy_after:
            member.down_until = math.inf
            member.forget()
            self._publish(member, False)
            log.warning("upstream %s of route %r is out after %d failure(s) in a row, until its health checks "
                        "pass: %s", member.url, self.route, member.fails, reason)

    def publish(self) -> None:
        """Set every member's `llmproxy_upstream_up` gauge (a new table starts serving)."""
        for m in self.members:
            self._publish(m, not m.down_until)

    def _publish(self, member: Upstream, up: bool) -> None:
        observe.upstream_state(self.route, member.label, up)
