"""Every error the proxy reports, and the one place they become bytes in the client's shape.

An OpenAI client (chat, Responses, passthrough) gets `{"error": {"message", "type",
"param", "code"}}`, an Anthropic one (Messages) `{"type": "error", "error": {"type",
"message"}}` (`render`, `sse_event`);
the upstream client's (aiohttp) exceptions are mapped here and nowhere else. Messages name the route and the upstream host, never a
header value: default headers carry secrets, and upstream error bodies are
scrubbed of them before they are passed on.
"""

from __future__ import annotations

import errno
import re
import resource
import traceback
from urllib.parse import urlsplit
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from .routes import Route

MESSAGE_CAP = 500  # characters of a foreign (non-OpenAI) error body kept in our message


class ConfigError(Exception):
    """A route file is wrong. The message reads `FILE[:LINE]: field: reason`."""


class BadUpstreamEvent(Exception):
    """Raised by an adapter when the upstream sent something it cannot read (a malformed SSE
    event, a body that is not the promised JSON). Not a `ProxyError`: like a transport
    exception it is a fact about the upstream, and `from_upstream` names the route."""


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
    """No connection: refused, DNS, TLS."""

    status = 502
    type = "upstream_error"
    code = "upstream_unreachable"
    kind = "unreachable"  # refused, DNS, TLS, any failure to connect


class UpstreamTimeout(ProxyError):
    """The route's `timeout.connect` or `timeout.read` ran out."""

    status = 504
    type = "upstream_error"
    code = "upstream_timeout"
    kind = "timeout"


class UpstreamBroken(ProxyError):
    """The upstream accepted the request, then dropped the connection or sent something unreadable."""

    status = 502
    type = "upstream_error"
    code = "upstream_broken"
    kind = "reset"


class ContextUnknown(UpstreamBroken):
    """`max_tokens: auto` could not learn the context remainder from the upstream's tokenizer endpoint."""

    code = "context_unknown"
    kind = "non_2xx"


class ShuttingDown(ProxyError):
    """The grace period ran out while this response was still streaming."""

    status = 503
    type = "server_error"
    code = "shutting_down"


class ProcessLimit(ProxyError):
    """This process is at one of its own limits (capacity.py): `--max-upstream-connections`
    (`upstream_connections_exhausted`) or its open files (`out_of_file_descriptors`)."""

    status = 503
    type = "server_error"


class InternalError(ProxyError):
    status = 500
    type = "server_error"
    code = "internal_error"


