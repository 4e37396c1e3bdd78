"""`serve --workers N`: uvicorn's worker supervisor, where a reload means "reload the routes".

uvicorn's supervisor (`uvicorn/supervisors/multiprocess.py`, `Multiprocess.handle_hup`)
answers SIGHUP by starting a new generation of workers and retiring the old one once
the new is ready. With a route file broken meanwhile the new workers cannot start:
the log gets their traceback plus uvicorn's "was not ready in time ... aborting the
restart" ERROR (uvicorn before the health-checked restart crash-loops instead). The
workers already reload in place on SIGHUP (`TableHolder.reload_on_sighup`), keeping
their table when a file is bad, so here the supervisor checks the folder once and only
then passes the signal on: a broken file is reported once, without a traceback, and
every worker keeps serving its table. A failed reload is counted here
(`llmproxy_reloads_total{result="failed"}`, summed in with the workers' files); each worker
counts its own successful reload.

With `--reload` the supervisor also watches the folder (the same fingerprint the
workers use) and signals the workers on a change, instead of each worker watching
and reporting a broken file on its own.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from uvicorn import Config
from uvicorn.supervisors import Multiprocess

from . import observe
from .config import workers_refused
from .reload import LAST_GOOD_ENV, TableHolder, build_table, fingerprint, rebuild, save_last_good
from .routes import RouteTable

log = logging.getLogger("llmproxy.reload")


class RouteSupervisor(Multiprocess):
    """uvicorn's `Multiprocess`, with SIGHUP (and, with `watch`, a changed folder) checked
    once here and passed on to the workers as SIGHUP."""

    def __init__(self, config: Config, sockets: list[socket.socket], folder: Path | str, *, watch: bool) -> None:
        if "target" in inspect.signature(Multiprocess.__init__).parameters:  # uvicorn < 0.31
            from uvicorn.server import Server

            super().__init__(config, target=Server(config).run, sockets=sockets)  # type: ignore[call-arg]
        else:
            super().__init__(config, sockets=sockets)
        self.folder = Path(folder)
        self.watch = watch
        self.snapshot = fingerprint(self.folder)  # the workers load what is there now
        # The last table that loaded, for a worker started while a file is broken (uvicorn
        # replaces a worker that dies): it serves that instead of failing to start.
        self.scratch = Path(tempfile.mkdtemp(prefix="llmproxy-routes-"))
        self.last_good = self.scratch / "last-good.json"
        save_last_good(RouteTable.from_dir(self.folder), self.last_good)
        os.environ[LAST_GOOD_ENV] = str(self.last_good)  # the workers are spawned with it

    def run(self) -> None:
        try:
            super().run()
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)

    # Where uvicorn spawns workers: at start, and a replacement for one that died.
    def init_processes(self) -> None:
        with sighup_held():
            super().init_processes()

    def keep_subprocess_alive(self) -> None:
        with sighup_held():
            super().keep_subprocess_alive()

    def handle_hup(self) -> None:
        self.snapshot = fingerprint(self.folder)
        self.reload_workers()

    def handle_signals(self) -> None:
        """Called by uvicorn's supervisor loop every half second: signals, then the folder."""
        super().handle_signals()
        if self.watch and not self.should_exit.is_set():
            snapshot = fingerprint(self.folder)
            if snapshot != self.snapshot:
                self.snapshot = snapshot
                self.reload_workers()

    def reload_workers(self) -> bool:
        """Validate the folder once; if it loads, tell every worker to reload from it."""
        # Only a failure is counted here (once); each worker counts its own successful reload.
        table = rebuild(build_table, self.folder, TableHolder.failed,
                        lambda ok: None if ok else observe.reloaded(False))  # fmt: skip
        if table is None:
            return False
        refused = workers_refused([r.config for r in table.routes], self.config.workers)
        if refused:  # each worker would start its own copy of the model
            log.error("%s: %s", TableHolder.failed, refused)
            observe.reloaded(False)
            return False
        save_last_good(table, self.last_good)
        pids = [p.pid for p in self.processes if p.pid is not None]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGHUP)
            except ProcessLookupError:  # a worker that just died; uvicorn replaces it
                pass
        log.info("routes reloaded from %s: told %d worker(s)", self.folder, len(pids))
        return True


@contextmanager
def sighup_held() -> Iterator[None]:
    """SIGHUP blocked while workers are spawned. The mask survives fork and exec, so a worker starts
    with it blocked: a SIGHUP sent before its app can handle it (the supervisor passes one on to
    every worker, a newcomer too) waits instead of killing it (SIGHUP's default action), and is
    taken once the handler is set (`TableHolder.reload_on_sighup` unblocks it). The supervisor's
    own SIGHUP meanwhile waits too, and is queued when the mask is restored."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def run(config: Config, folder: Path | str, *, watch: bool) -> None:
    """Bind once and run the workers under `RouteSupervisor` (uvicorn.run's `workers > 1` branch)."""
    sock = config.bind_socket()  # exits 3 (uvicorn's STARTUP_FAILURE) when the port is taken
    try:
        RouteSupervisor(config, [sock], folder, watch=watch).run()
    except KeyboardInterrupt:
        pass
