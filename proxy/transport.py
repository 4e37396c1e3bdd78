"""The only place the shared upstream client is made: one `aiohttp.ClientSession` per app.

Measured with `just bench` (passthrough, CPU per request at c=1 / c=32): the
httpx client over its aiohttp transport cost 455 / 314 µs, the same
aiohttp session used directly 218 / 136 µs. httpx's Request/Response models,
header objects and client machinery (auth, redirects, cookies, hooks) were the
difference, so the forwarder speaks aiohttp and nothing else does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import aiohttp
from aiohttp.client_proto import ResponseHandler

ClientFactory = Callable[[], aiohttp.ClientSession]


class LazyReadTimeout(ResponseHandler):
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


def make_client() -> aiohttp.ClientSession:
    """One session per app (and per worker). Timeouts are set per request from the route."""
    # No pool limit: aiohttp parks a request past its limit (default 100, then 1000 here) until an
    # earlier stream ends, which under minute-long LLM streams is a silent wait of minutes. The one
    # cap is `--max-upstream-connections`, which refuses at once (capacity.UpstreamSlots).
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30, ttl_dns_cache=10)
    if _LAZY_OK and isinstance(getattr(connector, "_factory", None), functools.partial):
        connector._factory = functools.partial(LazyReadTimeout, loop=connector._loop)
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
