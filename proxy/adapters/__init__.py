"""Adapters translate bodies between what the client speaks and what the upstream speaks.

An adapter knows nothing about sockets: `request(body)` returns a `Call`
holding the upstream body and the per-request state needed to translate the
answer (`response(body)` whole, or `events(chunks)` event by event). The contract,
every hook with its default, is in call.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, NamedTuple

from .call import Adapter, AdapterBase, Call, CallBase
from .chat_completions import ChatToCompletions
from .messages import MessagesToCompletions
from .passthrough import Passthrough
from .responses import ResponsesToCompletions

if TYPE_CHECKING:
    from ..config import RouteConfig


class AdapterKind(NamedTuple):
    """One `adapter:` value a route file may name."""

    build: Callable[[RouteConfig], Adapter]
    face: Literal["openai", "anthropic"]  # the error shape its clients read (errors.render)


# The one list of adapter names, in the order error messages list them: route-file validation
# (config.RouteConfig.adapter), the error shape of each route (routes.Route.face) and the
# README's route-file table (tests/test_architecture.py) read it.
ADAPTERS: dict[str, AdapterKind] = {
    "passthrough": AdapterKind(Passthrough, "openai"),
    "chat-to-completions": AdapterKind(ChatToCompletions, "openai"),
    "messages-to-completions": AdapterKind(MessagesToCompletions, "anthropic"),
    "responses-to-completions": AdapterKind(ResponsesToCompletions, "openai"),
}


def make_adapter(config: RouteConfig) -> Adapter:
    """The adapter named by the route file."""
    return ADAPTERS[config.adapter].build(config)


__all__ = ["ADAPTERS", "Adapter", "AdapterBase", "AdapterKind", "Call", "CallBase", "make_adapter"]
