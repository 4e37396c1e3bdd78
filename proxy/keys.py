"""Inbound API keys (`serve --keys FILE`): who may use the proxy, checked in the gate.

The check runs before the request body is read, so an unauthenticated client
costs no body read, no routing and no upstream traffic, and learns nothing
about the route table (every path but the proxy's own open endpoints answers
401 first). Presented keys are compared in constant time: each is hashed
with a per-process random salt and compared against every entry's digest with
`hmac.compare_digest`, without stopping at a match. The keys themselves are
never logged, counted or quoted in a message: only the entry's `name` is.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Iterable
from fnmatch import fnmatchcase
from pathlib import Path
from urllib.parse import unquote_to_bytes

import anyio

from . import observe
from .config import MAX_KEY_LENGTH, KeyConfig, load_keys
from .errors import BadRequest, Forbidden, Unauthorized
from .reload import Reloadable, watch_folder

log = logging.getLogger("llmproxy.keys")

# Headers that carry an inbound key; removed before forwarding (the route's default_headers
# carry the upstream's own credential).
CREDENTIAL_HEADERS = frozenset({b"authorization", b"x-api-key"})
_HINT = "send it as `Authorization: Bearer KEY` or `x-api-key: KEY`"


class Caller:
    """An authenticated key: its name, the routes it may use, its own concurrency limit."""

    __slots__ = ("config", "name", "_allowed")

    def __init__(self, config: KeyConfig) -> None:
        self.config = config
        self.name = config.name
        self._allowed: dict[str, bool] = {}  # route name -> may use; route names are few

    def may_use(self, route_name: str) -> bool:
        ok = self._allowed.get(route_name)
        if ok is None:
            ok = self._allowed[route_name] = any(fnmatchcase(route_name, g) for g in self.config.routes)
        return ok

    def check(self, route_name: str) -> None:
        if not self.may_use(route_name):
            raise Forbidden(f"key {self.name!r} may not use route {route_name!r}")


class Keyring:
    """The keys of one keys file, ready to authenticate requests."""

    __slots__ = ("callers", "_salt", "_digests")

    def __init__(self, configs: Iterable[KeyConfig]) -> None:
        self._salt = os.urandom(32)
        self.callers = tuple(Caller(c) for c in configs)
        self._digests = tuple((self._digest(c.config.key.encode()), c) for c in self.callers)

    def _digest(self, key: bytes) -> bytes:
        return hmac.new(self._salt, key, hashlib.sha256).digest()

    def authenticate(self, headers: Iterable[tuple[bytes, bytes]], query: bytes = b"") -> Caller:
        """The caller whose key the request carries; `Unauthorized` otherwise.

        Accepted: `Authorization: Bearer KEY` (OpenAI clients) or `x-api-key: KEY` (Anthropic
        clients), white space around KEY ignored. Several credential headers must all carry
        the same key: two different ones are refused rather than guessed between. A query
        string (forwarded upstream as it is) that repeats the key is refused with 400.
        """
        given: set[bytes] = set()
        for name, value in headers:
            if name == b"authorization":
                scheme, _, token = value.strip().partition(b" ")
                if scheme.lower() != b"bearer":
                    raise Unauthorized(f"the Authorization header is not a Bearer key; {_HINT}")
                given.add(token.strip())
            elif name == b"x-api-key":
                given.add(value.strip())
        if not given:
            raise Unauthorized(f"missing API key; {_HINT}")
        if len(given) > 1:
            raise Unauthorized("more than one API key in the request (Authorization and x-api-key, or repeated "
                               "headers, disagree); send one")
        token = given.pop()
        if not token or len(token) > MAX_KEY_LENGTH:
            raise Unauthorized("invalid API key")
        digest = self._digest(token)
        found: Caller | None = None
        for candidate, caller in self._digests:  # no early exit: the time does not depend on which one matched
            if hmac.compare_digest(candidate, digest):
                found = caller
        if found is None:
            raise Unauthorized("invalid API key")
        if query and token in unquote_to_bytes(query.replace(b"+", b" ")):
            raise BadRequest("the API key is also in the query string, which is forwarded upstream; "
                             "send it only in a header", code="api_key_in_query")
        return found


def fingerprint(path: Path) -> bytes:
    """The file's content as read through symlinks (a Secret volume swaps its `..data` link)."""
    try:
        return hashlib.blake2b(path.read_bytes(), digest_size=16).digest()
    except OSError as exc:
        return b"unreadable: " + str(exc).encode()


class KeysHolder(Reloadable[Keyring]):
    """The keys, from the keys file. It is watched on its own, with or without `--reload`:
    a revoked key must stop working without a restart."""

    failed = "keys not reloaded, the previous keys stay in service"

    @classmethod
    def load(cls, path: Path | str) -> KeysHolder:
        """Snapshot first, then load (as `TableHolder.load`): an edit in between is seen later."""
        path = Path(path)
        snapshot = fingerprint(path)
        return cls(Keyring(load_keys(path)), path, snapshot)

    def _fingerprint(self, source: Path) -> bytes:
        return fingerprint(source)

    def _build(self, source: Path) -> Keyring:
        return Keyring(load_keys(source))

    def _counted(self, ok: bool) -> None:
        observe.keys_reloaded(ok)

    def _loaded(self, keyring: Keyring) -> None:
        log.info("keys reloaded from %s: %d key(s)", self.source, len(keyring.callers))

    async def _watch(self, source: Path, stop: anyio.Event, poll: float) -> None:
        # The file itself, and the `..data` link a Secret/ConfigMap volume swaps to update it.
        name = source.name
        await watch_folder(source.parent, self.reload, stop, poll, only=lambda n: n == name or n.startswith(".."))
