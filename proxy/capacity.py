"""File descriptors and upstream connections: how many streams one process can hold, said out loud.

Every open stream holds two sockets: the client's and the upstream's. Linux
starts processes with a soft open-file limit of 1024 on many systems (the hard
limit is usually far higher), which would cap a proxy near 500 streams and make
it fail in confusing ways past that. So at start-up `raise_open_files` lifts the
soft limit to the hard one and the CLI logs both figures.

The upstream connection limit (`--max-upstream-connections`) is the one cap on
concurrent upstream requests. Past it a request is refused at once with a 503
that names the limit (`UpstreamSlots.take`), never parked waiting for a
connection (aiohttp's own pool limit would park it silently, for as long as an
earlier stream lasts). By default it is sized from the descriptor limit, so the
process refuses cleanly before descriptors run out; if they do run out anyway
(other descriptors, a lower limit), `errors.from_exhaustion` turns EMFILE into a 503
naming the limit rather than blaming the upstream.
"""

from __future__ import annotations

import logging
import os
import resource

from .errors import ProcessLimit

log = logging.getLogger("llmproxy")

WATCH_INTERVAL = 10.0  # seconds between two counts of the open descriptors
WARN_AT = 0.9  # share of the open-file limit in use that earns a warning

# Descriptors kept out of the per-stream budget: the listening socket, log files, the
# event loop's own (epoll, signal pipe), the route folder watcher, a metrics scrape.
RESERVED = 64
PER_STREAM = 2  # the client's socket and the upstream's


def raise_open_files() -> tuple[int, int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit. Returns (soft before, soft after, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        # Linux refuses an infinite soft limit for files; fs.nr_open (default 1048576) is the ceiling.
        target = _nr_open()
    else:
        target = hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # a sandbox may refuse: keep what we have, the log line says which
    after, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, after, hard


def open_files() -> int:
    """The soft open-file limit now in force."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def default_connections(files: int | None = None) -> int:
    """Upstream connections the descriptor limit leaves room for (two descriptors per stream)."""
    files = open_files() if files is None else files
    return max(1, (files - RESERVED) // PER_STREAM)


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


class UpstreamSlots:
    """Counts the upstream requests in flight in this process against `limit` (0: no limit).

    `take()` is False when the limit is reached; the caller answers `refusal()` at once.
    Cheap enough for every request: an integer compare and increment, no lock (one event loop).
    """

    __slots__ = ("limit", "busy", "refused")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.busy = 0
        self.refused = 0

    def take(self) -> bool:
        if self.limit and self.busy >= self.limit:
            self.refused += 1
            return False
        self.busy += 1
        return True

    def give(self) -> None:
        self.busy -= 1

    def refusal(self, route: str) -> ProcessLimit:
        return ProcessLimit(
            f"the proxy holds its limit of {self.limit} upstream connections (--max-upstream-connections); "
            f"request for route {route!r} not forwarded: retry shortly, or raise the limit or add replicas",
            code="upstream_connections_exhausted",
            headers={"retry-after": "1"},
        )


def usage_warning(in_use: int, limit: int) -> str | None:
    """The warning to log when `in_use` descriptors come close to `limit`, else None."""
    if limit <= 0 or in_use < WARN_AT * limit:
        return None
    return (
        f"open files: {in_use} of the limit of {limit} in use; past it new client connections are closed at once "
        "(uvloop accepts and drops them) and upstream connects fail with a 503: raise the limit (ulimit -n, "
        "LimitNOFILE=, the container's nofile), lower --max-upstream-connections or add replicas"
    )


async def watch(interval: float = WATCH_INTERVAL) -> None:
    """Count this process's descriptors every `interval` s; warn (once a minute at most) near the limit.

    Out of descriptors, libuv accepts each new connection and closes it straight away, with no
    log line of its own: without this the only trace would be clients seeing resets.
    """
    import anyio

    last = -1e9
    while True:
        await anyio.sleep(interval)
        try:
            in_use = len(os.listdir("/proc/self/fd"))
        except OSError:
            return  # not Linux: nothing to count cheaply
        message = usage_warning(in_use, open_files())
        now = anyio.current_time()
        if message is not None and now - last >= 60:
            log.warning(message)
            last = now


UNLIMITED = UpstreamSlots(0)  # for an Exchange run outside `create_app` (tests that build the scope themselves)
