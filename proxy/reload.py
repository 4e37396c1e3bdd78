"""Holds the current route table; reload builds a new one and swaps it in one assignment.

What decides a reload is a fingerprint of the folder's files *as read through
their symlinks*, not file-system events: editors save by rename, and a
Kubernetes ConfigMap volume updates by swapping its `..data` symlink, which
leaves the visible file names (symlinks themselves) untouched. watchfiles only
wakes the check early; a periodic check catches whatever no event announced.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Generic, TypeVar

import anyio
import msgspec

from . import observe
from .config import RouteConfig, workers_refused
from .errors import ConfigError
from .routes import RouteTable

log = logging.getLogger("llmproxy.reload")

T = TypeVar("T")

POLL_INTERVAL = 1.0  # seconds between fingerprint checks when no event arrives
LAST_GOOD_ENV = "LLMPROXY_ROUTES_LAST_GOOD"  # set by the `--workers` supervisor (proxy/workers.py)


def fingerprint(folder: Path) -> bytes:
    """A digest of every visible file's name and content, read through symlinks.

    Hidden entries (`.swp` files, a ConfigMap's `..data` and `..2026_…` dirs)
    are skipped; what they hold is seen through the visible names.
    """
    h = hashlib.blake2b(digest_size=16)
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        return b"unreadable folder: " + str(exc).encode()
    for name in names:
        if name.startswith("."):
            continue
        try:
            data = (folder / name).read_bytes()
        except IsADirectoryError:
            continue
        except OSError as exc:  # a dangling symlink mid-swap, a file being replaced
            data = b"\0unreadable: " + str(exc).encode()
        h.update(b"%d:%s\0%d:" % (len(name), name.encode(), len(data)))
        h.update(data)
    return h.digest()


async def watch_folder(folder: Path, check: Callable[[], object], stop: anyio.Event, poll: float = POLL_INTERVAL,
                       only: Callable[[str], bool] | None = None) -> None:  # fmt: skip
    """Call `check()` on every change in `folder`, and at least every `poll` seconds, until `stop`.

    `check` compares content itself (a fingerprint): events only wake it early, and
    `yield_on_timeout` turns the silence into the periodic check. `only(name)` picks the
    file names whose events count (a keys file may share its folder with a busy log).
    """
    from watchfiles import awatch

    try:
        async for _ in awatch(
            folder,
            watch_filter=None if only is None else (lambda _change, path: only(os.path.basename(path))),
            debounce=300,
            step=30,
            rust_timeout=max(1, int(poll * 1000)),
            yield_on_timeout=True,
            recursive=False,
            stop_event=stop,
        ):
            check()
    except (OSError, RuntimeError) as exc:  # no inotify, the folder replaced, too many watches
        log.warning("cannot watch %s (%s); checking it every %gs instead", folder, exc, poll)
    while not stop.is_set():
        with anyio.move_on_after(poll):
            await stop.wait()
        check()


def rebuild(build: Callable[[Path], T], source: Path, failed: str, count: Callable[[bool], None]) -> T | None:
    """`build(source)`, or None after logging `failed: reason` (a bad file, or a bug: neither may
    end the watcher, nor the app with it); `count` tallies the result."""
    try:
        built = build(source)
    except ConfigError as exc:
        log.error("%s: %s", failed, exc)
        count(False)
        return None
    except Exception:
        log.exception("%s: unexpected error", failed)
        count(False)
        return None
    count(True)
    return built


def save_last_good(table: RouteTable, path: Path) -> None:
    """The validated route configs (templates already resolved to absolute paths), for
    `TableHolder.load(..., last_good=path)`; written whole, then renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(msgspec.json.encode([r.config for r in table.routes]))
    os.replace(tmp, path)


def build_table(folder: Path) -> RouteTable:
    """The table a reload builds: an empty folder is allowed then (routes removed on purpose)."""
    return RouteTable.from_dir(folder, allow_empty=True)


def _one_process_engines(table: RouteTable, last_good: Path | str | None) -> RouteTable:
    """A worker of `serve --workers N` (the supervisor hands it `last_good`) never serves a table
    with `engine:` routes, however it got there (uvicorn replacing a worker reads the folder
    again; a SIGHUP sent to one worker): each worker would start its own copy of the model."""
    if last_good:
        refused = workers_refused([r.config for r in table.routes], 2, "--workers N")
        if refused:
            raise ConfigError(refused)
    return table


class Reloadable(Generic[T]):
    """A value built from files (`source`), swapped whole when they change: `current` is read
    once per request, so a request keeps what it started with. A failed build keeps the
    previous value and is reported once (the snapshot is taken even then)."""

    failed = ""  # the log message of a failed build

    def __init__(self, current: T, source: Path | str | None = None, snapshot: bytes | None = None) -> None:
        self.current = current
        self.source = Path(source) if source is not None else None
        # The fingerprint `current` was built from; None: unknown, so the first check reloads.
        self.snapshot = snapshot
        self._stop: anyio.Event | None = None

    def _fingerprint(self, source: Path) -> bytes:
        raise NotImplementedError

    def _build(self, source: Path) -> T:
        raise NotImplementedError

    def _counted(self, ok: bool) -> None:
        """The reload metric."""

    def _loaded(self, value: T) -> None:
        """Log what a successful reload brought."""

    async def _watch(self, source: Path, stop: anyio.Event, poll: float) -> None:
        await watch_folder(source, self.reload, stop, poll)

    def reload(self, force: bool = False) -> bool:
        """Build again if the files changed (or `force`); keep the old value when they are bad."""
        if self.source is None:
            return False
        snapshot = self._fingerprint(self.source)
        if snapshot == self.snapshot and not force:
            return False
        self.snapshot = snapshot  # a broken file is reported once, not on every check
        value = rebuild(self._build, self.source, self.failed, self._counted)
        if value is None:
            return False
        self.current = value
        self._loaded(value)
        return True

    async def watch(self, poll: float = POLL_INTERVAL) -> None:
        """Reload on every change until cancelled (or `stop()`)."""
        assert self.source is not None, "watch() needs the files it reloads"
        self._stop = stop = anyio.Event()
        self.reload()  # edits made between `load()` and now
        await self._watch(self.source, stop, poll)

    def stop(self) -> None:
        """End `watch()` promptly: the watcher thread checks this event every few ms, while
        a cancellation would wait for its next timeout."""
        if self._stop is not None:
            self._stop.set()


class TableHolder(Reloadable[RouteTable]):
    """The route table, from the routes folder."""

    failed = "routes not reloaded, the previous table stays in service"

    @classmethod
    def load(cls, folder: Path | str, last_good: Path | str | None = None) -> TableHolder:
        """Snapshot first, then build: an edit landing in between shows up as a change later,
        instead of being mistaken for the state the table was built from.

        `last_good` (a file `save_last_good` wrote): when the folder does not load, serve the
        routes saved there rather than fail. A worker that `--workers` replaces while a file
        is broken then serves what the other workers serve, instead of crash-looping.
        """
        folder = Path(folder)
        snapshot = fingerprint(folder)
        try:
            table = _one_process_engines(RouteTable.from_dir(folder), last_good)
        except ConfigError as exc:
            if last_good is None or not Path(last_good).is_file():
                raise
            # A warning: the supervisor that saved `last_good` has already reported the broken file
            # as an error (on SIGHUP or the folder change), and the file must be reported once.
            log.warning("routes not loaded, serving the last table that loaded: %s", exc)
            table = RouteTable(msgspec.json.decode(Path(last_good).read_bytes(), type=list[RouteConfig]))
        return cls(table, folder, snapshot)

    def _fingerprint(self, source: Path) -> bytes:
        return fingerprint(source)

    def _build(self, source: Path) -> RouteTable:
        return _one_process_engines(build_table(source), os.environ.get(LAST_GOOD_ENV))

    def _counted(self, ok: bool) -> None:
        observe.reloaded(ok)

    def _loaded(self, table: RouteTable) -> None:
        log.info("routes reloaded from %s: %d route(s) on %d path(s)", self.source, len(table.routes), len(table.paths))

    @contextmanager
    def reload_on_sighup(self) -> Iterator[None]:
        """`kill -HUP` reloads now, changed or not. uvicorn leaves SIGHUP to the app.

        A `--workers` worker starts with SIGHUP blocked (`workers.sighup_held`): one sent while
        it started waits, and is taken here, once the handler is set.
        Does nothing without a folder, or off the main thread (tests run servers in threads),
        where signal handlers cannot be set.
        """
        import asyncio

        if self.source is None:
            yield
            return
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, self.reload, True)
        except (ValueError, RuntimeError, NotImplementedError, AttributeError):
            yield
            return
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        try:
            yield
        finally:
            with suppress(Exception):
                loop.remove_signal_handler(signal.SIGHUP)
