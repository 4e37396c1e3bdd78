"""State that outlives one request: quotas and usage per key, stored responses, and (with
`serve --state redis://…`) concurrency slots shared by every process and replica.

Without `--state` everything here lives in the process (`Local`): each worker counts its
own quotas and keeps its own responses. With it, a Redis (or Valkey) holds them, and every
update is one Lua script, so two replicas never read-modify-write the same counter.

The client is redis-py's asyncio client (`redis.asyncio`): the reference client, kept by
Redis itself, with `EVALSHA` scripts that reload themselves after a server restart
(`AsyncScript.__call__` catches `NoScriptError`, redis/commands/core.py) and a connection
pool that reconnects on the next call after a failure (`Connection.disconnect` on error,
redis/asyncio/connection.py). Its defaults do not fit a proxy: a 5 s socket timeout and
three retries with back-off (`redis/_defaults.py`, `Redis.__init__`): a dead store would
hold every request for seconds. Here each call has `CALL_TIMEOUT` in all, one quick retry
(a pooled connection the server dropped), and after a failure the store is skipped for
`RETRY_DOWN` seconds: requests meanwhile are served by the failure policy at once. A call cut
by that timeout closes its connection rather than leave an answer unread on it
(`Connection.read_response`, `except BaseException` -> `disconnect`, redis/asyncio/connection.py).

`--state-failure open` (the default) serves with in-process limits while the store is down,
with a warning at most once a minute and `llmproxy_state_unavailable_total`; `closed`
answers 503 `state_store_unavailable`, naming the store. The store's URL is only ever shown
with its password masked.

The clock of every window and lease is the store's own (`TIME`), so replicas with skewed
clocks agree; plus an offset in seconds read from the key `llmproxy:clock` when it exists,
which tests set to move a window without waiting for it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar
from urllib.parse import parse_qs, urlsplit, urlunsplit

from .errors import ConfigError, Overloaded, StateUnavailable

if TYPE_CHECKING:
    from .config import KeyConfig

log = logging.getLogger("llmproxy.state")

FAILURE_POLICIES = ("open", "closed")  # `--state-failure`: the one list the CLI and the README use
SCHEMES = ("redis", "rediss")
# The query parameters a rediss:// URL may carry, handed to redis-py as they are (`parse_url` passes
# a parameter it has no parser for as a string, redis/asyncio/connection.py; `SSLConnection` takes
# them). Others are refused: one such as `socket_timeout` would override the timeouts below.
TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")  # the CA to trust; a client certificate
TLS_PARAMETERS = (*TLS_FILES, "ssl_cert_reqs", "ssl_check_hostname")
CALL_TIMEOUT = 0.3  # seconds, a whole store call (connect, one retry, answer)
SOCKET_TIMEOUT = 0.15  # seconds, one connect or one answer
RETRY_DOWN = 1.0  # seconds a failed store is skipped before it is tried again
WARN_EVERY = 60.0  # seconds between two "store unavailable" warnings
DEFAULT_LEASE_TTL = 10.0  # seconds a slot outlives its holder's last renewal (kill -9)
DEFAULT_RESPONSES_TTL = 3600.0  # seconds a stored response can be continued
DEFAULT_RESPONSES_MAX = 10_000  # responses kept in memory without --state
PREFIX = "llmproxy:"
CLOCK_KEY = PREFIX + "clock"
MINUTE, DAY = 60, 86400

T = TypeVar("T")


def _metrics() -> Any:
    # Not at import: the CLI reads this module's defaults before prometheus-client may be imported
    # (it picks its multiprocess mode then; proxy/cli.py `metrics_dir`).
    from . import observe

    return observe


def redact(url: str) -> str:
    """The URL with its password (and user) masked: the only form that is ever shown."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<the --state URL>"
    auth = "***@" if parts.password or parts.username else ""
    return urlunsplit((parts.scheme, f"{auth}{host}{port}", parts.path, "", ""))


