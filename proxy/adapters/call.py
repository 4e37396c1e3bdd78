"""The adapter contract: what the forwarder, the metrics, the tracer and the route table ask of a face.

An adapter turns a client body into a `Call` (`Adapter.request`); the forwarder sends
`Call.body` upstream and hands the answer back through `response` (whole) or `events`
(SSE). Every other member is a hook with a default in `CallBase` / `AdapterBase`, so
a new face is one module that subclasses them and fills in only what it needs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..errors import ProxyError

# `ready(session, url, headers)`: see `Call.ready`.
Ready = Callable[[Any, str, "list[tuple[str, str]] | None"], Awaitable[None]]


class Call(Protocol):
    """One request in flight through an adapter."""

    body: bytes  # what goes upstream
    translates: bool  # False: the response bytes are relayed untouched
    stream: bool  # the client asked for (and the upstream will send) SSE

    def response(self, body: bytes) -> bytes:
        """The upstream's whole answer -> the client's."""
        ...

    def events(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The upstream's SSE bytes -> the client's, read by read."""
        ...

    # --- hooks: defaults in `CallBase` --------------------------------------------------------

    # Awaited just before each send with the URL the body goes to (on a failover, the next
    # one): the call may ask that server something first and update `body` (`max_tokens: auto`).
    # Default None: nothing to do, and the forwarder skips the await.
    ready: Ready | None
    # Whether the client's query string goes upstream. Default True; a face's query (Claude
    # Code's `?beta=true`) means nothing to a completions server.
    upstream_query: bool
    # Client headers a translating call keeps from the upstream (an Anthropic client's
    # `x-api-key` is for the proxy). Default: none beyond `accept-encoding`.
    drop_headers: frozenset[bytes]
    # (prompt_tokens, completion_tokens) the upstream reported, for metrics and traces, once
    # the answer is read. Default None: not known.
    usage: tuple[int, int] | None
    # The text the upstream will put in its prefix cache: a translating call's rendered prompt,
    # which `balance: prefix` hashes. Default None: the balancer reads the client's body.
    prompt: str | None
    # `kept(owner)`: (id, record) to store once the whole answer is made, for a later request to
    # continue (the Responses face's `previous_response_id`; proxy/state.py keeps it). Default
    # None: the call keeps nothing, and the gateway does not look.
    kept: Callable[[str], tuple[str, bytes] | None] | None

    def retarget(self, url: str) -> str | None:
        """The URL to send to instead of the route's upstream `url` (a token count asks the same
        server's `/tokenize`). Default None: the upstream URL with the client's query."""
        ...

    def recover(self, status: int) -> bytes | None:
        """A 200 JSON body to answer instead of the upstream's error `status` (no `/tokenize`:
        an estimate). Default None: the error is the client's."""
        ...

    def stream_error(self, exc: ProxyError) -> bytes | None:
        """A fault after the stream began, in the call's own events (a Responses stream ends with
        `response.failed`). Default None: the face's error event (`errors.sse_event`)."""
        ...


class CallBase:
    """The defaults of every `Call` hook; a face's call subclasses it and overrides what it needs."""

    __slots__ = ()

    ready: Ready | None = None
    upstream_query = True
    drop_headers: frozenset[bytes] = frozenset()
    usage: tuple[int, int] | None = None
    prompt: str | None = None
    kept: Callable[[str], tuple[str, bytes] | None] | None = None

    def retarget(self, url: str) -> str | None:
        return None

    def recover(self, status: int) -> bytes | None:
        return None

    def stream_error(self, exc: ProxyError) -> bytes | None:
        return None


class Adapter(Protocol):
    """What a route's `adapter:` builds once per route."""

    def request(self, body: bytes) -> Call:
        """A client body -> the call that sends it upstream. Raises `ProxyError` for bad input."""
        ...

    # Paths this face answers beside its own, by suffix (`/count_tokens`), each with its own
    # adapter; the route table serves them on the route's upstreams. Default: none.
    subpaths: Mapping[str, Adapter]
    # `previous(body)`: the id of a stored answer the body continues, or None. The gateway then
    # loads it (proxy/state.py) and asks `continued` for the body to send. Default None: the
    # face continues nothing, and the gateway does not look.
    previous: Callable[[bytes], str | None] | None

    def continued(self, body: bytes, rid: str, stored: bytes | None, owner: str) -> bytes:
        """The body with the stored answer `rid` (None: unknown or expired) before its input, for
        the key named `owner`. Raises `ProxyError` (404) when it cannot be continued."""
        ...


class AdapterBase:
    """The defaults of the `Adapter` hooks."""

    subpaths: Mapping[str, Adapter] = MappingProxyType({})
    previous: Callable[[bytes], str | None] | None = None

    def continued(self, body: bytes, rid: str, stored: bytes | None, owner: str) -> bytes:
        return body
