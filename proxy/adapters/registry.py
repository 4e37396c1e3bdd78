"""The one table of adapter names: what each `adapter:` value builds, and the error shape its clients read."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, NamedTuple

from .call import Adapter
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

