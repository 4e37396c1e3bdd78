"""The route table: an immutable value built from route files, matched per request.

Reload builds a new table and swaps it in one assignment, so a request keeps
the table (and route) it started with.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Callable, Iterable, Sequence
from fnmatch import fnmatchcase, translate
from itertools import product
from pathlib import Path

import msgspec

from .adapters import Adapter
from .adapters.registry import ADAPTERS, make_adapter
from .config import PORT, RouteConfig, load_dir
from .errors import MethodNotAllowed, ModelNotFound, NotFound, bad_body
from .headers import Headers, normalize
from .request_model import UNREAD, Unread, model_of
from .retry import RetryPolicy
from .transport import route_timeout
from .upstreams import Pool, upstream_label


class _ModelEntry(msgspec.Struct):
    id: str
    owned_by: str
    created: int
    object: str = "model"


class _ModelList(msgspec.Struct):
    data: list[_ModelEntry]
    object: str = "list"


class Route:
    """A route file compiled for the hot path."""

    __slots__ = ("config", "name", "adapter", "face", "upstreams", "pool", "defaults", "timeout", "client_timeout",
                 "models", "limits", "retry", "engine", "engine_key", "_match")  # fmt: skip

    def __init__(self, config: RouteConfig) -> None:
        self.config = config
        self.name = config.name
        self.adapter: Adapter = make_adapter(config)
        self.face = ADAPTERS[config.adapter].face  # the error shape its clients read
        # `engine:` (proxy/engines.py): None, or the process the route starts itself; the forwarder
        # waits for it before sending (one attribute test per request on every other route).
        self.engine = config.engine
        e = config.engine
        self.engine_key = (config.name, e.argv, e.group, tuple(sorted(e.env.items()))) if e else None
        # An engine's `${PORT}` is known once it starts: until then the URL names port 0 (nothing is
        # sent before the engine runs; `Engine` moves the upstream to its port at each start).
        self.upstreams = tuple(u.replace(PORT, "0") for u in config.upstreams) if config.engine else config.upstreams
        self.pool = Pool(config.name, self.upstreams, config.health, config.balancing)
        if config.engine:  # logs and metrics name the URL as written: a series per start would grow without end
            self.pool.members[0].label = upstream_label(config.upstreams[0])
        self.limits = config.limits  # None: the gate takes no slot (one attribute test per request)
        self.retry = RetryPolicy(config.retry) if config.retry is not None else None
        self.defaults: Headers = normalize(config.default_headers)
        t = config.timeout
        self.timeout = {"connect": t.connect, "read": t.read, "write": t.write, "pool": t.pool}
        self.client_timeout = route_timeout(t.connect, t.read, t.pool)
        self.models = tuple(config.models)
        # All globs as one compiled regex: one match call per request instead of one fnmatch per glob.
        self._match = re.compile("|".join(translate(g) for g in self.models)).match if self.models else None

    def serves(self, model: str | None) -> bool:
        return model is not None and self._match is not None and self._match(model) is not None

    def subroutes(self) -> dict[str, Route]:
        """The paths a face answers beside its own (`/v1/messages/count_tokens`), as routes that
        share this one's upstreams, health, headers and models but not its adapter."""
        out: dict[str, Route] = {}
        for suffix, adapter in self.adapter.subpaths.items():
            sub = copy.copy(self)
            sub.adapter = adapter
            out[self.config.path.rstrip("/") + suffix] = sub
        return out


class _Choice:
    """The routes of one path + method, as `match` needs them."""

    __slots__ = ("direct", "by_model", "fallback", "served")

    def __init__(self, routes: Sequence[Route]) -> None:
        self.by_model = tuple(r for r in routes if r.models)
        self.fallback = next((r for r in routes if not r.models), None)
        # One route and no `models`: the body need not be read at all.
        self.direct = self.fallback if not self.by_model else None
        self.served = tuple(dict.fromkeys(g for r in self.by_model for g in r.models))


