"""`balance:`: which upstream of a route's list serves a request, and why.

LLM servers are not interchangeable: each keeps the prompt prefixes it has
computed (its prefix / KV cache), and an agent resends its whole, growing
conversation every turn. `prefix` sends a turn to the upstream that served
the longest earlier prompt of which this one is a continuation, so it meets
its cache; a prompt that continues none (a new conversation) goes to the
least-busy upstream. A load guard spills a turn to the least-busy upstream
when its own is more than `spill_margin` requests busier (a queue costs more
than a cache miss). A session key, when the client sends one, sticks a
conversation to one upstream the same way (guard and health still apply).

How the engines key their own caches, and what is borrowed from each:
- vLLM (`vllm/v1/core/kv_cache_utils.py`, `hash_block_tokens`): fixed blocks
  of `block_size` tokens (16 by default), each hashed with its parent block's
  hash, so one hash names a whole prefix; only full blocks are cached.
- SGLang's router (`sgl-router/src/policies/cache_aware.rs`): an approximate
  radix tree per worker over the request's raw *text* (no tokenizer in the
  router); the worker with the longest match if it covers more than
  `cache_threshold` of the prompt, else the one with the smallest tree; the
  shortest queue instead when loads differ by more than `balance_abs_threshold`
  (and `balance_rel_threshold`); LRU eviction by tree size.
- llama.cpp (`tools/server/server-context.cpp`, `get_available_slot`): the
  idle slot whose cached tokens share the longest common prefix with the
  prompt, if that covers more than `--slot-prompt-similarity` (0.1) of it,
  else the least recently used slot.

The proxy sees text, not tokens, so the unit is a chained hash of fixed
`BLOCK`-byte chunks of the UTF-8 prompt (vLLM's chaining over SGLang's text):
hash k names the prompt's first k + 1 KiB. A block of 1 KiB is about 250
tokens, coarse next to an engine's 16, but a turn appends thousands of tokens,
and it keeps hashing (xxh3, in C) to one call per KiB. What is remembered is
each served prompt's *tip*, the hash of its last full block, with the
upstream that served it: a later prompt holding that hash among its own
continues that prompt. Matching tips rather than any shared block is what
tells a new conversation from a continuation: every conversation of an agent
shares its long system prompt, and sending all that share it to the one
upstream that saw it first would pile the whole fleet's traffic onto it.
(The byte before the end is left out of the blocks: a passthrough body's
`messages` ends with `]`, which the next turn replaces with `,`.)

Memory is bounded: the tips live in two generations of dicts of `prompts` / 2
entries each; each served prompt's tip goes to the young one, and when that
is full the old one is dropped (an approximate LRU at O(1) per request, about
100 bytes per entry). An upstream marked down forgets its tips (its engine may
come back empty): each upstream has an epoch, and a tip of an older epoch is
ignored.

"In flight" is this process's count of requests sent and not finished (with
`--workers N`, each worker counts its own), plus, with `balance_load:`, what
each engine reports holding beyond it (proxy/engine_load.py), so proxy
replicas that cannot see each other's requests still avoid a loaded engine.
"""

from __future__ import annotations

import time
import typing
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import xxhash

if TYPE_CHECKING:
    from .config import Balance
    from .upstreams import Pool, Upstream

# The one table of policies: the route-file schema (`Policy`), `check`, errors and the README read it.
POLICIES: dict[str, str] = {
    "round-robin": "each upstream in turn (the default)",
    "least-busy": "the upstream with the fewest requests in flight from this process, ties in turn",
    "prefix": "the upstream that served the longest earlier prompt this one continues (its prefix cache holds "
              "it), unless it is more than `spill_margin` requests busier than the least-busy one; a new "
              "conversation goes to the least busy",
}
Policy = Literal["round-robin", "least-busy", "prefix"]
assert typing.get_args(Policy) == tuple(POLICIES), "POLICIES and Policy name the same policies"

# Why an upstream was chosen: the access log's `choice`, the span's `llmproxy.upstream.choice`,
# and the `reason` label of `llmproxy_upstream_choices` (counted by observe with the access line).
REASONS = ("round-robin", "least-busy", "affinity", "session", "spill", "failover")

