"""Route files -> frozen msgspec Structs. Nothing else in llmproxy reads YAML.

Each error names the file, the YAML line when there is one, and the field:
`routes.d/qwen.yaml:4: timeout.read: Expected `number`, got `str``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

from .adapters.templates import BUILTIN
from .errors import ConfigError, invalid_field

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}
RESERVED_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v1/models"})


class Timeout(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Seconds. `read` is long by default: a big prompt may take minutes before the first token."""

    connect: float = 5.0
    read: float = 600.0
    write: float = 30.0
    pool: float = 30.0


class RouteConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One route file, validated. See README "Route files" for each field."""

    name: str
    path: str
    upstream: str | list[str]
    methods: tuple[str, ...] = ("POST",)
    adapter: Literal["passthrough", "chat-to-completions", "messages-to-completions", "responses-to-completions"] = \
        "passthrough"
    stream: Literal["auto", "always", "never"] = "auto"
    models: tuple[str, ...] = ()
    upstream_model: str | None = None
    default_headers: dict[str, str] = msgspec.field(default_factory=dict)
    timeout: Timeout = Timeout()
    template: str = "chatml"
    reasoning: Literal["none", "think"] = "none"
    # Messages / Responses faces: tools a local model cannot run (web_search, code_interpreter, ...)
    # are left out of the prompt (logged, counted), or the request is refused naming them.
    hosted_tools: Literal["ignore", "reject"] = "ignore"
    source: str = ""  # the file it came from; set by the loader, not by users

    @property
    def upstreams(self) -> tuple[str, ...]:
        return (self.upstream,) if isinstance(self.upstream, str) else tuple(self.upstream)


def expand_env(value: str, env: dict[str, str] | os._Environ[str] | None = None) -> str:
    """`${VAR}` and `${VAR:-default}` from the environment; an unset `${VAR}` is an error."""
    env = os.environ if env is None else env

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        val = env.get(name)
        if val is None or (val == "" and default is not None):
            if default is None:
                raise KeyError(name)
            return default
        return val

    return _ENV.sub(sub, value)


def load_file(path: Path, env: dict[str, str] | None = None) -> RouteConfig:
    """Read and validate one route file."""
    label = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{label}: cannot read: {exc}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{label}{where}: yaml: {problem}") from None
    lines = _key_lines(node)
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: file: expected a mapping of route fields, got {type(data).__name__}")

    def fail(field: str, reason: str) -> ConfigError:
        line = lines.get(field.split(".")[0].split("[")[0])
        return ConfigError(f"{label}{f':{line}' if line else ''}: {field}: {reason}")

    data.setdefault("name", path.stem)
    if "source" in data:
        raise fail("source", "unknown field")
    data["source"] = label
    data = _expand(data, "", env, fail)
    try:
        route = msgspec.convert(data, RouteConfig)
    except msgspec.ValidationError as exc:
        field, reason, _ = invalid_field(exc)
        raise fail(field or "file", reason) from None
    return _check(route, path.parent, fail)


def load_dir(folder: Path | str, env: dict[str, str] | None = None) -> list[RouteConfig]:
    """Every `*.yaml`/`*.yml` in `folder`, in file-name order; names must be unique."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: routes folder: not a directory")
    files = sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and not p.name.startswith("."))
    routes = [load_file(p, env) for p in files]
    seen: dict[str, str] = {}
    fallbacks: dict[tuple[str, str], str] = {}
    for r in routes:
        if r.name in seen:
            raise ConfigError(f"{r.source}: name: {r.name!r} is already used by {seen[r.name]}")
        seen[r.name] = r.source
        if not r.models:
            for m in r.methods:
                other = fallbacks.get((r.path, m))
                if other:
                    raise ConfigError(
                        f"{r.source}: path: {m} {r.path} already has a route without `models` in {other}; "
                        "give one of them `models:` to choose by model"
                    )
                fallbacks[(r.path, m)] = r.source
    return routes


def _expand(value: Any, field: str, env: Any, fail: Any) -> Any:
    if isinstance(value, str):
        try:
            return expand_env(value, env)
        except KeyError as exc:
            raise fail(field or "file", f"environment variable {exc.args[0]} is not set and has no default") from None
    if isinstance(value, dict):
        return {k: _expand(v, f"{field}.{k}" if field else str(k), env, fail) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{field}[{i}]", env, fail) for i, v in enumerate(value)]
    return value


def _check(r: RouteConfig, folder: Path, fail: Any) -> RouteConfig:
    from urllib.parse import urlsplit

    if not r.name.strip():
        raise fail("name", "must not be empty")
    if not r.path.startswith("/") or " " in r.path:
        raise fail("path", f"must be an absolute URL path starting with '/', got {r.path!r}")
    if r.path in RESERVED_PATHS:
        raise fail("path", f"{r.path} is one of the proxy's own endpoints")
    if not r.methods:
        raise fail("methods", "must name at least one method")
    methods = tuple(m.upper() for m in r.methods)
    for m in methods:
        if m not in _METHODS:
            raise fail("methods", f"unknown HTTP method {m!r}")
    if not r.upstreams:
        raise fail("upstream", "must name at least one URL")
    for i, url in enumerate(r.upstreams):
        field = "upstream" if isinstance(r.upstream, str) else f"upstream[{i}]"
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise fail(field, f"bad URL {url!r}: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise fail(field, f"must be an http(s) URL with a host, got {url!r}")
        if parts.username is not None or parts.password is not None:
            raise fail(field, "must not carry user:password@; put credentials in default_headers "
                              "(e.g. Authorization: Basic ...), where they stay out of logs")
        if parts.query or parts.fragment:
            raise fail(field, f"must not carry a query or fragment, got {url!r}")
    headers: dict[str, str] = {}
    seen: set[str] = set()
    for name, value in r.default_headers.items():
        if not _TOKEN.match(name):
            raise fail(f"default_headers.{name}", "not a valid header name")
        if name.lower() in seen:
            raise fail(f"default_headers.{name}", "given twice (header names are case-insensitive)")
        seen.add(name.lower())
        # h11 rejects surrounding white space; `Bearer ${KEY:-}` with no key must still serve.
        value = value.strip()
        if any(c in value for c in "\r\n\0"):
            raise fail(f"default_headers.{name}", "value contains CR, LF or NUL")
        headers[name] = value
    for glob in r.models:
        if not glob:
            raise fail("models", "an empty pattern matches nothing")
    t = r.timeout
    for f in ("connect", "read", "write", "pool"):
        if getattr(t, f) <= 0:
            raise fail(f"timeout.{f}", "must be a positive number of seconds")
    template = r.template
    if template not in BUILTIN:
        tpath = (folder / template) if not Path(template).is_absolute() else Path(template)
        if not tpath.is_file():
            builtin = " nor ".join(repr(b) for b in BUILTIN)
            raise fail("template", f"neither {builtin} nor an existing file: {tpath}")
        template = str(tpath)
    return msgspec.structs.replace(r, methods=methods, default_headers=headers, template=template)


def _key_lines(node: Any) -> dict[str, int]:
    """Top-level key -> 1-based line, so errors can point into the file."""
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
