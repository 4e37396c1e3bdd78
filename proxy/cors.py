"""CORS for browser clients (`serve --cors-origins`), off by default.

A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`, from
an allowed origin) is answered here, before the keys check: browsers never
send credentials on a preflight (Fetch standard, "CORS-preflight request").
Every other answer to an allowed origin, errors and streams included, gets
`Access-Control-Allow-Origin`; answers to other origins get nothing, and any
`OPTIONS` that is not such a preflight is an ordinary request (auth, 405...).

`Access-Control-Allow-Headers` names the headers the official SDKs send
(`Authorization`, `x-api-key`, `anthropic-version`, ...) and echoes what the
preflight asks for besides: a `*` would not cover `Authorization` (Fetch
standard, "CORS-safelisted request-header" / wildcard note), and the SDKs add
`x-stainless-*` headers that vary by version.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

ALLOWED_METHODS = b"GET, POST, OPTIONS"
BASE_HEADERS = b"authorization, content-type, x-api-key, anthropic-version, anthropic-beta, x-request-id"
EXPOSED = b"x-request-id, retry-after"
MAX_AGE = b"600"
_BASE_NAMES = tuple(BASE_HEADERS.split(b", "))


def allowed_headers(requested: bytes) -> bytes:
    """The base names plus what the preflight asks for, each once (a browser's request names
    `authorization` too)."""
    names = dict.fromkeys(_BASE_NAMES)
    for name in requested.lower().split(b","):
        if name.strip():
            names.setdefault(name.strip())
    return b", ".join(names)


class Cors:
    """The allowed origins; `*` allows any."""

    __slots__ = ("any", "origins")

    def __init__(self, origins: Iterable[str]) -> None:
        cleaned = [o.strip().rstrip("/") for o in origins if o.strip()]
        self.any = "*" in cleaned
        self.origins = frozenset(o.encode("latin-1") for o in cleaned if o != "*")

    @classmethod
    def parse(cls, text: str | None) -> Cors | None:
        """`--cors-origins "https://a.example,https://b.example"` (or `*`); None when off."""
        if not text or not text.strip():
            return None
        return cls(text.split(","))

    def allowed(self, origin: bytes | None) -> bool:
        return origin is not None and (self.any or origin in self.origins)

    def _allow_origin(self, origin: bytes) -> list[tuple[bytes, bytes]]:
        if self.any:
            return [(b"access-control-allow-origin", b"*")]
        return [(b"access-control-allow-origin", origin), (b"vary", b"origin")]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any, app: Any) -> None:
        """Serve `scope` through `app`, with CORS headers for an allowed origin."""
        origin = None
        request_method = None
        request_headers = b""
        for name, value in scope["headers"]:
            if name == b"origin":
                origin = value
            elif name == b"access-control-request-method":
                request_method = value
            elif name == b"access-control-request-headers":
                request_headers = value
        if not self.allowed(origin):
            await app(scope, receive, send)
            return
        assert origin is not None
        if scope["method"] == "OPTIONS" and request_method is not None:
            allow_headers = allowed_headers(request_headers)
            await send({"type": "http.response.start", "status": 204, "headers": [
                *self._allow_origin(origin),
                (b"access-control-allow-methods", ALLOWED_METHODS),
                (b"access-control-allow-headers", allow_headers),
                (b"access-control-max-age", MAX_AGE),
                (b"content-length", b"0"),
            ]})  # fmt: skip
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        extra = [*self._allow_origin(origin), (b"access-control-expose-headers", EXPOSED)]

        async def with_cors(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await app(scope, receive, with_cors)
