"""The only place the shared upstream client is made: one `aiohttp.ClientSession` per app.

`send` is `session.request` that knows whether the connection came from the pool and whether any
byte of answer came back on it, and so can send again a request that a server's closing of an idle
keep-alive connection swallowed. The forwarder's requests and the dialects' lookups go through it
(health probes are GETs, which aiohttp itself sends again in that case: `IDEMPOTENT_METHODS`).

Measured with `just bench` (passthrough, CPU per request at c=1 / c=32): the
httpx client over its aiohttp transport cost 455 / 314 µs, the same
aiohttp session used directly 218 / 136 µs. httpx's Request/Response models,
header objects and client machinery (auth, redirects, cookies, hooks) were the
difference, so the forwarder speaks aiohttp and nothing else does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler

ClientFactory = Callable[[], aiohttp.ClientSession]


class Heard(ResponseHandler):
    """aiohttp's connection protocol, noting whether the request in flight got any byte back.

    One more Python call per received chunk: 75 ns (timeit, this VM), against the 31-39 µs a
    relayed event costs at the least (README "Performance")."""

    heard = False  # reset by `Connector` when the connection is taken from the pool

    def data_received(self, data: bytes) -> None:
        if data:  # (aiohttp calls it empty itself, to resume decompressing)
            self.heard = True
        super().data_received(data)


class LazyReadTimeout(Heard):
    """aiohttp's connection protocol with the same `sock_read` deadline, kept by one timer per
    `timeout.read` seconds instead of one per received chunk.

    aiohttp cancels its read timer and makes a new one on every `data_received`: under
    thousands of streams that is a TimerHandle per relayed event, each living until the next
    event, which the cyclic GC then scans and promotes (`just bench --profile --scale`). Here a
    chunk only notes the loop time; the one pending timer, when it fires, either times out (no
    read for `timeout` seconds, exactly aiohttp's deadline) or re-arms itself for the rest.
    Pausing, resuming and dropping the timer stay aiohttp's (`_drop_timeout`).
    """

    _last_read = 0.0
    _armed_at = 0.0  # when the pending timer fires

    def _reschedule_timeout(self) -> None:
        timeout = self._read_timeout
        if not timeout:
            self._drop_timeout()
            return
        self._last_read = now = self._loop.time()
        deadline = now + timeout
        handle = self._read_timeout_handle
        # A pending timer set later than this deadline (a shorter timeout.read on a pooled
        # connection than its previous route's) would fire too late: set it again.
        if handle is None or self._armed_at > deadline:
            if handle is not None:
                handle.cancel()
            self._arm(deadline)

    def _arm(self, deadline: float) -> None:
        self._armed_at = deadline
        self._read_timeout_handle = self._loop.call_at(deadline, self._check_read_timeout)

    def _check_read_timeout(self) -> None:
        self._read_timeout_handle = None
        timeout = self._read_timeout
        if not timeout:
            return
        deadline = self._last_read + timeout
        if deadline > self._loop.time():
            self._arm(deadline)
        else:
            self._on_read_timeout()


# The hooks LazyReadTimeout relies on are aiohttp internals (3.10 to 3.14 at least); should a
# release drop one, the stock protocol is used instead (correct, one timer per chunk).
_LAZY_OK = all(hasattr(ResponseHandler, a) for a in ("_reschedule_timeout", "_drop_timeout", "_on_read_timeout"))


class Attempt:
    """One send, as the connector saw it: `pooled` is the protocol of the keep-alive connection it
    reused (None: a new connection); `fresh` makes the connector open a new one whatever the pool holds."""

    __slots__ = ("fresh", "pooled")

    def __init__(self) -> None:
        self.fresh = False
        self.pooled: Any = None


# The send in progress in this task (set by `send` around `session.request`).
ATTEMPT: ContextVar[Attempt | None] = ContextVar("llmproxy_attempt", default=None)


class Connector(aiohttp.TCPConnector):
    """aiohttp's connector, telling the current `Attempt` whether its connection came from the pool."""

    async def _get(self, key: Any, traces: Any) -> Any:
        attempt = ATTEMPT.get()
        if attempt is not None and attempt.fresh:
            return None  # a resend: never on a pooled connection, which may be as stale as the last
        conn = await super()._get(key, traces)
        if attempt is not None and conn is not None and isinstance(conn.protocol, Heard):
            conn.protocol.heard = False
            attempt.pooled = conn.protocol  # (only our protocol can tell whether an answer began)
        return conn


# `_get` is an aiohttp internal (3.10 to 3.14 at least); without it nothing is known about reuse,
# and nothing is resent.
_REUSE_OK = hasattr(aiohttp.TCPConnector, "_get")


def unanswered_on_reused(attempt: Attempt, exc: BaseException) -> bool:
    """Did `exc` end a send on a pooled connection before any byte of answer came back?

    Then the server had closed that idle connection as the request went out (llama-server closes
    after every streamed answer although its head said keep-alive; any server may at the end of its
    keep-alive timeout), and it never processed the request: resending it once on a new connection is
    safe even for a POST, as browsers do (Chromium `HttpNetworkTransaction::ShouldResendRequest`: a
    reused socket, no response bytes; RFC 9112 §9.3.1). A byte of answer, or a new connection that
    fails, is never resent.
    """
    proto = attempt.pooled
    return (
        proto is not None
        and not proto.heard
        and isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError))
        and not isinstance(exc, aiohttp.ClientConnectorError)
    )


