"""The header policy, as pure functions over ASGI-style `(name, value)` byte pairs.

- Hop-by-hop headers (RFC 9110 §7.6.1: Connection and the names it lists,
  Keep-Alive, Proxy-*, TE, Trailer, Transfer-Encoding, Upgrade) never cross,
  in either direction.
- A route's `default_headers` win over the client's, case-insensitively: a
  client `authorization:` never survives beside a default `Authorization:`.
- `X-Request-ID` is kept when sane or created, sent upstream and echoed back.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Sequence

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Set by the proxy for the upstream: the client's values would be wrong there.
_REQUEST_OWN = frozenset({b"host", b"content-length", b"expect", b"x-request-id"})
_SANE_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")
# A random per-process prefix and a counter: unique across workers and replicas, and no
# `getrandom` syscall per request (it showed in the profile at ~2 %).
_ID_PREFIX = os.urandom(10).hex()
_ID_COUNTER = itertools.count(1)


def normalize(headers: dict[str, str]) -> Headers:
    """Route config headers -> lower-case byte pairs, ready for `to_upstream`."""
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


def _connection_listed(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Names listed in `Connection:` are hop-by-hop for this message only."""
    listed = [
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    ]
    return frozenset(t for t in listed if t)


def request_id(client: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The client's `X-Request-ID` when it is a short token, else a fresh random one."""
    for name, value in client:
        if name == b"x-request-id" and _SANE_ID.match(value):
            return value
    return f"{_ID_PREFIX}{next(_ID_COUNTER):012x}".encode()


def to_upstream(
    client: Sequence[tuple[bytes, bytes]],
    defaults: Sequence[tuple[bytes, bytes]],
    *,
    rid: bytes,
    client_ip: str | None = None,
    scheme: str = "http",
    drop: frozenset[bytes] = frozenset(),
) -> Headers:
    """Headers for the upstream request: client's minus hop-by-hop, then defaults (which win).

    `client` names are lower-case (ASGI guarantees it); `defaults` come from `normalize`.
    `drop` names further client headers the adapter replaces (e.g. accept-encoding).
    """
    skip = HOP_BY_HOP | _REQUEST_OWN | drop | {n for n, _ in defaults} | {b"x-forwarded-proto"}
    listed = _connection_listed(client)
    if listed:
        skip = skip | listed
    out: Headers = []
    forwarded_for = b""
    for name, value in client:
        if name in skip:
            continue
        if name == b"x-forwarded-for":
            forwarded_for = value
            continue
        out.append((name, value))
    out.append((b"x-request-id", rid))
    out.append((b"x-forwarded-proto", scheme.encode()))
    if client_ip:
        ip = client_ip.encode()
        forwarded_for = forwarded_for + b", " + ip if forwarded_for else ip
    if forwarded_for:
        out.append((b"x-forwarded-for", forwarded_for))
    if defaults:
        names = {n for n, _ in defaults}
        out = [(n, v) for n, v in out if n not in names]
        out.extend(defaults)
    return out


def to_client(
    upstream: Iterable[tuple[bytes, bytes]],
    *,
    rid: bytes,
    drop: frozenset[bytes] = frozenset(),
) -> Headers:
    """Headers for the client response: upstream's minus hop-by-hop and `drop`, plus `x-request-id`.

    `drop` is for bodies the proxy rewrites (content-length, content-type...).
    """
    upstream = [(n.lower(), v) for n, v in upstream]
    skip = HOP_BY_HOP | _connection_listed(upstream) | drop | {b"x-request-id"}
    out = [(n, v) for n, v in upstream if n not in skip]
    out.append((b"x-request-id", rid))
    return out