BLOCK = 1024  # bytes of UTF-8 prompt per hashed block (~250 tokens)
MAX_BLOCKS = 4096  # a longer prompt is hashed up to its first 4 MiB (its tip is that block)
DEFAULT_PROMPTS = 16384  # prompt tips remembered per route (LRU): ~1.6 MiB
DEFAULT_MARGIN = 4  # requests: see README "Upstream lists" for the measurement behind it
MAX_SESSIONS = 16384  # session keys remembered per route (LRU)

_xxh = xxhash.xxh3_64_intdigest
_EMPTY = msgspec.Raw(b"")


def block_hashes(text: str | bytes, limit: int = MAX_BLOCKS) -> list[int]:
    """The chained hashes of the full `BLOCK`-byte chunks of `text` but its last byte, at most
    `limit` of them: hash k names the prompt's first (k + 1) blocks."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    n = min((len(data) - 1) // BLOCK, limit)
    if n <= 0:
        return []
    view = memoryview(data)
    out = [0] * n
    h = 0
    for k in range(n):
        h = out[k] = _xxh(view[k * BLOCK:(k + 1) * BLOCK], h)
    return out


class Hint:
    """What a request tells the balancer: its prompt's block hashes and its session key."""

    __slots__ = ("blocks", "session")

    def __init__(self, blocks: Sequence[int], session: str | None) -> None:
        self.blocks = blocks
        self.session = session


