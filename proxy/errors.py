"""Every error the proxy reports, and the one place they become OpenAI-shaped bytes.

The client always gets `{"error": {"message", "type", "param", "code"}}`; httpx
exceptions are mapped here and nowhere else. Messages name the route, never a
header value (default headers carry secrets).
"""

from __future__ import annotations

import msgspec


class ConfigError(Exception):
    """A route file is wrong. The message reads `FILE[:LINE]: field: reason`."""


class ProxyError(Exception):
    """An error answered to the client with `status` and an OpenAI error body."""

    status: int = 500
    type: str = "proxy_error"
    code: str | int | None = None
    kind: str | None = None  # the upstream failure, as counted in `llmproxy_upstream_errors_total`

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UpstreamUnreachable(ProxyError):
    status = 502
    type = "upstream_error"
    code = "upstream_unreachable"
    kind = "unreachable"  # refused, DNS, TLS, any failure to connect


class UpstreamTimeout(ProxyError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"
    kind = "timeout"


class UpstreamBroken(ProxyError):
    """The upstream failed after the response began (reset, stall, bad event)."""

    status = 502
    type = "upstream_error"
    code = "upstream_stream_error"
    kind = "reset"


class UpstreamStatus(ProxyError):
    """The upstream answered non-2xx: same status, its OpenAI error kept if it sent one."""

    type = "upstream_error"
    kind = "non_2xx"

    def __init__(self, status: int, body: bytes, route: str) -> None:
        self.status = status
        self.passthrough = _openai_error(body)
        text = body.decode("utf-8", "replace").strip() or "(empty body)"
        if len(text) > 500:
            text = text[:500] + "…"
        super().__init__(f"upstream of route {route!r} answered {status}: {text}", code=status)


class _Error(msgspec.Struct, omit_defaults=False):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class _Envelope(msgspec.Struct):
    error: _Error


def _openai_error(body: bytes) -> bytes | None:
    """Return `body` when it already is an OpenAI error object, else None."""
    try:
        doc = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict) and "message" in doc["error"]:
        return body
    return None


def render(exc: ProxyError) -> bytes:
    """The JSON body for `exc`."""
    passthrough = getattr(exc, "passthrough", None)
    if passthrough is not None:
        return passthrough
    return msgspec.json.encode(_Envelope(_Error(exc.message, exc.type, exc.param, exc.code)))


def sse_event(exc: ProxyError) -> bytes:
    """`exc` as one SSE event: the only way to report a fault once a stream has begun."""
    return b"data: " + render(exc) + b"\n\n"


def from_httpx(exc: Exception, route: str) -> ProxyError:
    """Map a transport failure to 502/504. The only place httpx exceptions are read.

    The aiohttp-backed transport maps every `ClientConnectionError` (refused
    included) to httpx's `ConnectTimeout`, so the aiohttp cause decides first.
    """
    import httpx

    cause = exc.__cause__
    if cause is not None:
        import aiohttp

        if isinstance(cause, (aiohttp.ServerTimeoutError, TimeoutError)):
            return UpstreamTimeout(f"upstream of route {route!r} timed out")
        if isinstance(cause, aiohttp.ClientConnectorError):
            return UpstreamUnreachable(f"upstream of route {route!r} is unreachable: {_reason(cause)}")
        if isinstance(cause, (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
            return UpstreamBroken(f"upstream of route {route!r} closed the connection: {_reason(cause)}")
        if isinstance(cause, aiohttp.ClientError):
            return UpstreamUnreachable(f"upstream of route {route!r} failed: {_reason(cause)}")
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"upstream of route {route!r} timed out")
    if isinstance(exc, (httpx.ConnectError, httpx.UnsupportedProtocol, httpx.ProxyError)):
        return UpstreamUnreachable(f"upstream of route {route!r} is unreachable: {_reason(exc)}")
    if isinstance(exc, (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError)):
        return UpstreamBroken(f"upstream of route {route!r} closed the connection: {_reason(exc)}")
    return UpstreamUnreachable(f"upstream of route {route!r} failed: {_reason(exc)}")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