def check_url(url: str) -> str:
    """`--state`'s value, checked; `ConfigError` (never quoting a password) otherwise."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ConfigError(f"--state: {redact(url)}: not a URL (expected redis://[:PASSWORD@]HOST:PORT/DB)") from None
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise ConfigError(f"--state: {redact(url)}: expected redis://[:PASSWORD@]HOST:PORT/DB or rediss://… (TLS)")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ConfigError(f"--state: {redact(url)}: the database must be a number, got {db!r}")
    for name, values in parse_qs(parts.query, keep_blank_values=True).items():
        if name not in TLS_PARAMETERS or parts.scheme != "rediss":
            raise ConfigError(f"--state: {redact(url)}: query parameter {name!r} not taken; a rediss:// URL takes "
                              f"{', '.join(TLS_PARAMETERS)}")  # fmt: skip
        if name in TLS_FILES and not os.path.isfile(values[-1]):
            raise ConfigError(f"--state: {name}: no such file: {values[-1]}")
    return url


class StoreDown(Exception):
    """The store did not answer (internal: turned into the failure policy's answer)."""


# --- the scripts: each update is one atomic step on the server --------------------------------

_NOW = """
local function now_ms()
  local t = redis.call('TIME')
  local offset = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + offset * 1000
end
"""

# KEYS: clock, slot set. ARGV: max, lease id, ttl ms. 1: the lease is taken.
TAKE = _NOW + """
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]) * 2)
return 1
"""

# KEYS: clock, slot set. ARGV: ttl ms, lease ids... Only leases still there are extended.
RENEW = _NOW + """
local now = now_ms()
local ttl = tonumber(ARGV[1])
local n = 0
for i = 2, #ARGV do n = n + redis.call('ZADD', KEYS[2], 'XX', 'CH', now + ttl, ARGV[i]) end
redis.call('PEXPIRE', KEYS[2], ttl * 2)
return n
"""

# ARGV: (slot set, lease id) pairs: leases given back.
GIVE = """
for i = 1, #ARGV - 1, 2 do redis.call('ZREM', ARGV[i], ARGV[i + 1]) end
return 1
"""

_WINDOWS = """
local now = now_ms() / 1000
local m, d = math.floor(now / 60), math.floor(now / 86400)
local p = ARGV[1]
local mk, dk = p .. ':m:' .. m, p .. ':d:' .. d
"""

# KEYS: clock. ARGV: key prefix, tokens_per_minute, tokens_per_day, requests_per_minute (0: none).
# {quota over, used, seconds to the window's end}, or {'', minute, day}: the request is counted in
# those windows (a refund names them: see CHARGE).
ADMIT = _NOW + _WINDOWS + """
local function get(k, f) return tonumber(redis.call('HGET', k, f) or '0') end
local tpm, tpd, rpm = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local mt, dt, mr = get(mk, 'tokens'), get(dk, 'tokens'), get(mk, 'requests')
local to_m, to_d = math.ceil((m + 1) * 60 - now), math.ceil((d + 1) * 86400 - now)
if tpm > 0 and mt >= tpm then return {'tokens_per_minute', mt, to_m} end
if tpd > 0 and dt >= tpd then return {'tokens_per_day', dt, to_d} end
if rpm > 0 and mr >= rpm then return {'requests_per_minute', mr, to_m} end
redis.call('HINCRBY', mk, 'requests', 1)
redis.call('EXPIRE', mk, 120)
redis.call('HINCRBY', dk, 'requests', 1)
redis.call('EXPIRE', dk, 172800)
redis.call('HINCRBY', p .. ':total', 'requests', 1)
return {'', m, d}
"""

# KEYS: clock. ARGV: key prefix, prompt tokens, completion tokens, the minute and day a request the
# proxy refused after ADMIT was counted in (0: none; it is taken back there, in windows still
# kept), then (slot set, lease id) pairs to give back: the leases of the request just answered
# ride along (one round trip instead of two).
CHARGE = _NOW + _WINDOWS + """
for i = 6, #ARGV - 1, 2 do redis.call('ZREM', ARGV[i], ARGV[i + 1]) end
if tonumber(ARGV[4]) > 0 then
  for _, k in ipairs({p .. ':m:' .. ARGV[4], p .. ':d:' .. ARGV[5], p .. ':total'}) do
    if tonumber(redis.call('HGET', k, 'requests') or '0') > 0 then redis.call('HINCRBY', k, 'requests', -1) end
  end
end
local t = tonumber(ARGV[2]) + tonumber(ARGV[3])
redis.call('HINCRBY', mk, 'tokens', t)
redis.call('EXPIRE', mk, 120)
redis.call('HINCRBY', dk, 'tokens', t)
redis.call('EXPIRE', dk, 172800)
redis.call('HINCRBY', p .. ':total', 'prompt_tokens', tonumber(ARGV[2]))
redis.call('HINCRBY', p .. ':total', 'completion_tokens', tonumber(ARGV[3]))
return t
"""

# KEYS: clock. ARGV: key prefixes... For each, 9 numbers (see `Usage.from_row`).
USAGE = _NOW + """
local now = now_ms() / 1000
local m, d = math.floor(now / 60), math.floor(now / 86400)
local out = {}
local function get(k, f) return tonumber(redis.call('HGET', k, f) or '0') end
for i = 1, #ARGV do
  local p = ARGV[i]
  local mk, dk, tk = p .. ':m:' .. m, p .. ':d:' .. d, p .. ':total'
  for _, v in ipairs({get(mk, 'tokens'), get(mk, 'requests'), get(dk, 'tokens'), get(dk, 'requests'),
                      get(tk, 'requests'), get(tk, 'prompt_tokens'), get(tk, 'completion_tokens'),
                      math.ceil((m + 1) * 60 - now), math.ceil((d + 1) * 86400 - now)}) do
    out[#out + 1] = v
  end
end
return out
"""


def _key_prefix(name: str) -> str:
    return f"{PREFIX}key:{name}"


def _slot_set(kind: str, name: str) -> str:
    return f"{PREFIX}slots:{kind}:{name}"


# --- in-process: the same operations, for one process --------------------------------------


class Admission(NamedTuple):
    """Where `State.admit` counted a request: in the store or this process, in which minute and day."""

    shared: bool
    minute: int
    day: int


class Usage:
    """A key's usage: the current minute and day, and totals since the store began."""

    __slots__ = ("minute_tokens", "minute_requests", "day_tokens", "day_requests", "requests", "prompt_tokens",
                 "completion_tokens", "minute_resets", "day_resets")  # fmt: skip

    def __init__(self, *row: int) -> None:
        for name, value in zip(self.__slots__, row):
            setattr(self, name, int(value))

    def as_json(self, k: KeyConfig, shared: bool) -> dict[str, Any]:
        return {
            "object": "key.usage", "name": k.name, "shared": shared,
            "minute": {"tokens": self.minute_tokens, "requests": self.minute_requests,
                       "tokens_limit": k.tokens_per_minute, "requests_limit": k.requests_per_minute,
                       "resets_in": self.minute_resets},
            "day": {"tokens": self.day_tokens, "requests": self.day_requests, "tokens_limit": k.tokens_per_day,
                    "resets_in": self.day_resets},
            "total": {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                      "completion_tokens": self.completion_tokens,
                      "tokens": self.prompt_tokens + self.completion_tokens},
        }  # fmt: skip


class Local:
    """Quotas, usage and responses of this process alone (no `--state`, or the store down under `open`).
    Fixed windows, as the scripts above: a minute is `floor(now / 60)`."""

    def __init__(self, responses_max: int = DEFAULT_RESPONSES_MAX) -> None:
        self.clock: Callable[[], float] = time.time  # tests move it
        self._counts: dict[tuple[str, str, int], list[int]] = {}  # (key, "m"|"d", window) -> [tokens, requests]
        self._totals: dict[str, list[int]] = {}  # key -> [requests, prompt, completion]
        self._responses: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self.responses_max = responses_max

    def _windows(self, name: str) -> tuple[float, int, int, list[int], list[int]]:
        now = self.clock()
        m, d = int(now // MINUTE), int(now // DAY)
        if len(self._counts) > 4096:  # drop windows that have passed
            for k in [k for k in self._counts if k[2] < (m if k[1] == "m" else d)]:
                del self._counts[k]
        return (now, m, d, self._counts.setdefault((name, "m", m), [0, 0]),
                self._counts.setdefault((name, "d", d), [0, 0]))

    def admit(self, name: str, tpm: int, tpd: int, rpm: int) -> tuple[str, int, int]:
        now, m, d, minute, day = self._windows(name)
        to_m, to_d = math.ceil((m + 1) * MINUTE - now), math.ceil((d + 1) * DAY - now)
        if tpm and minute[0] >= tpm:
            return "tokens_per_minute", minute[0], to_m
        if tpd and day[0] >= tpd:
            return "tokens_per_day", day[0], to_d
        if rpm and minute[1] >= rpm:
            return "requests_per_minute", minute[1], to_m
        minute[1] += 1
        day[1] += 1
        self._totals.setdefault(name, [0, 0, 0])[0] += 1
        return "", m, d

    def refund(self, name: str, m: int, d: int) -> None:
        """Take back a request counted by `admit` in minute `m` and day `d` (windows still kept)."""
        counts = self._counts.get((name, "m", m)), self._counts.get((name, "d", d)), self._totals.get(name)
        for count, i in zip(counts, (1, 1, 0)):  # [tokens, requests] twice, then [requests, prompt, completion]
            if count is not None and count[i] > 0:
                count[i] -= 1

    def charge(self, name: str, prompt: int, completion: int) -> None:
        _, _, _, minute, day = self._windows(name)
        minute[0] += prompt + completion
        day[0] += prompt + completion
        total = self._totals.setdefault(name, [0, 0, 0])
        total[1] += prompt
        total[2] += completion

    def usage(self, names: list[str]) -> list[Usage]:
        out = []
        for name in names:
            now, m, d, minute, day = self._windows(name)
            total = self._totals.get(name, [0, 0, 0])
            out.append(Usage(*minute, *day, *total, math.ceil((m + 1) * MINUTE - now), math.ceil((d + 1) * DAY - now)))
        return out

    def save(self, rid: str, blob: bytes, ttl: float) -> None:
        self._responses[rid] = (time.monotonic() + ttl, blob)
        self._responses.move_to_end(rid)
        while len(self._responses) > self.responses_max:
            self._responses.popitem(last=False)

    def load(self, rid: str) -> bytes | None:
        found = self._responses.get(rid)
        if found is None:
            return None
        if found[0] < time.monotonic():
            del self._responses[rid]
            return None
        return found[1]


# --- the store, with its failure policy -----------------------------------------------------


class State:
    """What the gateway asks about keys, slots and responses; backed by Redis when `url` is given."""

    def __init__(self, url: str | None = None, *, failure: str = "open", lease_ttl: float = DEFAULT_LEASE_TTL,
                 responses_ttl: float = DEFAULT_RESPONSES_TTL, responses_max: int = DEFAULT_RESPONSES_MAX) -> None:  # fmt: skip
        if failure not in FAILURE_POLICIES:
            raise ConfigError(f"--state-failure: expected one of {', '.join(FAILURE_POLICIES)}, got {failure!r}")
        self.local = Local(responses_max)
        self.failure = failure
        self.lease_ttl = lease_ttl
        self.responses_ttl = responses_ttl
        self.label = redact(url) if url else "in-process"
        self.redis: Any = None
        self.held: dict[str, set[str]] = {}  # slot set -> lease ids this process holds (renewed)
        self._gives: list[str] = []  # leases given back and not yet removed: slot set, id, slot set, id...
        self._down_until = 0.0
        self._was_down = False
        self._warned = -math.inf
        self._tasks: set[asyncio.Task[Any]] = set()
        if url is not None:
            self._connect(check_url(url))

    @property
    def shared(self) -> bool:
        return self.redis is not None

    def _connect(self, url: str) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.redis = Redis.from_url(
            url, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=SOCKET_TIMEOUT,
            retry=Retry(NoBackoff(), 1),  # one retry at once: a pooled connection the server closed
        )  # fmt: skip
        self._take, self._renew, self._give_script, self._admit, self._charge, self._usage = (
            self.redis.register_script(s) for s in (TAKE, RENEW, GIVE, ADMIT, CHARGE, USAGE))
        _metrics().state_up.set(1)

    # The one place the policy is applied.
    async def _call(self, what: Callable[[], Awaitable[T]]) -> T:
        """`what()` on the store within `CALL_TIMEOUT`; `StoreDown` when it fails (policy `open`),
        `StateUnavailable` (503, policy `closed`)."""
        from redis.exceptions import RedisError

        if time.monotonic() < self._down_until:
            return self._unavailable(None)
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                result = await what()
        except (RedisError, OSError, TimeoutError) as exc:
            self._down_until = time.monotonic() + RETRY_DOWN
            self._was_down = True
            _metrics().state_up.set(0)
            return self._unavailable(exc)
        if self._was_down:
            self._was_down = False
            self._warned = -math.inf  # the next outage is reported at once
            _metrics().state_up.set(1)
            log.warning("shared state store %s answers again", self.label)
        return result

    def _unavailable(self, exc: BaseException | None) -> Any:
        _metrics().state_unavailable.labels(policy=self.failure).inc()
        now = time.monotonic()
        if now - self._warned >= WARN_EVERY:
            self._warned = now
            why = type(exc).__name__ if exc is not None else "down"
            then = ("serving with in-process limits (each process counts its own)" if self.failure == "open"
                    else "answering 503 to requests that need it")
            log.warning("shared state store %s unavailable (%s): %s until it answers (--state-failure %s)",
                        self.label, why, then, self.failure)  # fmt: skip
        if self.failure == "closed":
            raise StateUnavailable(f"the shared state store {self.label} is unavailable (--state-failure closed); "
                                   "retry shortly")
        raise StoreDown

    # Slots (only with a store: without one `limits.Limiter` counts in the process).
    async def take(self, kind: str, name: str, max_concurrent: int) -> str | None:
        """A lease on one of `max_concurrent` slots shared by every process, or None when all are taken.
        Raises `StoreDown` (serve from the process's own count) or `StateUnavailable`."""
        key = _slot_set(kind, name)
        lease = os.urandom(8).hex()
        ttl = int(self.lease_ttl * 1000)
        if not await self._call(lambda: self._take(keys=[CLOCK_KEY, key], args=[max_concurrent, lease, ttl])):
            return None
        self.held.setdefault(key, set()).add(lease)
        return f"{key}\n{lease}"

    def give(self, lease: str) -> None:
        """Free a lease, without waiting (it expires by itself if this fails). The removal goes with
        the request's `charge` when one follows at once (the gateway's case), else on its own."""
        key, _, lease_id = lease.partition("\n")
        ids = self.held.get(key)
        if ids is not None:
            ids.discard(lease_id)
        if not self._gives:
            self._spawn(self._give())
        self._gives += (key, lease_id)

    async def _give(self) -> None:
        gives, self._gives = self._gives, []
        if not gives:
            return  # a charge took them
        try:
            await self._call(lambda: self._give_script(args=gives))
        except (StoreDown, StateUnavailable):
            pass

    async def renew_forever(self) -> None:
        """Extend the leases this process holds, three times per TTL, while it lives."""
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            ttl = int(self.lease_ttl * 1000)
            for key, ids in list(self.held.items()):
                if not ids:
                    del self.held[key]
                    continue
                args = [ttl, *ids]
                try:
                    await self._call(lambda: self._renew(keys=[CLOCK_KEY, key], args=args))
                except (StoreDown, StateUnavailable):
                    break

    # Quotas and usage per key.
    async def admit(self, k: KeyConfig) -> Admission:
        """Count a request of key `k`, or refuse it with a 429 naming the quota it is over. The answer
        says where it was counted, so `charge` can take it back if the proxy refuses it later."""
        quotas = (k.tokens_per_minute or 0, k.tokens_per_day or 0, k.requests_per_minute or 0)
        found: Any = None
        if self.redis is not None:
            try:
                found = await self._call(lambda: self._admit(keys=[CLOCK_KEY], args=[_key_prefix(k.name), *quotas]))
            except StoreDown:
                pass
        if found is None:
            over, used, wait = self.local.admit(k.name, *quotas)
        else:
            over, used, wait = found[0].decode() if isinstance(found[0], bytes) else found[0], found[1], found[2]
        if not over:
            return Admission(found is not None, int(used), int(wait))  # counted: its minute and day
        limit = getattr(k, over)
        wait = max(1, int(wait))
        raise Overloaded(f"key {k.name!r} is over its {over} quota ({used} of {limit} used in this "
                         f"{'day' if over == 'tokens_per_day' else 'minute'}); retry after {wait} s",
                         headers={"retry-after": str(wait)})  # fmt: skip

    async def charge(self, name: str, prompt: int, completion: int, refund: Admission | None = None) -> None:
        """Charge an answer's tokens to key `name` (after the answer: it may overshoot by its own size).
        `refund`: the request never reached the upstream (a concurrency 429, a 503, the client left
        the queue), so its count toward `requests_per_minute` is taken back where `admit` made it."""
        if prompt:
            _metrics().key_tokens.labels(key=name, kind="prompt").inc(prompt)
        if completion:
            _metrics().key_tokens.labels(key=name, kind="completion").inc(completion)
        windows = (0, 0)
        if refund is not None:
            if refund.shared:
                windows = (refund.minute, refund.day)
            else:
                self.local.refund(name, refund.minute, refund.day)
        if self.redis is not None:
            gives, self._gives = self._gives, []
            try:
                await self._call(lambda: self._charge(keys=[CLOCK_KEY],
                                                      args=[_key_prefix(name), prompt, completion, *windows, *gives]))
                return
            except (StoreDown, StateUnavailable):
                pass  # the answer is out: counted here rather than lost (the leases expire)
        self.local.charge(name, prompt, completion)

    async def usage(self, names: list[str]) -> tuple[list[Usage], bool]:
        """The keys' usage, and whether it is the store's (False: this process's, the store down)."""
        if self.redis is not None:
            try:
                flat = await self._call(lambda: self._usage(keys=[CLOCK_KEY], args=[_key_prefix(n) for n in names]))
                return [Usage(*flat[i * 9:(i + 1) * 9]) for i in range(len(names))], True
            except StoreDown:
                pass
        return self.local.usage(names), False

    # Stored responses (the Responses face's `previous_response_id`).
    async def save_response(self, rid: str, blob: bytes) -> None:
        if self.redis is not None:
            try:
                await self._call(lambda: self.redis.set(PREFIX + "resp:" + rid, blob, px=int(self.responses_ttl * 1000)))
                return
            except StoreDown:
                pass
        self.local.save(rid, blob, self.responses_ttl)

    async def load_response(self, rid: str) -> bytes | None:
        if self.redis is not None:
            try:
                found = await self._call(lambda: self.redis.get(PREFIX + "resp:" + rid))
                if found is not None:
                    return found
            except StoreDown:
                pass
        return self.local.load(rid)  # also what was saved here while the store was down

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The lease renewals while the app serves; the connections closed after."""
        if self.redis is None:
            yield
            return
        renewals = asyncio.ensure_future(self.renew_forever())
        try:
            yield
        finally:
            renewals.cancel()
            for ids in self.held.values():
                ids.clear()
            try:
                await asyncio.wait_for(self.redis.aclose(), 1)
            except Exception:  # closing a dead store's pool: nothing to report
                pass