class RouteTable:
    """Routes by exact path; several routes on one path are told apart by the body's `model`.

    Routes are kept in file-name order, and the first route whose `models` match wins.
    """

    __slots__ = ("routes", "created", "models_json", "_by_path", "_allowed", "_faces")

    def __init__(self, configs: Sequence[RouteConfig]) -> None:
        self.routes = tuple(Route(c) for c in configs)
        self.created = int(time.time())
        by_path: dict[str, list[Route]] = {}
        for r in self.routes:
            by_path.setdefault(r.config.path, []).append(r)
        declared = set(by_path)
        for r in self.routes:
            for path, sub in r.subroutes().items():
                if path not in declared:  # a route file naming the path itself wins
                    by_path.setdefault(path, []).append(sub)
        self._by_path = {
            path: {m: _Choice([r for r in rs if m in r.config.methods]) for m in {m for r in rs for m in r.config.methods}}
            for path, rs in by_path.items()
        }
        self._allowed = {path: ", ".join(sorted(choices)) for path, choices in self._by_path.items()}
        self._faces = {path: rs[0].face for path, rs in by_path.items()}
        self.models_json = self._models_json()

    @classmethod
    def from_dir(cls, folder: Path | str, *, allow_empty: bool = False) -> RouteTable:
        return cls(load_dir(folder, allow_empty=allow_empty))

    def has_path(self, path: str) -> bool:
        return path in self._by_path

    def face(self, path: str) -> str:
        """The error shape of the routes on `path` (its first route's face; "openai" when none):
        for refusals before a route is matched (401, 404, 413)."""
        return self._faces.get(path, "openai")

    @property
    def paths(self) -> frozenset[str]:
        return frozenset(self._by_path)

    def match(self, method: str, path: str, body: bytes) -> tuple[Route, str | None | Unread]:
        """The route for a request, and the body's `model` as read to choose it (`UNREAD`
        when one route serves the path whatever the model: the body was not looked at)."""
        choices = self._by_path.get(path)
        if choices is None:
            raise NotFound(f"no route for path {path}")
        choice = choices.get(method)
        if choice is None:
            allowed = self._allowed[path]
            raise MethodNotAllowed(f"method {method} is not allowed on {path}; allowed: {allowed}", headers={"allow": allowed})
        if choice.direct is not None:
            return choice.direct, UNREAD
        model = model_of(body)
        for r in choice.by_model:
            if r.serves(model):
                return r, model
        if choice.fallback is not None:
            return choice.fallback, model
        if model is None:
            _require_json(body)  # a body that is not JSON is a 400, as on every other route
        served = ", ".join(choice.served)
        asked = f"model {model!r} is not served" if model is not None else "the request names no model"
        raise ModelNotFound(f"{asked} at {path}; available: {served}", param="model")

    def models_json_for(self, may_use: Callable[[str], bool]) -> bytes:
        """`GET /v1/models` as a key sees it: only models of routes it may use."""
        return msgspec.json.encode(_ModelList(data=list(self.model_entries(may_use).values())))

    def _models_json(self) -> bytes:
        """`GET /v1/models`: every model name a client can send, once, owned by the route that wins it.

        Only concrete names: an exact `models:` entry is listed as written, a glob (`llama-3*`)
        is not a model id a client could pick. A fallback route (no `models`) answers any
        name, so it is listed under its route name: model pickers then offer something that
        works (the shipped default is one). `upstream_model` stays private.
        """
        return msgspec.json.encode(_ModelList(data=list(self.model_entries().values())))

    def model_entries(self, may_use: Callable[[str], bool] | None = None) -> dict[str, _ModelEntry]:
        seen: dict[str, _ModelEntry] = {}
        for r in self.routes:
            if may_use is not None and not may_use(r.name):
                continue
            for name in r.models or (r.name,):
                if name not in seen and not is_glob(name):
                    seen[name] = _ModelEntry(id=name, owned_by=r.name, created=self.created)
        return seen

    def model(self, name: str, may_use: Callable[[str], bool] | None = None) -> bytes | None:
        """`GET /v1/models/{name}`: the entry of a name some route serves, or None (404).

        A listed name, a name one route's glob matches, or any name when a fallback route
        exists (it would answer the request). With keys on, only routes the key may use."""
        entry = self.model_entries(may_use).get(name)
        if entry is None:
            usable = [r for r in self.routes if may_use is None or may_use(r.name)]
            owner = next((r for r in usable if r.serves(name)), None) or next(
                (r for r in usable if not r.models), None
            )
            if owner is None:
                return None
            entry = _ModelEntry(id=name, owned_by=owner.name, created=self.created)
        return msgspec.json.encode(entry)

    def warnings(self) -> list[str]:
        """Things that load but are probably not what the operator meant (`llmproxy check`)."""
        out: list[str] = []
        for path, choices in self._by_path.items():
            out += _overlaps(path, choices.values())
            out += _hidden_fallbacks(path, choices.values())
        for r in self.routes:
            out += _route_warnings(r)
        for r in self.routes:
            for url in sorted({u for u in r.upstreams if r.upstreams.count(u) > 1}):
                out.append(f"{r.config.source}: upstream: {url} is listed more than once (it gets a larger share)")
        return out


def _overlaps(path: str, choices: Iterable[_Choice]) -> list[str]:
    """A later route's `models` glob that overlaps an earlier one's on the same path: the first wins."""
    out: list[str] = []
    reported: set[tuple[str, str, str, str]] = set()
    for choice in choices:
        rs = choice.by_model
        for i, later in enumerate(rs):
            for first in rs[:i]:
                for gb, ga in product(later.models, first.models):
                    key = (first.name, ga, later.name, gb)
                    if key in reported or not _overlap(ga, gb):
                        continue
                    reported.add(key)
                    out.append(
                        f"{later.config.source}: models: {gb!r} overlaps {ga!r} of route {first.name!r} "
                        f"({first.config.source}) on {path}; route {first.name!r} wins for models "
                        "both match (first file in name order)"
                    )
    return out


