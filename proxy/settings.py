"""What `llmproxy serve` hands to the app it starts, in each worker: one struct, one way through.

uvicorn starts the app from an import string (`proxy.app:app_from_env`), in this process
or in `--workers` processes, so the CLI's choices travel as environment variables. Each
field is the variable `LLMPROXY_<FIELD>`; `export` writes them, `WorkerSettings.from_env`
reads them back, and nothing else names them (the CLI's own defaults read `env_default`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

import msgspec

from .errors import ConfigError
from .state import DEFAULT_LEASE_TTL, DEFAULT_RESPONSES_MAX, DEFAULT_RESPONSES_TTL

DEFAULT_MAX_BODY = 10 * 2**20


class WorkerSettings(msgspec.Struct, frozen=True, kw_only=True):
    routes: str = "routes.d"  # the folder of route files
    max_body: int = DEFAULT_MAX_BODY  # largest request body, bytes
    reload: bool = False  # watch the folder in this process (with workers the supervisor does)
    keys: str | None = None  # the keys file, an absolute path (workers may not share the cwd)
    cors_origins: str | None = None  # as `--cors-origins` takes them
    otlp_endpoint: str | None = None  # traces over OTLP/HTTP; None: off
    otlp_content: bool = False  # record prompts and completions in spans
    max_upstream_connections: int = 0  # per process; 0: sized from the open-file limit
    ready_needs_upstreams: bool = False  # /readyz also fails while every upstream of a route is out
    # Shared state (proxy/state.py): the store's URL carries its password, so it travels only here.
    state: str | None = None
    state_failure: str = "open"
    state_lease_ttl: float = DEFAULT_LEASE_TTL
    responses_ttl: float = DEFAULT_RESPONSES_TTL
    responses_max: int = DEFAULT_RESPONSES_MAX

    def export(self, environ: MutableMapping[str, str] = os.environ) -> None:
        """Write every field that is set as its variable (None and False leave it as it is)."""
        for field in self.__struct_fields__:
            value = getattr(self, field)
            if value is not None and value is not False:
                environ[env_name(field)] = "1" if value is True else str(value)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> WorkerSettings:
        """The settings the variables hold; unset or empty ones keep the default. A flag is on
        unless empty or `0`; a number that is not one is a `ConfigError` naming the variable."""
        values: dict[str, object] = {}
        for field in cls.__struct_fields__:
            raw = environ.get(env_name(field))
            if not raw:
                continue
            values[field] = raw != "0" if isinstance(getattr(_DEFAULTS, field), bool) else raw
        try:
            return msgspec.convert(values, cls, strict=False)
        except msgspec.ValidationError as exc:
            field = str(exc).rpartition("$.")[2].rstrip("`") or "?"
            raise ConfigError(f"{env_name(field)}: {exc}") from None


_DEFAULTS = WorkerSettings()


def env_name(field: str) -> str:
    """The environment variable of a `WorkerSettings` field."""
    return "LLMPROXY_" + field.upper()


def env_default(field: str) -> str | None:
    """The variable's value as a CLI default (unset or empty: None)."""
    return os.environ.get(env_name(field)) or None
