"""Route files -> frozen msgspec Structs. Nothing else in llmproxy reads YAML.

Each error names the file, the YAML line when there is one, and the field:
`routes.d/qwen.yaml:4: timeout.read: Expected `number`, got `str``.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

from .adapters.registry import ADAPTERS
from .adapters.dialects import FACTS
from .adapters.templates import BUILTIN
from .balance import DEFAULT_MARGIN, DEFAULT_PROMPTS, Policy
from .errors import AUTH_SCHEMES, ConfigError, invalid_field

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}
RESERVED_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v1/models", "/v1/usage"})
# `adapter:` and `dialect:` accept the names of their one table (adapters.ADAPTERS,
# adapters.dialects.FACTS), in its order; a new face or dialect is an entry there.
AdapterName = Literal[tuple(ADAPTERS)]  # type: ignore[valid-type]
DialectName = Literal[tuple(FACTS)]  # type: ignore[valid-type]
_COUNTING = " or ".join(name for name, facts in FACTS.items() if facts.context is not None)  # can size `auto`


class Timeout(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Seconds. `read` is long by default: a big prompt may take minutes before the first token."""

    connect: float = 5.0
    read: float = 600.0
    write: float = 30.0
    pool: float = 30.0


class Body(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`body:`: edits to the JSON that goes upstream, after any translation (README "The upstream body")."""

    defaults: dict[str, Any] = {}  # filled in when the body lacks them (`max_tokens: auto`: the context remainder)
    set: dict[str, Any] = {}  # forced
    remove: tuple[str, ...] = ()  # dropped
    limit: dict[str, int | float | str] = {}  # numeric ceilings (`max_tokens: auto`: the context remainder)


class Limits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """At most `max_concurrent` requests in flight; `queue` more wait FIFO up to `queue_timeout` s."""

    max_concurrent: int
    queue: int = 0
    queue_timeout: float = 30.0


class Retry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Send again, before any byte went to the client, when the upstream answers one of `when`."""

    attempts: int = 2  # the first try included
    when: tuple[int | Literal["connect", "timeout"], ...] = ("connect",)
    max_wait: float = 10.0  # a longer Retry-After is not waited for


class Health(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Active checks: GET `path` on each upstream's origin every `interval` s."""

    path: str = "/health"
    interval: float = 5.0
    timeout: float = 2.0
    unhealthy_after: int = 2
    healthy_after: int = 1


class EngineConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`engine:`: the route starts its own model server on demand (proxy/engines.py, README
    "Several models on one GPU"). `command` runs without a shell; `${PORT}` is a free loopback
    port the proxy picks at each start."""

    command: str | list[str]
    health: str = "/health"  # polled until 200 before the first request goes through
    start_timeout: float = 120.0  # seconds from spawn to a passing health check
    idle_ttl: float = 0.0  # seconds without a request (and none in flight) before it is stopped; 0: never
    group: str | None = None  # at most one engine of a group runs at a time
    stop_timeout: float = 10.0  # seconds between SIGTERM and SIGKILL when it is stopped
    env: dict[str, str] = {}  # added to the proxy's environment for the engine (CUDA_VISIBLE_DEVICES: "0")
    preload: bool = False  # start when the route is loaded (start-up, reload), not on its first request

    @property
    def argv(self) -> tuple[str, ...]:
        """The command split as a POSIX shell would split it (no expansion, no globbing)."""
        return tuple(shlex.split(self.command)) if isinstance(self.command, str) else tuple(self.command)

    def shown(self, argv: tuple[str, ...] | list[str] | None = None) -> str:
        """The command for logs and `check`, with the value of any option named like a secret
        (`--api-key K`, `--hf-token=T`, which llama-server and vLLM take) as `***`."""
        out: list[str] = []
        hide_next = False
        for arg in self.argv if argv is None else argv:
            if hide_next:
                out.append("***")
                hide_next = False
                continue
            flag, eq, _ = arg.partition("=")
            secret = flag.startswith("-") and _SECRET_FLAG.search(flag) is not None
            if secret and eq:
                out.append(f"{flag}=***")
            else:
                out.append(arg)
                hide_next = secret
        return " ".join(out)


class Session(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where a client names its conversation: a header, else body fields (dotted paths), first found."""

    header: str | None = None  # e.g. x-session-id
    fields: tuple[str, ...] = ()  # e.g. prompt_cache_key, user, metadata.user_id


class Balance(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`balance:` (README "Upstream lists"); `balance: prefix` is short for `{policy: prefix}`."""

    policy: Policy = "round-robin"
    spill_margin: int = DEFAULT_MARGIN  # requests in flight: prefix / session yield to the least busy past it
    session: Session | None = None
    prompts: int = DEFAULT_PROMPTS  # served prompts remembered (their last block's hash, LRU)


class BalanceLoad(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`balance_load:` each upstream's own queue depth, read every `interval` s from where its
    dialect reports it (README "Upstream lists"), added to this process's in-flight counts."""

    source: Literal["metrics"] = msgspec.field(default="metrics", name="from")
    interval: float = 2.0
    timeout: float = 1.0


class RouteConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One route file, validated. See README "Route files" for each field."""

    name: str
    path: str
    upstream: str | list[str]
    methods: tuple[str, ...] = ("POST",)
    adapter: AdapterName = "passthrough"
    stream: Literal["auto", "always", "never"] = "auto"
    models: tuple[str, ...] = ()
    upstream_model: str | None = None
    default_headers: dict[str, str] = msgspec.field(default_factory=dict)
    timeout: Timeout = Timeout()
    template: str = "chatml"
    reasoning: Literal["none", "think"] = "none"
    dialect: DialectName = "vllm"  # how the upstream's completions speak
    body: Body | None = None
    limits: Limits | None = None
    retry: Retry | None = None
    health: Health | None = None
    balance: Policy | Balance = "round-robin"
    balance_load: BalanceLoad | None = None
    # Messages / Responses faces: tools a local model cannot run (web_search, code_interpreter, ...)
    # are left out of the prompt (logged, counted), or the request is refused naming them.
    hosted_tools: Literal["ignore", "reject"] = "ignore"
    engine: EngineConfig | None = None  # the route starts (and stops) its upstream itself
    source: str = ""  # the file it came from; set by the loader, not by users
    # Variables of `upstream` that were unset (or empty) so their `${VAR:-default}` was used;
    # set by the loader, so start-up and `check` can say the route runs on a built-in address.
    env_defaults: tuple[str, ...] = ()

    @property
    def upstreams(self) -> tuple[str, ...]:
        return (self.upstream,) if isinstance(self.upstream, str) else tuple(self.upstream)

    @property
    def balancing(self) -> Balance:
        """`balance:` in its long form."""
        return self.balance if isinstance(self.balance, Balance) else Balance(policy=self.balance)


def expand_env(value: str, env: dict[str, str] | os._Environ[str] | None = None,
               defaulted: list[str] | None = None, keep: frozenset[str] = frozenset()) -> str:
    """`${VAR}`, `${VAR:-default}` and `${VAR:+alternative}` from the environment, with POSIX
    shell meanings: `:-` gives `default` when VAR is unset or empty, `:+` gives `alternative`
    when VAR is set and non-empty and nothing otherwise (`${KEY:+Bearer ${KEY}}`). The word
    may hold further `${…}`. An unset `${VAR}` is an error; names whose default was used are
    appended to `defaulted`. Names in `keep` stay as written (`${PORT}` in a route with
    `engine:` is filled in at each start)."""
    env = os.environ if env is None else env
    out: list[str] = []
    i = 0
    while True:
        start = value.find("${", i)
        if start < 0:
            out.append(value[i:])
            return "".join(out)
        out.append(value[i:start])
        m = _ENV_HEAD.match(value, start)
        if m is None:  # not a reference (`${` then something else): kept as written
            out.append("${")
            i = start + 2
            continue
        name, op = m.group(1), m.group(2)
        end = _closing(value, m.end()) if op else m.end() - 1
        if end < 0:
            out.append(value[start:])
            return "".join(out)
        word = value[m.end():end]
        if name in keep:
            out.append(value[start:end + 1])
            i = end + 1
            continue
        val = env.get(name)
        if op == ":+":
            out.append(expand_env(word, env, defaulted, keep) if val else "")
        elif val is None or (val == "" and op == ":-"):
            if op is None:
                raise KeyError(name)
            if defaulted is not None and word:
                defaulted.append(name)
            out.append(expand_env(word, env, defaulted, keep))
        else:
            out.append(val)
        i = end + 1


_ENV_HEAD = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:[-+])|\})")


def _closing(text: str, at: int) -> int:
    """The index of the `}` that closes a `${NAME:-` / `${NAME:+` word starting at `at`
    (nested `${…}` counted), or -1."""
    depth = 0
    i = at
    while i < len(text):
        if text.startswith("${", i):
            depth += 1
            i += 2
            continue
        if text[i] == "}":
            if depth == 0:
                return i
            depth -= 1
        i += 1
    return -1


def load_file(path: Path, env: dict[str, str] | None = None) -> RouteConfig:
    """Read and validate one route file."""
    label = str(path)
    data, node = _read_yaml(path)
    lines = _key_lines(node)
    if data is None:
        raise ConfigError(f"{label}: file: is empty; a route file needs at least `path:` and `upstream:` "
                          "(see README, Route files)")
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: file: expected a mapping of route fields, got {type(data).__name__}")

    def fail(field: str, reason: str) -> ConfigError:
        line = lines.get(field.split(".")[0].split("[")[0])
        return ConfigError(f"{label}{f':{line}' if line else ''}: {field}: {reason}")

    data.setdefault("name", path.stem)
    for internal in ("source", "env_defaults"):
        if internal in data:
            raise fail(internal, "unknown field")
    data["source"] = label
    defaulted: list[str] = []
    keep = ENGINE_RESERVED if isinstance(data.get("engine"), dict) else frozenset()
    data = _expand(data, "", env, fail, defaulted, keep)
    if keep:
        _check_port_placement(data, fail)
    _check_header_values(data.get("default_headers"), fail)
    if isinstance(data.get("retry"), dict) and True in data["retry"]:
        raise fail("retry.on", "write `when:` (YAML 1.1 reads a bare `on` as true)")
    try:
        route = msgspec.convert(data, RouteConfig)
    except msgspec.ValidationError as exc:
        field, reason, _ = invalid_field(exc)
        raise fail(field or "file", _enum_hint(field, reason, data)) from None
    if defaulted:
        route = msgspec.structs.replace(route, env_defaults=tuple(defaulted))
    return _check(route, path.parent, fail)


def _read_yaml(path: Path) -> tuple[Any, Any]:
    """The document and its node tree (for line numbers); `ConfigError` naming the file otherwise."""
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
    return data, node


def load_dir(folder: Path | str, env: dict[str, str] | None = None, *, allow_empty: bool = False) -> list[RouteConfig]:
    """Every `*.yaml`/`*.yml` in `folder`, in file-name order; names must be unique.

    A folder without route files is an error at start-up (a typo in `--routes` would serve
    nothing but 404s); a reload may empty it (`allow_empty`): the operator removed the routes.
    """
    folder = Path(folder)
    if not folder.is_dir():
        what = "is not a directory" if folder.exists() else "does not exist"
        raise ConfigError(
            f"{folder}: routes folder: {what}{'' if folder.is_absolute() else f' (relative to {Path.cwd()})'}; "
            "pass --routes DIR or set "
            "LLMPROXY_ROUTES to a folder of route files (*.yaml)"
        )
    files = sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and not p.name.startswith("."))
    if not files and not allow_empty:
        raise ConfigError(
            f"{folder}: routes folder: no routes (no *.yaml or *.yml file); add one with at least "
            "`path:` and `upstream:` (see README, Route files)"
        )
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


def _expand(value: Any, field: str, env: Any, fail: Any, defaulted: list[str],
            keep: frozenset[str] = frozenset()) -> Any:  # fmt: skip
    if isinstance(value, str):
        try:
            # Only the upstream's defaults are worth a warning (a blank API key is normal).
            return expand_env(value, env, defaulted if field.startswith("upstream") else None, keep)
        except KeyError as exc:
            raise fail(field or "file", f"environment variable {exc.args[0]} is not set and has no default") from None
    if isinstance(value, dict):
        return {k: _expand(v, f"{field}.{k}" if field else str(k), env, fail, defaulted, keep) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{field}[{i}]", env, fail, defaulted, keep) for i, v in enumerate(value)]
    return value


_YAML_BOOLS = "YAML reads unquoted yes/no/on/off/true/false as booleans"


def _check_header_values(headers: Any, fail: Any) -> None:
    """msgspec says `default_headers[...]` for a non-string value; name the header and the fix."""
    if not isinstance(headers, dict):
        return
    for name, value in headers.items():
        if isinstance(value, str):
            continue
        if value is None:
            raise fail(f"default_headers.{name}", f'has no value; write `{name}: ""` for an empty value, or remove it')
        if isinstance(value, bool):
            raise fail(f"default_headers.{name}", f"must be a string, got {value!r} ({_YAML_BOOLS}); quote it")
        if isinstance(value, (int, float)):
            raise fail(f"default_headers.{name}", f'must be a string, got the number {value!r}; quote it: `{name}: "{value}"`')
        raise fail(f"default_headers.{name}", f"must be a string, got a {type(value).__name__}")


def _enum_hint(field: str, reason: str, data: dict[str, Any]) -> str:
    """For a field typed as a `Literal`, add the valid values to msgspec's reason, derived from
    the type itself, so every enum (`adapter`, `stream`, `reasoning`, and any added later) says
    what to write. A YAML boolean where a word was meant (`stream: yes`) gets its own hint."""
    values = _literal_values(field)
    if not values:
        return reason
    valid = ", ".join(repr(v) for v in values)
    value: Any = data
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, bool):
        meant = "always" if value and "always" in values else "never" if not value and "never" in values else None
        use = f"; write {field}: {meant}" if meant else ""
        return f"got {str(value).lower()} ({_YAML_BOOLS}): quote the word or use one of {valid}{use}"
    return f"{reason}; valid values: {valid}"


def _literal_values(field: str, root: type[msgspec.Struct] = RouteConfig) -> tuple[Any, ...]:
    """The values of the `Literal` type of `field` (a dotted path into `root`), in declared
    order, else ()."""
    import typing

    tp: Any = root
    parts = field.split(".")
    for k, part in enumerate(parts):
        if not (isinstance(tp, type) and issubclass(tp, msgspec.Struct)):
            return ()
        tp = typing.get_type_hints(tp).get(part)
        last = k == len(parts) - 1
        for member in typing.get_args(tp) if typing.get_origin(tp) is not Literal else ():
            # `X | None`: the struct or literal inside (`balance: Policy | Balance`: the literal at the end)
            if (isinstance(member, type) and issubclass(member, msgspec.Struct) and not last) or (
                    typing.get_origin(member) is Literal and last):
                tp = member
                break
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else ()


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
    upstreams: list[str] = []
    if r.engine is not None:
        _check_engine(r, folder, fail)
    for i, url in enumerate(r.upstreams):
        field = "upstream" if isinstance(r.upstream, str) else f"upstream[{i}]"
        url = url.replace(PORT, _PORT_PROBE)  # validated with a port in its place, kept as written below
        bad = _URL_BAD.search(url)
        if bad:
            what = "a space" if bad.group() == " " else f"the character {bad.group()!r}"
            raise fail(field, f"bad URL {url!r}: contains {what}, which a URL cannot carry "
                              "(percent-encode it, e.g. %20 for a space, or check the variable it came from)")
        url = normalize_url(url)
        upstreams.append(url)
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
        if PORT in r.upstreams[i]:
            upstreams[-1] = normalize_url(r.upstreams[i])
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
        if not meaningful(name, value):
            continue  # `${KEY:+Bearer ${KEY}}` with KEY unset, or `Bearer ${KEY:-}`: not sent at all
        headers[name] = value
    for glob in r.models:
        if not glob:
            raise fail("models", "an empty pattern matches nothing")
    t = r.timeout
    for f in ("connect", "read", "write", "pool"):
        if getattr(t, f) <= 0:
            raise fail(f"timeout.{f}", "must be a positive number of seconds")
    _check_body(r, fail)
    _check_resilience(r, fail)
    template = r.template
    if template not in BUILTIN:
        tpath = (folder / template) if not Path(template).is_absolute() else Path(template)
        if not tpath.is_file():
            builtin = " nor ".join(repr(b) for b in BUILTIN)
            raise fail("template", f"neither {builtin} nor an existing file: {tpath}")
        template = str(tpath)
    upstream: str | list[str] = upstreams[0] if isinstance(r.upstream, str) else upstreams
    engine = r.engine if r.engine is None else _resolve_program(r.engine, folder)
    return msgspec.structs.replace(r, methods=methods, default_headers=headers, template=template, upstream=upstream,
                                   engine=engine)  # fmt: skip


def meaningful(name: str, value: str) -> bool:
    """Whether a default header is worth sending once expanded: not empty, and not an
    `Authorization` scheme without its credential (`Bearer ` from an unset key)."""
    return bool(value) and not (name.lower() == "authorization" and value.lower() in AUTH_SCHEMES)


# Anything outside RFC 3986's characters (white space, controls, quotes, <>{}|\^`, non-ASCII),
# or a `%` that does not start an escape.
_URL_BAD = re.compile(r"[^A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]|%(?![0-9A-Fa-f]{2})")
_SLASHES = re.compile(r"/{2,}")
_DOUBLE_V1 = re.compile(r"/v1(?:/v1)+(?=/|$)")


def normalize_url(url: str) -> str:
    """A base URL written with `/v1` or a trailing slash (`QWEN_BASE_URL=http://h:8000/v1/`)
    in front of the route's `/v1/completions` must not become `/v1//v1/completions`:
    repeated slashes are collapsed and a doubled `/v1/v1` is built once."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    host, slash, path = rest.partition("/")
    if not slash:
        return url
    path = _DOUBLE_V1.sub("/v1", _SLASHES.sub("/", "/" + path))
    return f"{scheme}://{host}{path}"


def _check_resilience(r: RouteConfig, fail: Any) -> None:
    """`limits`, `retry`, `health`: numbers that make sense (README "Gatekeeping and resilience")."""
    if r.limits is not None:
        _check_limits(r.limits.max_concurrent, r.limits.queue, r.limits.queue_timeout, "limits", fail)
    if r.retry is not None:
        if r.retry.attempts < 1:
            raise fail("retry.attempts", "must be at least 1 (it counts the first try)")
        if r.retry.max_wait < 0:
            raise fail("retry.max_wait", "must be >= 0 seconds")
        for i, w in enumerate(r.retry.when):
            if isinstance(w, int) and not 400 <= w <= 599:
                raise fail(f"retry.when[{i}]", f"{w} is not an HTTP error status (400-599), 'connect' or 'timeout'")
    _check_balance(r.balancing, fail)
    if r.balance_load is not None:
        _check_balance_load(r, r.balance_load, fail)
    h = r.health
    if h is not None:
        if not h.path.startswith("/"):
            raise fail("health.path", f"must start with '/', got {h.path!r}")
        for f in ("interval", "timeout"):
            if getattr(h, f) <= 0:
                raise fail(f"health.{f}", "must be a positive number of seconds")
        for f in ("unhealthy_after", "healthy_after"):
            if getattr(h, f) < 1:
                raise fail(f"health.{f}", "must be at least 1")


def _check_balance(b: Balance, fail: Any) -> None:
    if b.spill_margin < 0:
        raise fail("balance.spill_margin", "must be >= 0 requests")
    if b.prompts < 2:
        raise fail("balance.prompts", "must be at least 2")
    s = b.session
    if s is None:
        return
    if s.header is None and not s.fields:
        raise fail("balance.session", "name a `header` or `fields` (e.g. header: x-session-id)")
    if s.header is not None and not _TOKEN.match(s.header):
        raise fail("balance.session.header", f"{s.header!r} is not a header name")
    for i, f in enumerate(s.fields):
        if not f or any(not part for part in f.split(".")):
            raise fail(f"balance.session.fields[{i}]", f"{f!r} is not a field path (e.g. metadata.user_id)")


def _check_balance_load(r: RouteConfig, load: BalanceLoad, fail: Any) -> None:
    b = r.balancing
    if b.policy == "round-robin" and b.session is None:
        raise fail("balance_load", "round-robin does not look at load: set `balance: least-busy` or `prefix`")
    if FACTS[r.dialect].load is None:
        reporting = " or ".join(name for name, facts in FACTS.items() if facts.load is not None)
        raise fail("balance_load", f"dialect {r.dialect} reports no load (dialect {reporting} does)")
    for f in ("interval", "timeout"):
        if not getattr(load, f) > 0:
            raise fail(f"balance_load.{f}", "must be a positive number of seconds")


def _check_limits(max_concurrent: int | None, queue: int, queue_timeout: float, field: str, fail: Any) -> None:
    if max_concurrent is not None and max_concurrent < 1:
        raise fail(f"{field}.max_concurrent", "must be at least 1")
    if queue < 0:
        raise fail(f"{field}.queue", "must be >= 0")
    if queue_timeout <= 0:
        raise fail(f"{field}.queue_timeout", "must be a positive number of seconds")


# --- the keys file (`serve --keys FILE`) ------------------------------------------------------


class KeyConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One inbound API key. `name` is what logs and metrics show; `key` never appears anywhere."""

    name: str
    key: str
    routes: tuple[str, ...] = ("*",)  # route-name globs
    max_concurrent: int | None = None
    queue: int = 0
    queue_timeout: float = 30.0
    # Quotas (proxy/state.py), counted from each answer's usage; shared with `serve --state`.
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    requests_per_minute: int | None = None
    admin: bool = False  # `GET /v1/usage` shows every key's usage, not only its own


QUOTAS = ("tokens_per_minute", "tokens_per_day", "requests_per_minute")  # the keys file's quota fields


class KeysFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    keys: tuple[KeyConfig, ...]


MAX_KEY_LENGTH = 512  # longer presented keys are refused before any comparison
MIN_KEY_LENGTH = 16  # shorter keys in the keys file are refused: guessable


def load_keys(path: Path | str, env: dict[str, str] | None = None) -> tuple[KeyConfig, ...]:
    """Read and validate a keys file: `FILE:LINE: keys[I].field: reason` on error."""
    path = Path(path)
    label = str(path)
    data, node = _read_yaml(path)
    lines = _all_lines(node)

    def fail(field: str, reason: str) -> ConfigError:
        probe = field
        while probe and probe not in lines:  # the nearest enclosing place YAML knows a line for
            probe = probe.rpartition(".")[0] if "." in probe else probe.rpartition("[")[0]
        line = lines.get(probe)
        return ConfigError(f"{label}{f':{line}' if line else ''}: {field}: {reason}")

    if not isinstance(data, dict):
        raise fail("file", f"expected a mapping with a `keys:` list, got {type(data).__name__}")
    data = _expand(data, "", env, fail, [])
    try:
        parsed = msgspec.convert(data, KeysFile)
    except msgspec.ValidationError as exc:
        field, reason, _ = invalid_field(exc)
        raise fail(field or "file", reason) from None
    names: dict[str, int] = {}
    secrets: dict[str, int] = {}
    for i, k in enumerate(parsed.keys):
        where = f"keys[{i}]"
        if not k.name.strip():
            raise fail(f"{where}.name", "must not be empty")
        if k.name in names:
            raise fail(f"{where}.name", f"{k.name!r} is already used by keys[{names[k.name]}]")
        names[k.name] = i
        if not k.key:
            raise fail(f"{where}.key", "must not be empty (an unset variable expands to nothing)")
        if k.key != k.key.strip() or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in k.key):
            raise fail(f"{where}.key", "must not contain white space or control characters")
        if len(k.key) < MIN_KEY_LENGTH:  # the message never quotes the key itself
            raise fail(f"{where}.key", f"key {k.name!r} is shorter than {MIN_KEY_LENGTH} characters; use a random one, "
                                       "e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
        if len(k.key.encode()) > MAX_KEY_LENGTH:
            raise fail(f"{where}.key", f"longer than {MAX_KEY_LENGTH} bytes")
        if k.key in secrets:  # the message never quotes the key itself
            raise fail(f"{where}.key", f"the same key as keys[{secrets[k.key]}] ({parsed.keys[secrets[k.key]].name!r})")
        secrets[k.key] = i
        if not k.routes or any(not g for g in k.routes):
            raise fail(f"{where}.routes", "must list route-name globs (leave it out for all routes)")
        _check_limits(k.max_concurrent, k.queue, k.queue_timeout, where, fail)
        if k.queue and k.max_concurrent is None:
            raise fail(f"{where}.queue", "needs max_concurrent")
        _check_quotas(k, where, fail)
    return parsed.keys


def _check_quotas(k: KeyConfig, where: str, fail: Any) -> None:
    for field in QUOTAS:
        value = getattr(k, field)
        if value is not None and value < 1:
            raise fail(f"{where}.{field}", "must be at least 1 (leave it out for no quota)")


def _all_lines(node: Any, prefix: str = "") -> dict[str, int]:
    """Every mapping key and list item -> 1-based line: `keys[1].key` -> 7."""
    out: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode):
                field = f"{prefix}.{k.value}" if prefix else str(k.value)
                out[field] = k.start_mark.line + 1
                out.update(_all_lines(v, field))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            field = f"{prefix}[{i}]"
            out[field] = item.start_mark.line + 1
            out.update(_all_lines(item, field))
    return out


def _check_body(r: RouteConfig, fail: Any) -> None:
    """`body:` values the upstream could only refuse, and routes that would answer 16 tokens."""
    body = r.body or Body()
    translating = r.adapter != "passthrough"
    for key, ceiling in body.limit.items():
        if key == "max_tokens" and ceiling == "auto":
            if FACTS[r.dialect].context is None:
                raise fail("body.limit.max_tokens", f"auto needs a tokenizer endpoint (dialect {_COUNTING}); "
                                                    f"dialect {r.dialect} needs a number")
            continue
        if isinstance(ceiling, bool) or not isinstance(ceiling, (int, float)) or ceiling <= 0:
            allowed = "auto or a positive number" if key == "max_tokens" else "a positive number"
            raise fail(f"body.limit.{key}", f"must be {allowed}, got {ceiling!r}")
    for where, value in (("defaults", body.defaults.get("max_tokens")), ("set", body.set.get("max_tokens"))):
        if value is None:
            continue
        if value == "auto" and where == "defaults":
            if FACTS[r.dialect].context is None:
                raise fail("body.defaults.max_tokens", f"auto needs a tokenizer endpoint (dialect {_COUNTING}); "
                                                       f"dialect {r.dialect} needs a number")
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            allowed = "auto or a positive integer" if where == "defaults" else "a positive integer"
            raise fail(f"body.{where}.max_tokens", f"must be {allowed}, got {value!r}")
    if translating and r.dialect == "openai" and not (
            isinstance(body.defaults.get("max_tokens"), int) or isinstance(body.set.get("max_tokens"), int)):
        raise fail("body.defaults.max_tokens", "dialect openai answers 16 tokens when a client sets no limit and has "
                                               "no tokenizer endpoint to learn the context: give a number")


def _key_lines(node: Any) -> dict[str, int]:
    """Top-level key -> 1-based line, so errors can point into the file."""
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}


# --- `engine:` (the route starts its own model server; proxy/engines.py) ---------------------

_SECRET_FLAG = re.compile(r"key|token|secret|passw", re.IGNORECASE)
PORT = "${PORT}"  # the engine's port, chosen by the proxy at each start
ENGINE_RESERVED = frozenset({"PORT"})  # never read from the environment in a route with `engine:`
_PORT_PROBE = "65535"  # stands in for `${PORT}` while a URL is validated (never sent anywhere)


def _check_port_placement(data: dict[str, Any], fail: Any) -> None:
    """`${PORT}` means something only in `engine.command` and `upstream`; anywhere else it
    would be sent as written, so say so."""

    def walk(value: Any, field: str) -> None:
        if isinstance(value, str):
            if "${PORT:" in value:
                raise fail(field, "write ${PORT}: in a route with engine: it is always set (the engine's port), "
                                  "so a default or alternative means nothing")
            if PORT in value and not (field.startswith("upstream") or field.startswith("engine.command")):
                raise fail(field, "${PORT} is only filled in in engine.command and upstream (it is the engine's port)")
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{field}.{k}" if field else str(k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{field}[{i}]")

    walk(data, "")


def _check_engine(r: RouteConfig, folder: Path, fail: Any) -> None:
    """What `llmproxy check` can know offline about an `engine:` before anything runs."""
    e = r.engine
    assert e is not None
    try:
        argv = e.argv
    except ValueError as exc:  # shlex: "No closing quotation"
        raise fail("engine.command", f"cannot be split as a shell would: {exc}") from None
    if not argv or not argv[0]:
        raise fail("engine.command", "is empty; name the program that serves the model, e.g. llama-server ...")
    program = _program_path(argv[0], folder)
    if program is None:
        where = "on PATH" if "/" not in argv[0] else "(relative paths are read from the routes folder)"
        raise fail("engine.command", f"program {argv[0]!r} not found {where}")
    if not os.access(program, os.X_OK) or not program.is_file():
        raise fail("engine.command", f"program {str(program)!r} is not an executable file")
    if not e.health.startswith("/"):
        raise fail("engine.health", f"must be a path starting with '/', got {e.health!r}")
    if e.start_timeout <= 0:
        raise fail("engine.start_timeout", "must be a positive number of seconds")
    if e.idle_ttl < 0:
        raise fail("engine.idle_ttl", "must be >= 0 seconds (0: never stop)")
    if e.stop_timeout < 0:
        raise fail("engine.stop_timeout", "must be >= 0 seconds")
    for name in e.env:
        if not name or "=" in name or "\0" in name:
            raise fail(f"engine.env.{name}", "is not an environment variable name")
    if e.group is not None and not e.group.strip():
        raise fail("engine.group", "must not be empty (leave it out for no group)")
    if not isinstance(r.upstream, str):
        raise fail("upstream", "a route with engine: has one upstream, the engine's: write it as one URL "
                               "(http://127.0.0.1:${PORT}/v1/completions)")
    in_command = any(PORT in a for a in argv)
    if in_command and PORT not in r.upstream:
        raise fail("upstream", "engine.command listens on ${PORT}, so the upstream must name it: "
                               "http://127.0.0.1:${PORT}/v1/completions")
    if PORT in r.upstream and not in_command:
        raise fail("engine.command", "the upstream names ${PORT}, but the command never passes it to the "
                                     "server (e.g. --port ${PORT})")
    if r.health is not None:
        raise fail("health", "a route with engine: checks its engine itself (engine.health); remove health:")


def _program_path(name: str, folder: Path) -> Path | None:
    """A bare name from PATH (as execvp finds it); a path, relative to the routes folder."""
    import shutil

    if "/" not in name:
        found = shutil.which(name)
        return Path(found) if found else None
    path = Path(name) if Path(name).is_absolute() else folder / name
    return path if path.exists() else None


def _resolve_program(e: EngineConfig, folder: Path) -> EngineConfig:
    """The command with its program as an absolute path, so the engine runs what `check` saw
    whatever the working directory (a reload, or `check` and `serve` started elsewhere)."""
    argv = e.argv
    program = _program_path(argv[0], folder)
    return msgspec.structs.replace(e, command=[str(program.resolve() if program else argv[0]), *argv[1:]])


def workers_refused(routes: list[RouteConfig], workers: int, flag: str | None = None) -> str | None:
    """`--workers N` with a route that starts its own engine would start N copies of the model
    (each worker owns its engines): refused, with what to do instead. Here, not in engines.py:
    the CLI asks before prometheus-client may be imported (it picks its mode on import)."""
    if workers <= 1:
        return None
    started = [r for r in routes if r.engine is not None]
    if not started:
        return None
    names = ", ".join(f"{r.name!r} ({r.source})" for r in started)
    flag = flag or f"--workers {workers}"
    return (f"{flag}: route(s) {names} start their own engine (engine:), and each worker would start "
            "its own copy of the model; serve them with --workers 1 (one process relays thousands of streams, "
            "see README \"Thousands of streams on one process\"), or run the model server yourself and point "
            "upstream: at it")