async def send(session: aiohttp.ClientSession, method: str, url: str, *,
               on_resend: Callable[[BaseException], None] | None = None, **kw: Any) -> aiohttp.ClientResponse:
    """`session.request(method, url, **kw)`, sent once more on a new connection when a pooled one
    swallowed it (`unanswered_on_reused`); `on_resend` hears of that (a log line, a metric)."""
    attempt = Attempt()
    token = ATTEMPT.set(attempt)
    try:
        try:
            return await session.request(method, url, **kw)
        except aiohttp.ClientError as exc:
            if not unanswered_on_reused(attempt, exc):
                raise
            if on_resend is not None:
                on_resend(exc)
        attempt.fresh, attempt.pooled = True, None
        return await session.request(method, url, **kw)
    finally:
        ATTEMPT.reset(token)


def make_client() -> aiohttp.ClientSession:
    """One session per app (and per worker). Timeouts are set per request from the route."""
    # No pool limit: aiohttp parks a request past its limit (default 100, then 1000 here) until an
    # earlier stream ends, which under minute-long LLM streams is a silent wait of minutes. The one
    # cap is `--max-upstream-connections`, which refuses at once (capacity.UpstreamSlots).
    factory = Connector if _REUSE_OK else aiohttp.TCPConnector
    connector = factory(limit=0, limit_per_host=0, keepalive_timeout=30, ttl_dns_cache=10)
    if isinstance(getattr(connector, "_factory", None), functools.partial):
        protocol = LazyReadTimeout if _LAZY_OK else Heard
        connector._factory = functools.partial(protocol, loop=connector._loop)
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,  # passthrough relays bytes as they came, Content-Encoding included
        cookie_jar=aiohttp.DummyCookieJar(),  # a proxy keeps no cookies between clients
        trust_env=False,
        # Transparent: no User-Agent, Accept, Accept-Encoding or Content-Type of aiohttp's own
        # (an unasked gzip would reach passthrough clients still compressed).
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        timeout=aiohttp.ClientTimeout(total=None),
    )


def route_timeout(connect: float, read: float, pool: float) -> aiohttp.ClientTimeout:
    """A route's `timeout:` as aiohttp's, built once per route.

    `sock_connect` bounds the TCP/TLS connect, `sock_read` the wait for each read
    (the next token of a stream); `connect` also bounds waiting for a free pooled
    connection. aiohttp has no write timeout: request bodies are small and buffered.
    """
    return aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=read, connect=connect + pool)
