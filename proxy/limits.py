"""Concurrency limits with a bounded FIFO queue: a route's `limits:` and a key's `max_concurrent`.

A slot is held for the whole exchange (a stream until its last byte or until
the client leaves), per process: with `--workers N` each worker admits its own
`max_concurrent` — unless `serve --state` names a shared store, where a
`SharedLimiter` holds each slot as a lease in it (proxy/state.py). A freed slot is handed straight to the oldest waiter, so a
newcomer never overtakes the queue. A waiting client that disconnects leaves
the queue at once. Limiters live in a registry keyed by route or key name, so
a reload of the route table or of the keys file keeps the counts of requests
already in flight.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from time import perf_counter
from typing import TYPE_CHECKING, Any

from . import observe
from .errors import Overloaded

if TYPE_CHECKING:
    from .state import State

# A slot held: (the store's lease, or None for an in-process slot; when it was granted).
Hold = tuple[str | None, float]
_HOLD_WEIGHT = 0.2  # weight of the latest hold time in the running mean Retry-After is estimated from
POLL = 0.05  # seconds between two looks at a shared store's slots while requests queue here


class Limiter:
    """At most `max` holders; up to `queue` more wait first-in first-out for `timeout` seconds."""

    __slots__ = ("kind", "name", "max", "queue", "timeout", "config", "active", "waiters", "hold_time", "_started",
                 "_in_flight", "_queued", "_wait", "_rejections")  # fmt: skip

    def __init__(self, kind: str, name: str, max_concurrent: int, queue: int, timeout: float, config: object = None) -> None:
        self.kind = kind  # "route" or "key": names the setting in messages and metrics
        self.name = name
        self.active = 0
        self.waiters: deque[asyncio.Future[Hold]] = deque()
        self.hold_time = 0.0  # running mean of how long a slot is held, in seconds (0: none seen yet)
        self._started = 0.0  # sum of the grant times of the slots held now (their mean age)
        in_flight, queued, wait, rejections = observe.limit_children
        self._in_flight = in_flight(kind, name)
        self._queued = queued(kind, name)
        self._wait = wait(kind, name)
        self._rejections = rejections
        self.configure(max_concurrent, queue, timeout, config)

    def configure(self, max_concurrent: int, queue: int, timeout: float, config: object = None) -> None:
        """New settings from a reload; holders and waiters stay where they are."""
        self.max = max_concurrent
        self.queue = queue
        self.timeout = timeout
        self.config = config
        while self.active < self.max and self._grant(None):  # a raised limit admits waiters now
            self.active += 1
            self._in_flight.inc()

    def _granted(self, lease: str | None) -> Hold:
        now = perf_counter()
        self._started += now
        return lease, now

    def try_acquire(self) -> Hold | None:
        """Take a free slot without waiting (never ahead of someone queued)."""
        if self.active < self.max and not self.waiters:
            self.active += 1
            self._in_flight.inc()
            return self._granted(None)
        return None

    async def acquire(self, receive: Any) -> Hold | None:
        """A slot, waiting in the queue if need be. None: the client left while waiting.
        Raises `Overloaded` (429) when the queue is full or the wait ran out."""
        hold = self.try_acquire()
        if hold is not None:
            return hold
        return await self._queued_for(receive)

    async def _queued_for(self, receive: Any) -> Hold | None:
        if len(self.waiters) >= self.queue:
            raise self._reject("queue_full")
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[Hold] = loop.create_future()
        self.waiters.append(turn)
        self._queued.inc()
        left = loop.create_task(_client_leaves(receive))
        start = perf_counter()
        try:
            done, _ = await asyncio.wait((turn, left), timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled from outside (shutdown): give back what was granted
            self._leave(turn)
            raise
        finally:
            left.cancel()
            self._queued.dec()
            self._wait.observe(perf_counter() - start)
        if left in done:
            self._leave(turn)
            return None
        if turn.done():
            return turn.result()  # the releaser counted the slot as ours
        self._leave(turn)
        raise self._reject("queue_timeout")

    def release(self, hold: Hold) -> None:
        """Give the slot to the oldest waiter, or free it."""
        self._returned(hold)
        if not self._grant(None):
            self.active -= 1
            self._in_flight.dec()

    def _returned(self, hold: Hold) -> None:
        held = perf_counter() - hold[1]
        self._started -= hold[1]
        self.hold_time = held if not self.hold_time else self.hold_time + _HOLD_WEIGHT * (held - self.hold_time)

    def _grant(self, lease: str | None) -> bool:
        while self.waiters:
            turn = self.waiters.popleft()
            if not turn.done():
                turn.set_result(self._granted(lease))
                return True
        return False

    def _leave(self, turn: asyncio.Future[Hold]) -> None:
        if turn.done() and not turn.cancelled() and turn.exception() is None:
            self.release(turn.result())  # granted just as we gave up: pass it on
            return
        turn.cancel()
        try:
            self.waiters.remove(turn)
        except ValueError:
            pass

    def retry_after(self) -> str:
        """Seconds a refused client should wait: the line ahead of it (holders and queued) times how long
        a slot is typically held, over the slots; 1 at least, `queue_timeout` at most. Before any slot was
        given back, the mean age of the slots held now stands in for the hold time."""
        typical = self.hold_time
        if not typical and self.active:
            typical = perf_counter() - self._started / self.active
        wait = typical * (len(self.waiters) + 1) / max(1, self.max)
        return str(max(1, min(math.ceil(wait), math.ceil(self.timeout))))

    def _reject(self, reason: str) -> Overloaded:
        self._rejections(self.kind, self.name, reason).inc()
        setting = "limits" if self.kind == "route" else f"key {self.name!r}:"
        if reason == "queue_full":
            what = (f"{self.kind} {self.name!r} is at its limit: {self.active} request(s) in flight, "
                    f"{len(self.waiters)} queued ({setting} max_concurrent {self.max}, queue {self.queue})")
        else:
            what = (f"no free slot on {self.kind} {self.name!r} within {self.timeout:g} s "
                    f"({setting} queue_timeout)")
        wait = self.retry_after()
        return Overloaded(f"{what}; retry after {wait} s", headers={"retry-after": wait})


async def _client_leaves(receive: Any) -> None:
    # The body has been read: the next message is the client going away.
    while (await receive())["type"] != "http.disconnect":
        pass


class SharedLimiter(Limiter):
    """A limit counted in the shared store (`serve --state`): a slot is a lease there, renewed while
    held, so every process and replica shares `max_concurrent`. The queue is this process's own
    (arrival order per replica); its head looks for a slot anywhere, at once when one is freed
    here, else every `POLL` seconds. With the store down under `--state-failure open`, slots are
    counted in the process, as without `--state`."""

    __slots__ = ("state", "_pump", "_freed")

    def __init__(self, state: State, *args: Any) -> None:
        self.state = state
        self._pump: asyncio.Task[None] | None = None
        self._freed = asyncio.Event()
        super().__init__(*args)

    def configure(self, max_concurrent: int, queue: int, timeout: float, config: object = None) -> None:
        self.max = max_concurrent
        self.queue = queue
        self.timeout = timeout
        self.config = config
        self._freed.set()  # a raised limit: the queue's head looks again now

    async def _take(self) -> Hold | None:
        from .state import StoreDown

        try:
            lease = await self.state.take(self.kind, self.name, self.max)
        except StoreDown:  # --state-failure open: this process's own count, as without --state
            if self.active >= self.max:
                return None
            self.active += 1
            self._in_flight.inc()
            return self._granted(None)
        if lease is None:
            return None
        self.active += 1
        self._in_flight.inc()
        return self._granted(lease)

    def try_acquire(self) -> Hold | None:
        raise NotImplementedError("a shared slot is taken with `acquire`")

    async def acquire(self, receive: Any) -> Hold | None:
        if not self.waiters:
            hold = await self._take()  # StateUnavailable (503) under --state-failure closed
            if hold is not None:
                return hold
        if self._pump is None:
            self._pump = asyncio.get_running_loop().create_task(self._serve_queue())
        return await self._queued_for(receive)

    async def _serve_queue(self) -> None:
        try:
            while self.waiters:
                head = self.waiters[0]
                if head.done():
                    self.waiters.popleft()
                    continue
                try:
                    hold = await self._take()
                except Exception as exc:  # the store refused (closed policy): the head is answered with it
                    if not head.done():
                        self.waiters.popleft()
                        head.set_exception(exc)
                    continue
                if hold is None:
                    self._freed.clear()
                    try:
                        await asyncio.wait_for(self._freed.wait(), POLL)
                    except TimeoutError:
                        pass
                    continue
                if head.done():  # left while we looked: the slot goes back
                    self.release(hold)
                    continue
                self.waiters.popleft()
                head.set_result(hold)
        finally:
            self._pump = None

    def release(self, hold: Hold) -> None:
        self._returned(hold)
        self.active -= 1
        self._in_flight.dec()
        if hold[0] is not None:
            self.state.give(hold[0])
        self._freed.set()


class Limiters:
    """Every limiter of the process, by route or key name, kept across reloads."""

    def __init__(self, state: State | None = None) -> None:
        self._by_name: dict[tuple[str, str], Limiter] = {}
        self.state = state if state is not None and state.shared else None

    def get(self, kind: str, name: str, max_concurrent: int, queue: int, timeout: float, config: object) -> Limiter:
        """The limiter for `kind`/`name`, with `config`'s settings (compared by identity: cheap)."""
        lim = self._by_name.get((kind, name))
        if lim is None:
            args = (kind, name, max_concurrent, queue, timeout, config)
            lim = SharedLimiter(self.state, *args) if self.state is not None else Limiter(*args)
            self._by_name[(kind, name)] = lim
        elif lim.config is not config:
            lim.configure(max_concurrent, queue, timeout, config)
        return lim
