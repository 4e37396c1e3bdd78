"""Adapters translate bodies between what the client speaks and what the upstream speaks.

An adapter knows nothing about sockets: `request(body)` returns a `Call`
holding the upstream body and the per-request state needed to translate the
answer (`response(body)` whole, or `events(chunks)` event by event). The contract,
every hook with its default, is in call.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .call import Adapter, AdapterBase, Call, CallBase

if TYPE_CHECKING:
    from ..config import RouteConfig


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


__all__ = ["Adapter", "AdapterBase", "Call", "CallBase", "make_adapter"]
