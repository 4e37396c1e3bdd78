"""Adapters translate bodies between what the client speaks and what the upstream speaks.

An adapter knows nothing about sockets: `request(body)` returns a `Call`
holding the upstream body and the per-request state needed to translate the
answer (`response(body)` whole, or `stream(chunks)` event by event).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..config import RouteConfig


class Call(Protocol):
    body: bytes  # what goes upstream
    translates: bool  # False: the response bytes are relayed untouched
    stream: bool  # the client asked for (and the upstream will send) SSE

    def response(self, body: bytes) -> bytes: ...
    def events(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]: ...

    # Optional: `async def ready(session, url, headers) -> None`, awaited by the forwarder just
    # before each send, with the upstream URL the body goes to (and, on a failover, the next
    # one). It may ask that same server something first and update `body` (`max_tokens: auto`).

    # Optional: `prompt: str`, the text the upstream will put in its prefix cache (a translating
    # call's rendered prompt). `balance: prefix` hashes it; calls without it are read from the body.


class Adapter(Protocol):
    def request(self, body: bytes) -> Call: ...


def make_adapter(config: RouteConfig) -> Adapter:
    """The adapter named by the route file."""
    if config.adapter == "chat-to-completions":
        from .chat_completions import ChatToCompletions

        return ChatToCompletions(config)
    if config.adapter == "messages-to-completions":
        from .messages import MessagesToCompletions

        return MessagesToCompletions(config)
    if config.adapter == "responses-to-completions":
        from .responses import ResponsesToCompletions

        return ResponsesToCompletions(config)
    from .passthrough import Passthrough

    return Passthrough(config)