class Unauthorized(ProxyError):
    """No key, or not one of the keys file's (OpenAI answers a wrong key the same way)."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(ProxyError):
    """A valid key on a route its `routes:` globs do not name."""

    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class StateUnavailable(ProxyError):
    """`--state-failure closed` and the shared state store does not answer (proxy/state.py)."""

    status = 503
    type = "server_error"
    code = "state_store_unavailable"


class ResponseNotFound(NotFound):
    """`previous_response_id` names no stored response this key may continue (OpenAI's 404)."""

    code = "previous_response_not_found"


class Overloaded(ProxyError):
    """A `limits:` queue was full, or the wait in it ran out. OpenAI's own 429 carries
    type `requests` and code `rate_limit_exceeded`."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"


class NoHealthyUpstream(ProxyError):
    """Every upstream of a route with `health:` is out: fail fast rather than wait on a dead one."""

    status = 503
    type = "upstream_error"
    code = "no_healthy_upstream"
    kind = "unreachable"


class EngineStartFailed(ProxyError):
    """The route's `engine:` did not come up: its command failed or exited, its health check did not
    pass within `start_timeout`, or it is backing off after repeated crashes (`Retry-After`). The
    message ends with the last lines the engine wrote (it is the operator's own program)."""

    status = 503
    type = "upstream_error"
    code = "engine_start_failed"


class ClientLeftQueue(ProxyError):
    """Only recorded (499), never sent: the client left while waiting for a slot."""

    status = 499
    type = "client_closed"
    code = "client_left_queue"


class TemplateFailed(ProxyError):
    """The route's chat template broke for a reason of its own (a bug, not its `raise_exception`):
    the route's fault, not the client's, so a 500 that names the route."""

    status = 500
    type = "server_error"
    code = "template_failed"


# Upstream statuses that mean "the request was wrong" (a prompt over the context, an unknown model):
# clients' SDKs expect OpenAI's `invalid_request_error` for them (Anthropic's on a Messages route).
_CLIENT_STATUSES = frozenset({400, 404, 413, 422})


class UpstreamStatus(ProxyError):
    """The upstream answered non-2xx: same status; its OpenAI error passed on, anything else wrapped.

    vLLM (`ErrorInfo.code: int`), llama.cpp (`format_error_response`) and SGLang answer with an
    integer `code` and their own `type` (`BadRequestError`); OpenAI's API has `code` a string or
    null and `type: invalid_request_error` on a 400. Such bodies are re-told in OpenAI's terms
    (the upstream's message, its string `code` or null, its `param`); a body already in those
    terms passes on untouched."""

    type = "upstream_error"
    kind = "non_2xx"

    def __init__(self, status: int, body: bytes, route: Route, retry_after: str | None = None) -> None:
        self.status = status
        if status in _CLIENT_STATUSES:
            self.type = "invalid_request_error"
        body = scrub_bytes(body, secrets_of(route))
        doc = _json_or_none(body)
        err = doc.get("error") if isinstance(doc, dict) else None
        fields = err if isinstance(err, dict) else doc if isinstance(doc, dict) else {}
        code, param = fields.get("code"), fields.get("param")
        code = code if isinstance(code, str) else None
        fine = isinstance(err, dict) and (err.get("code") is None or isinstance(err.get("code"), str)) and (
            self.type == "upstream_error" or err.get("type") == self.type)
        self.passthrough = body if fine and _is_openai_error(body) else None
        text = _readable(body)
        super().__init__(
            f"upstream of route {route.name!r} answered {status}: {text}",
            code=code,
            param=param if isinstance(param, str) else None,
            headers={"retry-after": retry_after} if retry_after else None,
        )


class _Error(msgspec.Struct, omit_defaults=False):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class _Envelope(msgspec.Struct):
    error: _Error


# --- faces: each API's clients read errors in their own shape ------------------------------
# `face` is the error shape of the route's adapter: "openai" (chat, Responses, passthrough) or
# "anthropic" (Messages), as the adapter table says (adapters.ADAPTERS). The gate and the
# forwarder pass it here; nothing else renders.


# Anthropic's error types by status (docs.anthropic.com/en/api/errors; the `anthropic` SDK's
# `_client.py` `_make_status_error` maps the same statuses to its exception classes).
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                    403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
                    413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 502: "api_error",
                    503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}


class _AnthropicError(msgspec.Struct):
    type: str
    message: str


class _AnthropicEnvelope(msgspec.Struct):
    error: _AnthropicError
    type: str = "error"


def anthropic_type(status: int) -> str:
    """The Anthropic `error.type` for an HTTP status."""
    return _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def render(exc: ProxyError, face: str = "openai") -> bytes:
    """The JSON body for `exc`, in the shape the route's clients read."""
    if face == "anthropic":
        # An upstream's own (OpenAI-shaped) error is re-told: Anthropic clients read only their shape.
        return msgspec.json.encode(_AnthropicEnvelope(_AnthropicError(anthropic_type(exc.status), exc.message)))
    passthrough = getattr(exc, "passthrough", None)
    if passthrough is not None:
        return passthrough
    return msgspec.json.encode(_Envelope(_Error(exc.message, exc.type, exc.param, exc.code)))


def sse_event(exc: ProxyError, face: str = "openai") -> bytes:
    """`exc` as one SSE event: the only way to report a fault once a stream has begun.

    The official `openai` client raises `APIError(message)` on an event carrying `error`; the
    `anthropic` client raises on `event: error` (`anthropic/_streaming.py`) and skips events
    without an `event:` line.
    """
    if face == "anthropic":
        return b"event: error\ndata: " + render(exc, face) + b"\n\n"
    return b"data: " + render(exc) + b"\n\n"


# --- client input -----------------------------------------------------------------------

_AT = re.compile(r"^(.*) - at `\$\.?([^`]*)`$")
_FIELD = re.compile(r"(missing required|contains unknown) field `([^`]+)`")
# RFC 9110 §5.5: field values carry no CTL but HTAB (aiohttp enforces exactly this set).
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def invalid_field(exc: msgspec.ValidationError) -> tuple[str, str, str]:
    """msgspec's "REASON - at `$.a.b`" as `(path, reason, kind)`, the one reader of that text.

    A missing or unknown field is named in the path ("timeout.reed"); `kind` is
    "missing", "unknown" or "invalid". `path` is "" when msgspec names no place.
    """
    text = str(exc)
    path, reason = "", text
    m = _AT.match(text)
    if m:
        reason, path = m.group(1), m.group(2)
    f = _FIELD.search(reason)
    if f:
        path = f"{path}.{f.group(2)}" if path else f.group(2)
        if f.group(1) == "missing required":
            return path, "required field is missing", "missing"
        return path, "unknown field", "unknown"
    return path, reason, "invalid"


def bad_body(exc: msgspec.DecodeError) -> BadRequest:
    """A body msgspec could not decode -> 400; `param` names the field when msgspec says which.

    For adapters and routing: `except msgspec.DecodeError as exc: raise errors.bad_body(exc) from None`.
    """
    if not isinstance(exc, msgspec.ValidationError):
        return BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json")
    path, reason, kind = invalid_field(exc)
    if kind == "missing":
        return BadRequest(f"{path}: {reason}", param=path, code="missing_field")
    if not path:
        return BadRequest(f"request body: {reason}", code="invalid_type")
    return BadRequest(f"{path}: {reason}", param=path, code="invalid_type")


def bad_header(headers: Iterable[tuple[str | bytes, str | bytes]]) -> BadRequest | None:
    """The 400 for a header value carrying CR, LF or another control character, if any.

    Called only on the error path: the HTTP servers we run under (httptools, h11) refuse such
    requests before the app sees them, and aiohttp refuses to send them upstream.
    """
    for name, value in headers:
        raw = value.encode("latin-1") if isinstance(value, str) else value
        if _CONTROL.search(raw):
            label = name.decode("latin-1") if isinstance(name, bytes) else name
            return BadRequest(
                f"header {label!r} has a value with CR, LF or another control character",
                param=label.lower(),
                code="invalid_header",
            )
    return None


def too_large(limit: int | None, headers: dict[str, str] | None = None) -> PayloadTooLarge:
    """The 413 for a body over the limit (`--max-body-size`)."""
    return PayloadTooLarge(f"request body is larger than the limit{f' of {limit} bytes' if limit else ''}", headers=headers)


def from_http_exception(status: int, detail: str, headers: dict[str, str] | None, method: str, path: str,
                        max_body_size: int | None = None) -> ProxyError:
    """Litestar's own HTTP exceptions (router 404/405, 413 from the body limit) as ours."""
    if status == 413:
        return too_large(max_body_size, headers)
    if status == 405:
        return MethodNotAllowed(f"method {method} is not allowed on {path}", headers=headers)
    if status == 404:
        return NotFound(f"no route for path {path}", headers=headers)
    kind = BadRequest if status < 500 else ProxyError
    err = kind(detail, headers=headers)
    err.status = status
    return err


def internal(exc: BaseException) -> tuple[InternalError, str]:
    """A bug in the proxy: a generic 500 for the client, and a log line naming the type and the
    place but not the message (exception messages may quote a header value)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:  # anyio task groups wrap
        exc = exc.exceptions[0]
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return InternalError("internal error in the proxy"), f"{type(exc).__name__}{where}"


# --- upstream failures ------------------------------------------------------------------


def from_upstream(exc: Exception, route: Route, url: str) -> ProxyError:
    """Map an upstream failure (aiohttp's, a timeout, or a `BadUpstreamEvent`) to 502/504,
    naming the route and host. The messages are built here rather than copied from
    aiohttp, whose texts quote the whole URL, query string included."""
    import aiohttp

    name = route.name
    where = _host(url)
    if isinstance(exc, BadUpstreamEvent):
        return UpstreamBroken(f"upstream of route {name!r} sent an unreadable response: {_scrub(str(exc), route)}")
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return _read_timeout(route, where)
    if isinstance(exc, TimeoutError):  # ConnectionTimeoutError, and waiting for a pooled connection
        return _connect_timeout(route, where)
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        host = urlsplit(url).hostname
        return UpstreamUnreachable(f"upstream of route {name!r} is unreachable: cannot resolve host {host!r}")
    if isinstance(exc, aiohttp.ClientSSLError):
        reason = _scrub(_os_reason(exc.os_error), route)
        return UpstreamUnreachable(f"upstream of route {name!r} is unreachable: TLS with {where} failed: {reason}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        if (ours := from_exhaustion(exc, name)) is not None:
            return ours  # the proxy's own shortage, not the upstream's fault
        if isinstance(os_error, ConnectionRefusedError):
            return UpstreamUnreachable(f"upstream of route {name!r} is unreachable: connection refused by {where}")
        reason = _scrub(_os_reason(os_error), route)
        return UpstreamUnreachable(f"upstream of route {name!r} is unreachable: cannot connect to {where}: {reason}")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return UpstreamBroken(f"upstream of route {name!r} ({where}) closed the connection without answering")
    if isinstance(exc, (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
        return UpstreamBroken(f"upstream of route {name!r} ({where}) closed the connection mid-response")
    if isinstance(exc, (aiohttp.InvalidURL, aiohttp.ClientResponseError)):
        return UpstreamUnreachable(f"upstream of route {name!r} is unreachable: {type(exc).__name__}")
    return UpstreamBroken(f"upstream of route {name!r} ({where}) failed: {type(exc).__name__}")


def from_exhaustion(exc: BaseException, route: str) -> ProcessLimit | None:
    """The 503 for an upstream connect that failed for want of descriptors, else None: the
    proxy's own shortage (capacity.py sizes the limit to avoid it), not the upstream's fault."""
    os_error = getattr(exc, "os_error", exc)
    if not isinstance(os_error, OSError) or os_error.errno not in (errno.EMFILE, errno.ENFILE):
        return None
    which = "this process's open-file limit" if os_error.errno == errno.EMFILE else "the system's file table"
    return ProcessLimit(
        f"the proxy ran out of file descriptors ({which}, soft RLIMIT_NOFILE {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}) connecting upstream "
        f"for route {route!r}: raise the limit (ulimit -n, LimitNOFILE=, the container's nofile) or lower "
        "--max-upstream-connections",
        code="out_of_file_descriptors",
        headers={"retry-after": "1"},
    )


def context_unknown(route: str, why: str | BaseException) -> ContextUnknown:
    """`max_tokens: auto` failed: what went wrong with the lookup, and the setting that avoids it."""
    if isinstance(why, BaseException):
        why = f"{type(why).__name__}: {why}" if str(why) else type(why).__name__
    return ContextUnknown(
        f"route {route!r} could not learn how much of the model's context is left for the answer ({why}); "
        "set `body.defaults.max_tokens` to a number in the route file to send that instead")


def connect_failure(exc: Exception) -> str | None:
    """Why the connection to the upstream could not be made, or None if it was made.

    Only these failures are safe to repeat elsewhere: no byte of the request left
    the proxy. A reset or timeout after connecting is not (the upstream may be
    generating already).
    """
    import aiohttp

    if isinstance(exc, aiohttp.ClientConnectorError):
        err = exc.os_error or exc
        if getattr(err, "errno", None) in (errno.EMFILE, errno.ENFILE):
            return None  # out of descriptors here: another upstream would fail the same, and this one is fine
        return f"{type(err).__name__}: {_os_reason(err)}"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "connect timed out"
    return None


def _read_timeout(route: Route, where: str) -> UpstreamTimeout:
    return UpstreamTimeout(
        f"upstream of route {route.name!r} ({where}) sent nothing for {route.timeout['read']:g} s (timeout.read)"
    )


def _connect_timeout(route: Route, where: str) -> UpstreamTimeout:
    return UpstreamTimeout(
        f"upstream of route {route.name!r}: no connection to {where} within "
        f"{route.timeout['connect']:g} s (timeout.connect)"
    )


def _host(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


def _os_reason(exc: BaseException) -> str:
    strerror = getattr(exc, "strerror", None)
    return str(strerror or exc).strip() or type(exc).__name__


# --- secrets ----------------------------------------------------------------------------

# Authorization scheme words (one table: config drops a default header that is only one of these).
AUTH_SCHEMES = frozenset({"bearer", "basic", "token", "digest", "apikey", "api-key"})


def secrets_of(route: Route) -> tuple[bytes, ...]:
    """Values that must never reach a client or a log: every default header value, and the
    credential after an auth scheme word (config refuses passwords in upstream URLs).
    Computed on the error path only."""
    found: set[bytes] = set()
    for _, value in route.defaults:
        found.add(value)
        scheme, _, credential = value.partition(b" ")
        if credential and scheme.lower().decode("latin-1") in AUTH_SCHEMES:
            found.add(credential.strip())
    # Tiny values (a bare "Bearer", an org id of 2 letters) would shred messages, not hide secrets.
    found = {s for s in found if len(s) >= 4 and s.lower().decode("latin-1") not in AUTH_SCHEMES}
    return tuple(sorted(found, key=len, reverse=True))


def scrub_bytes(data: bytes, secrets: Sequence[bytes]) -> bytes:
    for secret in secrets:
        if secret in data:
            data = data.replace(secret, b"***")
    return data


def _scrub(text: str, route: Route) -> str:
    return scrub_bytes(text.encode("utf-8", "replace"), secrets_of(route)).decode("utf-8", "replace").strip()


# --- foreign error bodies ---------------------------------------------------------------

_TAG = re.compile(r"<(script|style)\b.*?</\1\s*>|<[^>]*>", re.S | re.I)
_SPACE = re.compile(r"\s+")


def _is_openai_error(body: bytes) -> bool:
    doc = _json_or_none(body)
    return isinstance(doc, dict) and isinstance(doc.get("error"), dict) and isinstance(doc["error"].get("message"), str)


def _readable(body: bytes) -> str:
    """A short, one-line text for any error body: its JSON message when it has one (OpenAI,
    vLLM's top-level `message`, FastAPI's `detail`), else the text with HTML tags stripped."""
    doc = _json_or_none(body)
    text: Any = None
    if isinstance(doc, dict):
        err = doc.get("error")
        text = err.get("message") if isinstance(err, dict) else err if isinstance(err, str) else None
        text = text if isinstance(text, str) else doc.get("message") or doc.get("detail")
    if not isinstance(text, str):
        text = body.decode("utf-8", "replace")
        if "<" in text:
            text = _TAG.sub(" ", text)
    text = _SPACE.sub(" ", text).strip()
    if not text:
        return "(empty body)"
    return text if len(text) <= MESSAGE_CAP else text[:MESSAGE_CAP].rstrip() + "…"


def _json_or_none(body: bytes) -> Any:
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