class Tips:
    """Served prompts' tips -> (upstream, its epoch then): two generations of dicts (module docstring)."""

    __slots__ = ("young", "old", "half")

    def __init__(self, capacity: int) -> None:
        self.young: dict[int, tuple[Upstream, int]] = {}
        self.old: dict[int, tuple[Upstream, int]] = {}
        self.half = max(1, capacity // 2)

    def __len__(self) -> int:
        return len(self.young) + len(self.old)

    def find(self, blocks: Sequence[int], up: Sequence[Upstream]) -> tuple[Upstream | None, int]:
        """The upstream in `up` that served the longest earlier prompt `blocks` continues, and that
        prompt's length in blocks (0: none)."""
        young, old = self.young, self.old
        if young.keys().isdisjoint(blocks) and old.keys().isdisjoint(blocks):
            return None, 0  # a new conversation: settled at C speed
        for k in range(len(blocks) - 1, -1, -1):
            h = blocks[k]
            hit = young.get(h) or old.get(h)
            if hit is not None and hit[0].epoch == hit[1] and hit[0] in up:
                return hit[0], k + 1
        return None, 0

    def add(self, tip: int, member: Upstream) -> None:
        young = self.young
        young[tip] = (member, member.epoch)
        if len(young) >= self.half:
            self.old = young
            self.young = {}


def _hints_type(fields: Sequence[str]) -> type[msgspec.Struct]:
    """A struct that reads only `prompt`, `messages` (raw, for hashing as sent) and the top-level
    names of the session `fields`; msgspec skips everything else without building it."""
    tops = list(dict.fromkeys(f.split(".")[0] for f in fields))
    spec: list[tuple[str, Any, Any]] = [("p", msgspec.Raw, _EMPTY), ("m", msgspec.Raw, _EMPTY)]
    rename = {"p": "prompt", "m": "messages"}
    for i, top in enumerate(tops):
        spec.append((f"f{i}", Any, None))
        rename[f"f{i}"] = top
    return msgspec.defstruct("Hints", spec, rename=rename)


class Balancer:
    """The choice for one route's pool (built once per route table)."""

    __slots__ = ("pool", "policy", "margin", "tips", "header", "fields", "sessions", "_decode", "_tops", "_seeds")

    def __init__(self, pool: Pool, config: Balance) -> None:
        self.pool = pool
        self.policy = config.policy
        self.margin = config.spill_margin
        self.tips = Tips(config.prompts)
        s = config.session
        self.header = s.header.lower().encode("latin-1") if s is not None and s.header else None
        self.fields = tuple(s.fields) if s is not None else ()
        self.sessions: OrderedDict[str, Upstream] = OrderedDict()
        needs_body = self.policy == "prefix" or self.fields
        hints = _hints_type(self.fields) if needs_body else None
        self._decode = msgspec.json.Decoder(hints).decode if hints is not None else None
        tops = list(dict.fromkeys(f.split(".")[0] for f in self.fields))
        # per field: the decoded struct's attribute, then the path inside it
        self._tops = tuple((f"f{tops.index(f.split('.')[0])}", f.split(".")[1:]) for f in self.fields)
        self._seeds = {m: _xxh(m.url.encode()) for m in pool.members}  # rendezvous hashing of sessions

    # --- per request: what the request says (in `prepare`) -------------------------------------

    def hint(self, call: Any, body: bytes, headers: Sequence[tuple[bytes, bytes]]) -> Hint:
        """The request's hint. `call.prompt` (translating calls) is the rendered prompt; otherwise
        the client's body gives its `prompt`, or its `messages` as serialised."""
        session = None
        if self.header is not None:
            for name, value in headers:
                if name == self.header:
                    session = value.decode("latin-1").strip() or None
                    break
        prompt = call.prompt if self.policy == "prefix" else None
        doc = None
        if self._decode is not None and body and ((self.policy == "prefix" and prompt is None) or
                                                   (session is None and self.fields)):
            try:
                doc = self._decode(body)
            except (msgspec.DecodeError, msgspec.ValidationError):
                doc = None  # not a JSON object: no prompt, no session (the upstream judges the body)
        if session is None and doc is not None:
            session = self._session(doc)
        blocks: Sequence[int] = ()
        if self.policy == "prefix":
            text = prompt if prompt is not None else (doc.p or doc.m) if doc is not None else None  # type: ignore[attr-defined]
            if isinstance(text, msgspec.Raw):
                text = bytes(text)
            if isinstance(text, (str, bytes)) and text:
                blocks = block_hashes(text)
        return Hint(blocks, session)

    def _session(self, doc: Any) -> str | None:
        for attr, path in self._tops:
            value = getattr(doc, attr)
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            if isinstance(value, (str, int)) and not isinstance(value, bool) and value != "":
                return str(value)
        return None

    # --- per request: the choice (when the exchange starts) ------------------------------------

    def choose(self, hint: Hint) -> tuple[Upstream, str]:
        """The upstream for this request and why; counts it in flight there until `release`.
        Raises `NoHealthyUpstream` when health checks have every upstream out."""
        pool = self.pool
        members = pool.members
        now = time.monotonic()
        up = [m for m in members if m.down_until <= now]
        if not up:
            if pool.health is not None:
                raise pool.all_out_error()
            up = list(members)  # all sitting out a connect failure: try anyway, one may be back
        least = pool.least_busy(up)
        home: Upstream | None = None
        reason = ""
        if hint.session is not None:
            home = self.sessions.get(hint.session)
            if home is None or home not in up:  # a session new to this process, or its upstream is down
                home = self._rendezvous(hint.session, up)
            reason = "session"
        if home is None and hint.blocks:
            home, _ = self.tips.find(hint.blocks, up)
            reason = "affinity"
        if home is not None:
            load = home.busy + home.reported - least.busy - least.reported
            chosen, reason = (home, reason) if load <= self.margin else (least, "spill")
        elif self.policy == "round-robin":
            chosen, reason = pool.pick(), "round-robin"
        else:
            chosen, reason = least, "least-busy"
        if chosen is least:
            pool.turned(chosen)  # ties among the least busy go round
        self._took(chosen, hint)
        return chosen, reason

    def _rendezvous(self, session: str, up: Sequence[Upstream]) -> Upstream:
        """The session's upstream by rendezvous hashing: the same in every worker process and after a
        restart, and when an upstream goes down only its sessions move."""
        key = session.encode()
        seeds = self._seeds
        return max(up, key=lambda m: _xxh(key, seeds[m]))

    def moved(self, hint: Hint, old: Upstream, new: Upstream) -> None:
        """Failover: the request left `old` (it refused the connect) for `new`."""
        old.busy -= 1
        self._took(new, hint)

    def release(self, member: Upstream) -> None:
        member.busy -= 1

    def _took(self, m: Upstream, hint: Hint) -> None:
        m.busy += 1
        if hint.blocks:
            self.tips.add(hint.blocks[-1], m)
        if hint.session is not None:
            sessions = self.sessions
            sessions[hint.session] = m
            sessions.move_to_end(hint.session)
            if len(sessions) > MAX_SESSIONS:
                sessions.popitem(last=False)
