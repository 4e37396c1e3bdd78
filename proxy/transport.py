"""The only place the shared upstream client is made: one `aiohttp.ClientSession` per app.

Measured with `just bench` (passthrough, CPU per request at c=1 / c=32): the
httpx client over its aiohttp transport cost 455 / 314 µs, the same
aiohttp session used directly 218 / 136 µs. httpx's Request/Response models,
header objects and client machinery (auth, redirects, cookies, hooks) were the
difference, so the forwarder speaks aiohttp and nothing else does.
"""

from __future__ import annotations

from collections.abc import Callable

import aiohttp

ClientFactory = Callable[[], aiohttp.ClientSession]


def make_client() -> aiohttp.ClientSession:
    """One session per app (and per worker). Timeouts are set per request from the route."""
    # No pool limit: aiohttp parks a request past its limit (default 100, then 1000 here) until an
    # earlier stream ends, which under minute-long LLM streams is a silent wait of minutes. The one
    # cap is `--max-upstream-connections`, which refuses at once (descriptors.UpstreamSlots).
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30, ttl_dns_cache=10)
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
