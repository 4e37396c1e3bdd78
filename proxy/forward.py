"""The one forwarder: every route, every adapter, streaming or not.

A proxied request is a small ASGI app (`Exchange`): send upstream, relay the
answer chunk by chunk as it arrives, and close the upstream response in one
place whatever happens. One watcher on `receive()` spans the whole exchange,
so a client that leaves before the first byte (a long prompt) or mid-stream
cancels the upstream call at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import httpx

from . import errors, headers, observe
from .errors import ProxyError, UpstreamStatus

if TYPE_CHECKING:
    from .adapters import Call
    from .routes import Route

_ERROR_BODY_CAP = 64 * 1024
_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
# Response headers that stop being true once the adapter rewrites the body.
_REWRITTEN = frozenset({b"content-length", b"content-type", b"content-encoding", b"etag", b"content-md5"})
# An adapter parses the upstream body, so it must arrive uncompressed.
_ADAPTER_DROPS = frozenset({b"accept-encoding"})


def prepare(route: Route, scope: dict[str, Any], body: bytes) -> Exchange:
    """Turn a matched request into an `Exchange`. Raises `ProxyError` for bad input."""
    call = route.adapter.request(body)
    client_headers = scope["headers"]
    rid = headers.request_id(client_headers)
    client = scope.get("client")
    out = headers.to_upstream(
        client_headers,
        route.defaults,
        rid=rid,
        client_ip=client[0] if client else None,
        scheme=scope.get("scheme", "http"),
        drop=_ADAPTER_DROPS if call.translates else frozenset(),
    )
    if call.translates:
        out.append((b"accept-encoding", b"identity"))
    request = httpx.Request(
        scope["method"],
        route.upstream_url(scope.get("query_string", b"")),
        headers=out,
        content=call.body,
        extensions={"timeout": route.timeout},
    )
    return Exchange(route, call, request, rid)


class Exchange:
    """One proxied request as an ASGI app."""

    __slots__ = ("route", "call", "request", "rid", "error")

    def __init__(self, route: Route, call: Call, request: httpx.Request, rid: bytes) -> None:
        self.route = route
        self.call = call
        self.request = request
        self.rid = rid
        self.error: ProxyError | None = None  # what failed, for `observe`

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        client: httpx.AsyncClient = scope["app"].state.client
        meter = observe.begin(scope, self.route, send, receive)  # counts bytes, first byte, disconnect
        async with anyio.create_task_group() as tg:
            tg.start_soon(_cancel_on_disconnect, meter.receive, tg.cancel_scope)
            try:
                await self._exchange(client, meter.send)
            finally:
                tg.cancel_scope.cancel()
                observe.finish(meter, self, scope)

    async def _exchange(self, client: httpx.AsyncClient, send: Any) -> None:
        name = self.route.name
        try:
            response = await client.send(self.request, stream=True)
        except httpx.HTTPError as exc:
            self.error = err = errors.from_httpx(exc, name)
            await send_error(send, err, self.rid)
            return
        started = False
        try:
            if response.status_code >= 400:
                body = await _read_capped(response)
                self.error = err = UpstreamStatus(response.status_code, body, name)
                await send_error(send, err, self.rid)
                return
            call = self.call
            if not call.translates:
                hdrs = headers.to_client(response.headers.raw, rid=self.rid)
                await send({"type": "http.response.start", "status": response.status_code, "headers": hdrs})
                started = True
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            elif call.stream:
                hdrs = headers.to_client(response.headers.raw, rid=self.rid, drop=_REWRITTEN) + _SSE
                await send({"type": "http.response.start", "status": response.status_code, "headers": hdrs})
                started = True
                async for chunk in call.events(response.aiter_raw()):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            else:
                body = call.response(await response.aread())
                hdrs = headers.to_client(response.headers.raw, rid=self.rid, drop=_REWRITTEN) + _JSON
                hdrs.append((b"content-length", str(len(body)).encode()))
                await send({"type": "http.response.start", "status": response.status_code, "headers": hdrs})
                started = True
                await send({"type": "http.response.body", "body": body, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (httpx.HTTPError, ProxyError) as exc:
            self.error = err = exc if isinstance(exc, ProxyError) else errors.from_httpx(exc, name)
            if not started:
                await send_error(send, err, self.rid)
            elif self.call.stream or _is_sse(response):
                await send({"type": "http.response.body", "body": errors.sse_event(err), "more_body": False})
            else:
                raise  # mid-body on a plain response: dropping the connection is the only signal left
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()


async def send_error(send: Any, exc: ProxyError, rid: bytes | None = None) -> None:
    """A complete OpenAI-shaped error response (only before the start line was sent)."""
    body = errors.render(exc)
    hdrs = _JSON + [(b"content-length", str(len(body)).encode())]
    if rid is not None:
        hdrs.append((b"x-request-id", rid))
    hdrs.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items())
    await send({"type": "http.response.start", "status": exc.status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _cancel_on_disconnect(receive: Any, scope: anyio.CancelScope) -> None:
    # The body has been read, so the next message is the client leaving.
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


async def _read_capped(response: httpx.Response) -> bytes:
    buf = bytearray()
    async for chunk in response.aiter_bytes():
        buf += chunk
        if len(buf) >= _ERROR_BODY_CAP:
            break
    return bytes(buf[:_ERROR_BODY_CAP])


def _is_sse(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").startswith("text/event-stream")
