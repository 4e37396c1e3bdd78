"""The route table: an immutable value built from route files, matched per request.

Reload builds a new table and swaps it in one assignment, so a request keeps
the table (and route) it started with.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from fnmatch import fnmatchcase
from pathlib import Path

import msgspec

from .adapters import Adapter, make_adapter
from .config import RouteConfig, load_dir
from .errors import MethodNotAllowed, ModelNotFound, NotFound, bad_body
from .headers import Headers, normalize


class _Model(msgspec.Struct):
    model: str | None = None


# Decodes only `model`; msgspec skips the rest (messages, prompt) without building objects.
_decode_model = msgspec.json.Decoder(_Model).decode


class Route:
    """A route file compiled for the hot path."""

    __slots__ = ("config", "name", "adapter", "upstreams", "defaults", "timeout", "models", "_turn")

    def __init__(self, config: RouteConfig) -> None:
        self.config = config
        self.name = config.name
        self.adapter: Adapter = make_adapter(config)
        self.upstreams = config.upstreams
        self.defaults: Headers = normalize(config.default_headers)
        t = config.timeout
        self.timeout = {"connect": t.connect, "read": t.read, "write": t.write, "pool": t.pool}
        self.models = tuple(config.models)
        self._turn = itertools.cycle(range(len(self.upstreams)))

    def serves(self, model: str | None) -> bool:
        return model is not None and any(fnmatchcase(model, g) for g in self.models)

    def upstream_url(self, query: bytes = b"") -> str:
        """The URL to send to: round-robin over `upstream` when it lists several."""
        base = self.upstreams[next(self._turn)] if len(self.upstreams) > 1 else self.upstreams[0]
        return f"{base}?{query.decode('latin-1')}" if query else base


class RouteTable:
    """Routes by exact path; several routes on one path are told apart by the body's `model`."""

    __slots__ = ("routes", "_by_path")

    def __init__(self, configs: Sequence[RouteConfig]) -> None:
        self.routes = tuple(Route(c) for c in configs)
        by_path: dict[str, list[Route]] = {}
        for r in self.routes:
            by_path.setdefault(r.config.path, []).append(r)
        self._by_path = {p: tuple(rs) for p, rs in by_path.items()}

    @classmethod
    def from_dir(cls, folder: Path | str) -> RouteTable:
        return cls(load_dir(folder))

    @property
    def paths(self) -> frozenset[str]:
        return frozenset(self._by_path)

    def match(self, method: str, path: str, body: bytes) -> Route:
        candidates = self._by_path.get(path)
        if candidates is None:
            raise NotFound(f"no route for path {path}")
        if len(candidates) == 1:
            route = candidates[0]
            if method not in route.config.methods:
                raise self._not_allowed(method, path, candidates)
            if not route.models:
                return route
        candidates = tuple(r for r in candidates if method in r.config.methods)
        if not candidates:
            raise self._not_allowed(method, path, self._by_path[path])
        model = _model_of(body)
        fallback = None
        for r in candidates:
            if not r.models:
                fallback = fallback or r
            elif r.serves(model):
                return r
        if fallback is not None:
            return fallback
        served = sorted({g for r in candidates for g in r.models})
        raise ModelNotFound(
            f"model {model!r} is not served at {path}; available: {', '.join(served)}",
            param="model",
        )

    @staticmethod
    def _not_allowed(method: str, path: str, routes: Sequence[Route]) -> MethodNotAllowed:
        allowed = sorted({m for r in routes for m in r.config.methods})
        return MethodNotAllowed(
            f"method {method} is not allowed on {path}; allowed: {', '.join(allowed)}",
            headers={"allow": ", ".join(allowed)},
        )


def _model_of(body: bytes) -> str | None:
    """The body's `model`; None when the body is not JSON (the fallback route, or 404, decides).
    JSON whose `model` is not a string is the client's mistake: 400 naming the field."""
    try:
        return _decode_model(body).model
    except msgspec.ValidationError as exc:
        raise bad_body(exc) from None
    except msgspec.DecodeError:
        return None
