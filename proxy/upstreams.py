"""A route's upstream list: which base URL gets the next request, and which ones are down.

Round-robin rather than least-outstanding: it costs one counter step per
request and no accounting that every exit path of the forwarder (client gone,
upstream reset, shutdown) would have to undo; with `--workers N` each worker
only sees its own share anyway, so "least outstanding" would be per-worker
guesswork; and LLM servers (vLLM, llama.cpp) queue and batch internally.

Health is passive: a connect failure marks an upstream down for `DOWN_FOR`
seconds, during which the others get its turn; after that a real request
probes it again. Nothing else marks an upstream down: once a request reached
it, its answer (even a 5xx) is its own to give.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

log = logging.getLogger("llmproxy.upstreams")

DOWN_FOR = 10.0  # seconds an upstream sits out after a connect failure


class Upstream:
    """One base URL of a route, with its passive health."""

    __slots__ = ("url", "label", "down_until", "reason")

    def __init__(self, url: str) -> None:
        self.url = url
        self.label = upstream_label(url)  # for logs and metrics, made once
        self.down_until = 0.0  # monotonic time; 0: up
        self.reason = ""

    def target(self, query: bytes = b"") -> str:
        """The URL to send to, with the client's query string."""
        return f"{self.url}?{query.decode('latin-1')}" if query else self.url


def upstream_label(url: str) -> str:
    """`scheme://host:port/path`: no user-info (a password), no query (a key)."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
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

    __slots__ = ("route", "members", "_turn")

    def __init__(self, route: str, urls: Sequence[str]) -> None:
        self.route = route
        self.members = tuple(Upstream(u) for u in urls)
        self._turn = 0

    def pick(self) -> Upstream:
        """The upstream for a new request: the next one in turn that is not sitting out."""
        members = self.members
        n = len(members)
        if n == 1:
            return members[0]
        start = self._turn
        self._turn = (start + 1) % n
        now = time.monotonic()
        for k in range(n):
            m = members[(start + k) % n]
            if m.down_until <= now:
                return m
        return members[start]  # all down: try anyway rather than refuse; it may be back

    def next_after(self, tried: Sequence[Upstream]) -> Upstream | None:
        """Failover: the next upstream not tried yet for this request, healthy ones first."""
        members = self.members
        n = len(members)
        first = members.index(tried[0])
        rest = [m for k in range(1, n) if (m := members[(first + k) % n]) not in tried]
        now = time.monotonic()
        for m in rest:
            if m.down_until <= now:
                return m
        return rest[0] if rest else None

    def failed(self, member: Upstream, reason: str) -> None:
        """`member` refused or did not answer the connect: let it sit out `DOWN_FOR` seconds."""
        now = time.monotonic()
        logged = member.down_until > now  # concurrent failures: one line per sit-out
        was_up = member.down_until == 0.0
        member.down_until = now + DOWN_FOR
        member.reason = reason
        if not logged:
            log.warning(
                "upstream %s of route %r %s for %gs: %s",
                member.url, self.route, "marked down" if was_up else "still down", DOWN_FOR, reason,
            )

    def succeeded(self, member: Upstream) -> None:
        """`member` answered. On the hot path: one attribute test when all is well."""
        if member.down_until:
            member.down_until = 0.0
            member.reason = ""
            log.info("upstream %s of route %r is back up", member.url, self.route)
