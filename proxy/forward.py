"""The one forwarder: every route, every adapter, streaming or not.

A proxied request is a small ASGI app (`Exchange`): send upstream, relay the
answer chunk by chunk as it arrives, and close the upstream response in one
place whatever happens. One watcher on `receive()` spans the whole exchange,
so a client that leaves before the first byte (a long prompt) or mid-stream
cancels the upstream call at once.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import anyio
import httpx

from . import errors, headers, observe
from .errors import ProxyError, UpstreamStatus

if TYPE_CHECKING:
    from .adapters import Call
    from .routes import Route
    from .upstreams import Upstream

log = logging.getLogger("llmproxy.forward")

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
    upstream = route.pool.pick()
    request = httpx.Request(
        scope["method"],
        upstream.target(scope.get("query_string", b"")),
        headers=out,
        content=call.body,
        extensions={"timeout": route.timeout},
    )
    return Exchange(route, call, request, rid, upstream)


class Exchange:
    """One proxied request as an ASGI app.

    `disconnected` becomes True when the client left before the response was complete
    (the upstream request is then closed at once); observability reads it afterwards.
    """

    __slots__ = ("route", "call", "request", "rid", "upstream", "disconnected", "error", "_complete")

    def __init__(self, route: Route, call: Call, request: httpx.Request, rid: bytes, upstream: Upstream) -> None:
        self.route = route
        self.call = call
        self.request = request
        self.rid = rid
        self.upstream = upstream  # which of the route's upstreams `request` goes to
        self.disconnected = False
        self.error: ProxyError | None = None  # what failed, for `observe`
        self._complete = False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        client: httpx.AsyncClient = scope["app"].state.client
        meter = observe.begin(scope, self.route, send)  # counts bytes and the first byte
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch, receive, tg.cancel_scope)
            try:
                await self._exchange(client, meter.send)
            finally:
                tg.cancel_scope.cancel()
                observe.finish(meter, self, scope)
        if self.disconnected:
            log.debug("client left before the end of the response; route %r: upstream request closed", self.route.name)

    async def _exchange(self, client: httpx.AsyncClient, send: Any) -> None:
        route = self.route
        try:
            response = await self._send(client)
        except httpx.HTTPError as exc:
            await self._fail(send, errors.from_upstream(exc, route, self.request.url))
            return
        except ValueError:
            # aiohttp refuses control characters in header values; say which header, or it is a bug.
            err = errors.bad_header(self.request.headers.raw)
            if err is None:
                raise
            await self._fail(send, err)
            return
        except anyio.get_cancelled_exc_class():
            await self._cut(send, started=False, sse=False)
            raise
        started = False
        try:
            if response.status_code >= 400:
                body = await _read_capped(response)
                retry_after = response.headers.get("retry-after")
                await self._fail(send, UpstreamStatus(response.status_code, body, route, retry_after))
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
            await self._end(send)
        except (httpx.HTTPError, errors.BadUpstreamEvent, ProxyError) as exc:
            self.error = err = exc if isinstance(exc, ProxyError) else errors.from_upstream(exc, route, self.request.url)
            if not started:
                await self._fail(send, err)
            elif self._is_stream(response):
                await self._end(send, errors.sse_event(err))
            else:
                # Mid-body on a plain response: HTTP/1.1 has no way to say so but to drop the
                # connection, which the server does when we return without ending the body.
                log.warning("%s; closing the client connection", err.message)
        except anyio.get_cancelled_exc_class():
            await self._cut(send, started=started, sse=started and self._is_stream(response))
            raise
        except Exception as exc:
            if not (started and self._is_stream(response)):
                raise
            err, where = errors.internal(exc)
            log.error("internal error while streaming route %r: %s", route.name, where)
            await self._end(send, errors.sse_event(err))
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()

    async def _send(self, client: httpx.AsyncClient) -> httpx.Response:
        """`client.send`, moved on to the route's next upstream while connecting fails.

        Only a failed connect moves on: nothing was sent, so even a POST is safe to
        repeat. The last failure is raised when every upstream was tried.
        """
        pool = self.route.pool
        tried: list[Upstream] = []
        while True:
            try:
                response = await client.send(self.request, stream=True)
            except httpx.HTTPError as exc:
                reason = errors.connect_failure(exc)
                if reason is None:
                    raise
                pool.failed(self.upstream, reason)
                tried.append(self.upstream)
                nxt = pool.next_after(tried)
                if nxt is None:
                    raise
                self.upstream = nxt
                self.request = _retarget(self.request, nxt.target(self.request.url.query))
                continue
            pool.succeeded(self.upstream)
            return response

    async def _watch(self, receive: Any, scope: anyio.CancelScope) -> None:
        # The body has been read, so the next message is the client leaving (or, once the
        # response is complete, uvicorn saying so: not a disconnect).
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self._complete:
                    self.disconnected = True
                    scope.cancel()
                return

    def _is_stream(self, response: httpx.Response) -> bool:
        """An SSE answer: faults after its start line become one `data: {"error": ...}` event.
        Asked only on error paths (a header lookup the hot path need not pay)."""
        return self.call.stream or _is_sse(response)

    async def _end(self, send: Any, body: bytes = b"") -> None:
        self._complete = True  # before the send: the watcher may run while it is awaited
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _fail(self, send: Any, exc: ProxyError) -> None:
        self.error = exc
        self._complete = True
        await send_error(send, exc, self.rid)

    async def _cut(self, send: Any, *, started: bool, sse: bool) -> None:
        """Cancelled from outside (the shutdown grace period ran out), not by the client leaving:
        tell the client why rather than just dropping the connection."""
        if self.disconnected or self._complete or (started and not sse):
            return
        err = errors.ShuttingDown(f"the proxy is shutting down; route {self.route.name!r} was cut off")
        with anyio.CancelScope(shield=True):
            if started:
                await self._end(send, errors.sse_event(err))
            else:
                await self._fail(send, err)


async def send_error(send: Any, exc: ProxyError, rid: bytes | None = None) -> None:
    """A complete OpenAI-shaped error response (only before the start line was sent)."""
    body = errors.render(exc)
    hdrs = _JSON + [(b"content-length", str(len(body)).encode())]
    if rid is not None:
        hdrs.append((b"x-request-id", rid))
    hdrs.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items())
    await send({"type": "http.response.start", "status": exc.status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _read_capped(response: httpx.Response) -> bytes:
    buf = bytearray()
    async for chunk in response.aiter_bytes():
        buf += chunk
        if len(buf) >= _ERROR_BODY_CAP:
            break
    return bytes(buf[:_ERROR_BODY_CAP])


def _is_sse(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").startswith("text/event-stream")


def _retarget(request: httpx.Request, url: str) -> httpx.Request:
    """The same request for another upstream (httpx derives `Host` from the URL)."""
    hdrs = [(k, v) for k, v in request.headers.raw if k.lower() != b"host"]
    return httpx.Request(request.method, url, headers=hdrs, content=request.content, extensions=request.extensions)
