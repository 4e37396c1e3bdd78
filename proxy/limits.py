"""Concurrency limits with a bounded FIFO queue: a route's `limits:` and a key's `max_concurrent`.

A slot is held for the whole exchange (a stream until its last byte or until
the client leaves), per process: with `--workers N` each worker admits its own
`max_concurrent`. A freed slot is handed straight to the oldest waiter, so a
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
from typing import Any

from . import observe
from .errors import Overloaded


class Limiter:
    """At most `max` holders; up to `queue` more wait first-in first-out for `timeout` seconds."""

    __slots__ = ("kind", "name", "max", "queue", "timeout", "config", "active", "waiters",
                 "_in_flight", "_queued", "_wait", "_rejections")  # fmt: skip

    def __init__(self, kind: str, name: str, max_concurrent: int, queue: int, timeout: float, config: object = None) -> None:
        self.kind = kind  # "route" or "key": names the setting in messages and metrics
        self.name = name
        self.active = 0
        self.waiters: deque[asyncio.Future[None]] = deque()
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
        while self.active < self.max and self._grant():  # a raised limit admits waiters now
            self.active += 1
            self._in_flight.inc()

    def try_acquire(self) -> bool:
        """Take a free slot without waiting (never ahead of someone queued)."""
        if self.active < self.max and not self.waiters:
            self.active += 1
            self._in_flight.inc()
            return True
        return False

    async def acquire(self, receive: Any) -> bool:
        """A slot, waiting in the queue if need be. False: the client left while waiting.
        Raises `Overloaded` (429) when the queue is full or the wait ran out."""
        if self.try_acquire():
            return True
        if len(self.waiters) >= self.queue:
            raise self._reject("queue_full")
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[None] = loop.create_future()
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
            return False
        if turn.done():
            return True  # the releaser counted the slot as ours
        self._leave(turn)
        raise self._reject("queue_timeout")

    def release(self) -> None:
        """Give the slot to the oldest waiter, or free it."""
        if not self._grant():
            self.active -= 1
            self._in_flight.dec()

    def _grant(self) -> bool:
        while self.waiters:
            turn = self.waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return True
        return False

    def _leave(self, turn: asyncio.Future[None]) -> None:
        if turn.done() and not turn.cancelled():
            self.release()  # granted just as we gave up: pass it on
            return
        turn.cancel()
        try:
            self.waiters.remove(turn)
        except ValueError:
            pass

    def retry_after(self) -> str:
        """Seconds a refused client should wait: how long a queued one may wait (1 at least)."""
        return str(max(1, math.ceil(self.timeout)))

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


class Limiters:
    """Every limiter of the process, by route or key name, kept across reloads."""

    def __init__(self) -> None:
        self._by_name: dict[tuple[str, str], Limiter] = {}

    def get(self, kind: str, name: str, max_concurrent: int, queue: int, timeout: float, config: object) -> Limiter:
        """The limiter for `kind`/`name`, with `config`'s settings (compared by identity: cheap)."""
        lim = self._by_name.get((kind, name))
        if lim is None:
            lim = self._by_name[(kind, name)] = Limiter(kind, name, max_concurrent, queue, timeout, config)
        elif lim.config is not config:
            lim.configure(max_concurrent, queue, timeout, config)
        return lim
