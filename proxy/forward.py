"""The one forwarder: every route, every adapter, streaming or not.

A proxied request is a small ASGI app (`Exchange`): send upstream, relay the
answer chunk by chunk as it arrives, and close the upstream response in one
place whatever happens. One watcher on `receive()` spans the whole exchange,
so a client that leaves before the first byte (a long prompt) or mid-stream
cancels the upstream call at once.
"""

from __future__ import annotations

import asyncio
import logging
from time import perf_counter
from typing import TYPE_CHECKING, Any

import aiohttp

from . import errors, headers, observe, served, tracing, transport
from .capacity import UNLIMITED, UpstreamSlots
from .errors import ProxyError, UpstreamStatus

if TYPE_CHECKING:
    from .adapters import Call
    from .engines import Engine
    from .balance import Hint
    from .retry import RetryPolicy
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
# What the upstream client raises: connect, read and protocol failures, and its timeouts.
UPSTREAM_ERRORS = (aiohttp.ClientError, TimeoutError)


def prepare(route: Route, scope: dict[str, Any], body: bytes, strip: frozenset[bytes] = frozenset()) -> Exchange:
    """Turn a matched request into an `Exchange`. Raises `ProxyError` for bad input.

    `strip`: client headers never forwarded (the inbound API key, when keys are on)."""
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
        drop=(_drops(call) | strip if strip else _drops(call)) if call.translates else strip,
    )
    if call.translates:
        out.append((b"accept-encoding", b"identity"))
    # A face's query (Claude Code's `?beta=true`) means nothing to the completions upstream.
    query = scope.get("query_string", b"") if call.upstream_query else b""
    balancer = route.pool.balancer
    if balancer is None:
        return Exchange(route, call, scope["method"], query, out, rid, route.pool.pick())
    # `balance:`: the upstream is chosen when the exchange starts (after any queue), from this hint.
    return Exchange(route, call, scope["method"], query, out, rid, None, balancer.hint(call, body, client_headers))