def _hidden_fallbacks(path: str, choices: Iterable[_Choice]) -> list[str]:
    """A `models` glob that matches everything, beside a fallback route it then never lets answer."""
    out: list[str] = []
    for choice in choices:
        if choice.fallback is None:
            continue
        for r in choice.by_model:
            everything = next((g for g in r.models if _matches_everything(g)), None)
            if everything is not None:
                out.append(
                    f"{r.config.source}: models: {everything!r} of route {r.name!r} matches every model, so "
                    f"the fallback route {choice.fallback.name!r} ({choice.fallback.config.source}) on {path} "
                    "is never used; remove the glob or the fallback"
                )
                break
    return out


def _route_warnings(r: Route) -> list[str]:
    """One route file's own: options its adapter ignores, upstream variables left to their default,
    a built-in (Qwen) template for a model of another family."""
    c = r.config
    out = [
        f"{c.source}: {field}: has no effect on a passthrough route (it only applies to "
        "translating adapters such as chat-to-completions); remove it or set `adapter:`"
        for field in (_adapter_only(c) if c.adapter == "passthrough" else ())
    ]
    out += [
        f"{c.source}: upstream: {var} is not set (or empty), so route {r.name!r} sends to the default in the file: "
        f"{', '.join(c.upstreams)}; set {var} to your model server's address"
        for var in dict.fromkeys(c.env_defaults)
    ]
    if r.engine is not None and r.models and all(is_glob(g) for g in r.models):
        out.append(f"{c.source}: models: names only globs, and a route with engine: is listed in /v1/models by the "
                   "exact names of its file (its engine is not asked: it may be stopped), so none of its models is "
                   "listed; add the model's exact name to models:")
    family = _template_family(c)
    return [*out, family] if family else out


def is_glob(name: str) -> bool:
    return any(c in name for c in "*?[")


def _matches_everything(glob: str) -> bool:
    return glob.strip("*") == ""


# Options that only a translating adapter reads; on a passthrough route they do nothing.
# Listed by name, compared with the field's default, so keys added later only need naming here.
ADAPTER_ONLY = ("template", "reasoning", "dialect")


def _adapter_only(c: RouteConfig) -> list[str]:
    defaults = {f.name: f.default for f in msgspec.structs.fields(c)}
    used = {"dialect"} if c.balance_load is not None else set()  # it says where the engines report their load
    return [f for f in ADAPTER_ONLY if f in defaults and getattr(c, f) != defaults[f] and f not in used]


# Model families whose chat format is not Qwen's ChatML (the built-in templates are Qwen's), by
# what their names carry: a route that names one and keeps a built-in template prompts it wrongly.
FAMILIES = (
    ("Llama", re.compile(r"llama", re.I)),
    ("Mistral", re.compile(r"mistral|mixtral|codestral|ministral", re.I)),
    ("Gemma", re.compile(r"gemma", re.I)),
    ("Phi", re.compile(r"(?<![a-z])phi(?![a-z])|phi-?\d", re.I)),
    ("DeepSeek", re.compile(r"deepseek", re.I)),
    ("Command R", re.compile(r"command-?r", re.I)),
    ("Granite", re.compile(r"granite", re.I)),
)


def _template_family(c: RouteConfig) -> str:
    """The warning for a chat route that renders a built-in (Qwen) template while its model
    names (`models`, `upstream_model`, `name`) say another family; "" when none."""
    from .adapters.templates import BUILTIN

    if c.adapter == "passthrough" or c.template not in BUILTIN:
        return ""
    names = [*c.models, *([c.upstream_model] if c.upstream_model and c.upstream_model != "auto" else []), c.name]
    for family, pattern in FAMILIES:
        said = next((n for n in names if pattern.search(n)), None)
        if said is not None:
            return (f"{c.source}: template: route {c.name!r} names a {family} model ({said!r}) but renders its "
                    f"prompts with the built-in {c.template!r} template (Qwen's ChatML format; `chatml` is the "
                    "default): set `template:` to the model's tokenizer_config.json (its chat_template) or a Jinja "
                    "chat_template file, and `dialect:` to the server it runs on")
    return ""


def _overlap(a: str, b: str) -> bool:
    """Whether two globs likely match a common name: equal, or one matches the other's text.

    Not a full glob intersection (`a*` and `*b` share `ab` yet are not flagged); it catches
    the usual cases: duplicates, `qwen*` beside `qwen2.5-*`, `*` beside anything.
    """
    return a == b or fnmatchcase(a, b) or fnmatchcase(b, a)


def _require_json(body: bytes) -> None:
    """400 `invalid_json` when `body` is not JSON (asked on the error path only)."""
    try:
        msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise bad_body(exc) from None