class Exchange:
    """One proxied request as an ASGI app.

    `disconnected` becomes True when the client left before the response was complete
    (the upstream request is then closed at once); observability reads it afterwards.
    """

    __slots__ = ("route", "call", "method", "query", "headers", "url", "rid", "upstream", "disconnected", "error",
                 "span", "engine_wait", "hint", "choice", "_complete")  # fmt: skip

    def __init__(self, route: Route, call: Call, method: str, query: bytes, out: headers.Headers, rid: bytes,
                 upstream: Upstream | None, hint: Hint | None = None) -> None:  # fmt: skip
        self.route = route
        self.call = call
        self.method = method
        self.query = query
        # aiohttp takes str pairs; latin-1 maps header bytes one to one.
        self.headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in out]
        self.rid = rid
        # Which of the route's upstreams the request goes to; with `balance:` (`hint` set) chosen in `__call__`.
        self.upstream: Upstream = upstream  # type: ignore[assignment]
        self.url = self._target(upstream) if upstream is not None else ""
        self.hint = hint
        self.choice: str | None = None  # why that upstream (balance.REASONS), on routes with `balance:`
        self.disconnected = False
        self.error: ProxyError | None = None  # what failed, for `observe`
        self.span: tracing.Span | None = None  # only when tracing is on
        self.engine_wait: float | None = None  # seconds this request waited for its route's engine to start
        self._complete = False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.hint is not None:
            try:
                upstream, self.choice = self.route.pool.balancer.choose(self.hint)  # type: ignore[union-attr]
            except ProxyError as exc:  # every upstream out by health checks
                observe.rejected(scope, exc, self.rid, self.route.face)
                await send_error(send, exc, self.rid, self.route.face)
                return
            self._move(upstream)
        state = scope["app"].state
        client: aiohttp.ClientSession = state.client
        slots: UpstreamSlots = getattr(state, "slots", UNLIMITED)  # an app made by create_app has its own
        meter = observe.begin(scope, self.route, send)  # counts bytes and the first byte
        out = meter.send
        if tracing.TRACER is not None:  # off: this one test is all tracing costs
            self.span = tracing.start(self, scope, meter)
            out = self.span.wrap(out)
        # A plain task, not an anyio task group: measured 90 µs less per request, same semantics.
        watcher = asyncio.get_running_loop().create_task(self._watch(receive, asyncio.current_task()))
        engine: Engine | None = None
        try:
            if self.route.engine is not None:  # the route starts its own upstream (proxy/engines.py)
                starting = state.engines.get(self.route)
                if not starting.admit():
                    waited = perf_counter()
                    try:
                        await starting.wait()  # cleans up after itself when it raises
                    except ProxyError as exc:
                        await self._fail(out, exc)
                        return
                    finally:
                        self.engine_wait = perf_counter() - waited
                engine = starting  # admitted: `leave` below, whatever happens
                self._move(self.upstream)  # the engine's port of this run
            if not slots.take():  # at --max-upstream-connections: refuse now, never park the request
                await self._fail(out, slots.refusal(self.route.name))
                return
            try:
                await self._exchange(client, out)
            finally:
                slots.give()
        except asyncio.CancelledError:
            if not self.disconnected and not isinstance(self.error, errors.ShuttingDown):
                raise  # cancelled from outside, and not by the server's shutdown: not ours to swallow
            # The client left, or uvicorn's grace period ran out and `_cut` told the client why:
            # the request is over, and its access line says which (no traceback from uvicorn).
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            if self.disconnected:
                log.debug("client left before the end of the response; route %r: upstream request closed",
                          self.route.name)
        finally:
            if engine is not None:
                engine.leave()
            watcher.cancel()
            if self.hint is not None:
                self.route.pool.balancer.release(self.upstream)  # type: ignore[union-attr]
            observe.finish(meter, self, scope)
            if self.span is not None:
                self.span.end(self, meter)

    async def _exchange(self, client: aiohttp.ClientSession, send: Any) -> None:
        route = self.route
        try:
            response = await self._send(client)
        except UPSTREAM_ERRORS as exc:
            await self._fail(send, errors.from_upstream(exc, route, self.url))
            return
        except ProxyError as exc:  # raised by the call's `ready` step
            await self._fail(send, exc)
            return
        except ValueError:
            # aiohttp refuses control characters in header values; say which header, or it is a bug.
            err = errors.bad_header(self.headers)
            if err is None:
                raise
            await self._fail(send, err)
            return
        except asyncio.CancelledError:
            await self._cut(send, started=False, sse=False)
            raise
        started = False
        try:
            status = response.status
            if status >= 400:
                body = await _read_capped(response)
                recovered = self.call.recover(status)
                if recovered is not None:  # the call has its own answer for this refusal
                    await self._answer(send, recovered)
                    return
                retry_after = response.headers.get("retry-after")
                await self._fail(send, UpstreamStatus(status, body, route, retry_after))
                return
            call = self.call
            if not call.translates:
                hdrs = headers.to_client(response.raw_headers, rid=self.rid)
                await send({"type": "http.response.start", "status": status, "headers": hdrs})
                started = True
                async for chunk in response.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            elif call.stream:
                hdrs = headers.to_client(response.raw_headers, rid=self.rid, drop=_REWRITTEN) + _SSE
                await send({"type": "http.response.start", "status": status, "headers": hdrs})
                started = True
                async for chunk in call.events(response.content.iter_any()):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            else:
                body = call.response(await response.read())
                hdrs = headers.to_client(response.raw_headers, rid=self.rid, drop=_REWRITTEN) + _JSON
                hdrs.append((b"content-length", str(len(body)).encode()))
                await send({"type": "http.response.start", "status": status, "headers": hdrs})
                started = True
                await send({"type": "http.response.body", "body": body, "more_body": True})
            await self._end(send)
        except (*UPSTREAM_ERRORS, errors.BadUpstreamEvent, ProxyError) as exc:
            self.error = err = exc if isinstance(exc, ProxyError) else errors.from_upstream(exc, route, self.url)
            if not started:
                await self._fail(send, err)
            elif self._is_stream(response):
                await self._end(send, self._stream_error(err))
            else:
                # Mid-body on a plain response: HTTP/1.1 has no way to say so but to drop the
                # connection, which the server does when we return without ending the body.
                log.warning("%s; closing the client connection", err.message)
        except asyncio.CancelledError:
            await self._cut(send, started=started, sse=started and self._is_stream(response))
            raise
        except Exception as exc:  # a bug (an adapter's, say): answer as well as the wire allows
            self.error, where = errors.internal(exc)
            log.error("internal error on route %r: %s", route.name, where)
            if not started:
                await self._fail(send, self.error)
            elif self._is_stream(response):
                await self._end(send, self._stream_error(self.error))
        finally:
            # Synchronous, so a cancellation cannot interrupt it: a finished body returns the
            # connection to the pool, anything else closes it (the upstream stops generating).
            if response.content.at_eof():
                response.release()
            else:
                response.close()

    async def _send(self, client: aiohttp.ClientSession) -> aiohttp.ClientResponse:
        """Send upstream, moved on to the route's next upstream while connecting fails.

        Only a failed connect moves on: nothing was sent, so even a POST is safe to
        repeat. The last failure is raised when every upstream was tried. A route
        with `retry:` goes through `_send_retrying` instead.
        """
        if self.route.retry is not None:
            return await self._send_retrying(client)
        pool = self.route.pool
        tried: list[Upstream] = []
        while True:
            try:
                response = await self._attempt(client)
            except UPSTREAM_ERRORS as exc:
                reason = errors.connect_failure(exc)
                if reason is None:
                    raise
                pool.failed(self.upstream, reason)
                tried.append(self.upstream)
                nxt = pool.next_after(tried)
                if nxt is None:
                    raise
                self._move(nxt)
                continue
            pool.succeeded(self.upstream)
            return response

    async def _attempt(self, client: aiohttp.ClientSession) -> aiohttp.ClientResponse:
        """One try at the current upstream, after the call's last word with it (`Call.ready`:
        the context lookup of a request that set no max_tokens goes to the same server).

        A request that a pooled connection swallowed (closed by the server as it went out, not
        one byte answered) is sent once more on a new connection (`transport.unanswered_on_reused`)
        and counted in `llmproxy_retries_total{reason="reused_connection"}`."""
        ready = self.call.ready
        if ready is not None:
            await ready(client, self.url, self.headers)
        if self.route.config.upstream_model == served.AUTO:  # after `ready`, which may rebuild the body
            name = await served.model(client, self.url, self.route)
            self.call.body = served.rename(self.call.body, name)
        return await transport.send(
            client, self.method, self.url, on_resend=self._resent, headers=self.headers,
            data=self.call.body or None, allow_redirects=False, timeout=self.route.client_timeout,
        )  # fmt: skip

    def _resent(self, exc: BaseException) -> None:
        log.info("route %r: %s closed a reused connection without answering (%s); sending again on a new "
                 "connection", self.route.name, self.upstream.label, type(exc).__name__)
        observe.retried(self.route.name, "reused_connection")

    async def _send_retrying(self, client: aiohttp.ClientSession) -> aiohttp.ClientResponse:
        """`retry:`: send again, to the next upstream at once or to the same one after its
        `Retry-After`, while the answer is one the route lists and no byte went to the client
        (this runs before the response head is relayed). The last try's answer or failure is
        the client's."""
        route = self.route
        policy = route.retry
        assert policy is not None
        pool = route.pool
        tried: list[Upstream] = []
        attempt = 1
        while True:
            try:
                response = await self._attempt(client)
            except UPSTREAM_ERRORS as exc:
                connect = errors.connect_failure(exc)
                if connect is not None:
                    pool.failed(self.upstream, connect)
                    why = "connect" if policy.connect else None
                else:
                    why = "timeout" if policy.timeout and isinstance(exc, TimeoutError) else None
                if why is None or attempt >= policy.attempts or not await self._again(tried, why, None, policy):
                    raise
                attempt += 1
                continue
            pool.succeeded(self.upstream)
            status = response.status
            if status < 400 or status not in policy.statuses or attempt >= policy.attempts:
                return response
            if not await self._again(tried, str(status), response.headers.get("retry-after"), policy, response):
                return response  # too long a wait asked: this answer is the client's
            attempt += 1

    async def _again(self, tried: list[Upstream], why: str, retry_after: str | None, policy: RetryPolicy,
                     response: aiohttp.ClientResponse | None = None) -> bool:  # fmt: skip
        """Pick the next try's upstream and wait as asked; False when no retry is allowed."""
        tried.append(self.upstream)
        nxt = self.route.pool.next_after(tried)
        if nxt is None:  # every upstream tried: the same one again, after its Retry-After
            nxt = self.upstream
            tried.clear()
        wait = policy.wait_for(retry_after, same_upstream=nxt is self.upstream)
        if wait is None:
            return False
        if response is not None:  # read the small error body, so the connection can be reused
            try:
                await _read_capped(response)
            finally:
                if response.content.at_eof():
                    response.release()
                else:
                    response.close()
        log.warning(
            "retrying route %r on %s after %s from %s%s", self.route.name, nxt.label, why, self.upstream.label,
            f" (waiting {wait:g} s)" if wait else "",
        )
        observe.retried(self.route.name, why)
        if wait:
            await asyncio.sleep(wait)
        self._move(nxt)
        return True

    def _move(self, upstream: Upstream) -> None:
        if self.hint is not None and self.url and upstream is not self.upstream:  # a failover, not the first choice
            self.route.pool.balancer.moved(self.hint, self.upstream, upstream)  # type: ignore[union-attr]
            self.choice = "failover"
        self.upstream = upstream
        self.url = self._target(upstream)

    async def _watch(self, receive: Any, task: asyncio.Task[Any] | None) -> None:
        # The body has been read, so the next message is the client leaving (or, once the
        # response is complete, uvicorn saying so: not a disconnect).
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self._complete and task is not None:
                    self.disconnected = True
                    task.cancel()
                return

    def _is_stream(self, response: aiohttp.ClientResponse) -> bool:
        """An SSE answer: faults after its start line become one `data: {"error": ...}` event.
        Asked only on error paths (a header lookup the hot path need not pay)."""
        return self.call.stream or response.headers.get("content-type", "").startswith("text/event-stream")

    async def _end(self, send: Any, body: bytes = b"") -> None:
        self._complete = True  # before the send: the watcher may run while it is awaited
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _fail(self, send: Any, exc: ProxyError) -> None:
        self.error = exc
        self._complete = True
        await send_error(send, exc, self.rid, self.route.face)

    def _stream_error(self, exc: ProxyError) -> bytes:
        """A fault after the stream began, in the face's stream grammar: the call's own events when
        it has some (a Responses stream ends with `response.failed`), else the face's error event."""
        own = self.call.stream_error(exc)
        return own if own is not None else errors.sse_event(exc, self.route.face)

    def _target(self, upstream: Upstream) -> str:
        """The URL for this call: the route's upstream URL, or the one the call derives from it
        (`count_tokens` asks the same server's `/tokenize`)."""
        url = self.call.retarget(upstream.url)
        return upstream.target(self.query) if url is None else url

    async def _answer(self, send: Any, body: bytes) -> None:
        """A 200 JSON answer the call made itself (after the upstream refused it)."""
        hdrs = _JSON + [(b"content-length", str(len(body)).encode()), (b"x-request-id", self.rid)]
        await send({"type": "http.response.start", "status": 200, "headers": hdrs})
        await self._end(send, body)

    async def _cut(self, send: Any, *, started: bool, sse: bool) -> None:
        """Cancelled from outside (the shutdown grace period ran out), not by the client leaving:
        tell the client why rather than just dropping the connection."""
        if self.disconnected or self._complete:
            return
        err = errors.ShuttingDown(f"the proxy is shutting down; route {self.route.name!r} was cut off")
        self.error = err  # the access line says `shutting_down`
        if started and not sse:
            return  # a plain body: only dropping the connection can say it was cut
        if started:
            await self._end(send, self._stream_error(err))
        else:
            await self._fail(send, err)


async def send_error(send: Any, exc: ProxyError, rid: bytes | None = None, face: str = "openai") -> None:
    """A complete error response in the face's shape (only before the start line was sent)."""
    body = errors.render(exc, face)
    hdrs = _JSON + [(b"content-length", str(len(body)).encode())]
    if rid is not None:
        hdrs.append((b"x-request-id", rid))
    hdrs.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items())
    await send({"type": "http.response.start", "status": exc.status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _drops(call: Call) -> frozenset[bytes]:
    """Client headers a translating call does not send upstream: accept-encoding, and the ones
    its face names (an Anthropic client's `x-api-key` is for the proxy, not the completions server)."""
    extra = call.drop_headers
    return _ADAPTER_DROPS | extra if extra else _ADAPTER_DROPS


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    buf = bytearray()
    async for chunk in response.content.iter_any():
        buf += chunk
        if len(buf) >= _ERROR_BODY_CAP:
            break
    return bytes(buf[:_ERROR_BODY_CAP])
