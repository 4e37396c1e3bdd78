"""Engines on demand: a route with `engine:` starts its model server on the first request,
stops it when idle, and takes turns with the other engines of its group (README "Several
models on one GPU").

One `Engines` per app (`app.state.engines`) owns every process it starts. A request on an
engine route asks `Engines.get(route)` for its `Engine` and is admitted at once while the
engine runs (`admit`: one state test); otherwise it waits for the one start under way
(`wait`), however many requests arrive together. Each process:

- runs without a shell, in its own session (so its process group is its own: stops signal
  the group, never the proxy's), its stdout and stderr captured line by line into the
  proxy's log with the route named, the last lines kept for error messages;
- gets `PR_SET_PDEATHSIG` (SIGKILL) in the child before `exec`: the kernel kills it when
  the proxy dies in any way, `kill -9` included, with no helper process to keep alive
  (a reaper process would itself be one more thing `kill -9` can leave behind). Strictly,
  the kernel sends it when the *thread* that spawned the engine ends: the event loop's,
  which under `llmproxy serve` is the main thread. The signal reaches the engine process,
  not processes it starts itself; those go with the process group on every orderly stop
  (idle, group, reload, SIGTERM/SIGINT of the proxy);
- is stopped with SIGTERM to its process group, then SIGKILL after `stop_timeout`
  (llama-swap's `unloadTimeout` does the same, 10 s by default: its docs/configuration.md).

Groups: at most one engine of a group holds it (starting, running or stopping). A request
for another engine of the group queues (first come, first served); the holder then takes
no new requests (they queue behind, to start it again later), finishes the ones in flight,
stops, and only after its process has exited does the next one start. So a steady stream
to one model cannot hold the GPU against a waiting request for another: that request waits
at most for the holder's requests in flight, its stop and its own start.

Crashes: an engine that exits on its own is seen at once (its requests in flight get the
usual upstream error); the next request starts it again. Failed starts and crashes in a
row back off: the first restart is immediate, then 1, 2, 4 ... 60 s, during which requests
get 503 `engine_start_failed` with `Retry-After`; a minute of running forgives the past.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import aiohttp

from . import observe
from .config import PORT
from .errors import EngineStartFailed

if TYPE_CHECKING:
    from .config import EngineConfig
    from .reload import TableHolder
    from .routes import Route, RouteTable
    from .upstreams import Pool

log = logging.getLogger("llmproxy.engine")

TAIL_LINES = 20  # lines of the engine's output kept for a failed start's message
MESSAGE_LINES = 8  # of those, how many the 503 carries
BACKOFF_FIRST = 1.0  # seconds before a start after the second failure in a row; doubled for each after
BACKOFF_CAP = 60.0  # seconds: the longest wait between restarts of a crashing engine
FORGIVEN_AFTER = 60.0  # seconds of running after which earlier crashes no longer count
HEALTH_POLL = (0.05, 0.5)  # seconds between health checks while starting: first, then at most
TICK = 0.5  # seconds between looks at the route table (a reload is noticed within this)

STOPPED, STARTING, RUNNING, STOPPING = "stopped", "starting", "running", "stopping"
# `/v1/models` says what llama.cpp's router mode says (tools/server/server-models.h,
# `server_model_status_to_string`): loaded, loading, unloaded.
STATUS = {STOPPED: "unloaded", STARTING: "loading", RUNNING: "loaded", STOPPING: "unloaded"}

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_libc: Any = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - a libc that cannot be opened
        _libc = None


def _die_with_parent(parent: int) -> Any:
    """The child's last step before `exec`: ask the kernel for SIGKILL when the proxy dies; and
    if it already died between fork and here, exit (the signal would never come)."""

    def preexec() -> None:
        if _libc is not None:
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, chosen by the kernel, for `${PORT}`."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_taken(port: int, host: str = "127.0.0.1") -> bool:
    """Someone binds `port` now. SO_REUSEADDR, as servers set it: a closed connection's TIME_WAIT
    does not count, a listener (on this address or on all) does."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
        return False


class _Start:
    """One start under way and the requests waiting for it: admitted together when it succeeds
    (before anything else can run), so a group switch or a reload cannot strand them."""

    __slots__ = ("waiters", "ok", "outcome")

    def __init__(self) -> None:
        self.waiters = 0
        self.ok = False
        # What the waiters await: settled as soon as the start succeeds or fails, before a failed
        # process has been made to exit (that may take `stop_timeout`; the group waits for it).
        self.outcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.outcome.add_done_callback(_retrieved)

    def fail(self, exc: BaseException) -> None:
        if not self.outcome.done():
            self.outcome.set_exception(exc)


class Group:
    """Engines that must not run at the same time (one GPU): one holder, a FIFO of the others."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.holder: Engine | None = None
        self.queue: deque[tuple[Engine, asyncio.Future[None]]] = deque()

    async def acquire(self, engine: Engine) -> None:
        if self.holder is None and not self.queue:
            self.holder = engine
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.queue.append((engine, turn))
        if self.holder is None:
            self._grant()
        self.evict()
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # granted, then cancelled: hand it on
                self.release(engine)
            else:
                self.queue = deque(q for q in self.queue if q[1] is not turn)
            raise

    def release(self, engine: Engine) -> None:
        if self.holder is not engine:
            return
        self.holder = None
        self._grant()

    def _grant(self) -> None:
        """The group is free: the first in line that still waits holds it."""
        while self.queue:
            nxt, turn = self.queue.popleft()
            if not turn.done():
                self.holder = nxt
                turn.set_result(None)
                break

    def evict(self) -> None:
        """Someone waits: a running holder takes no new requests and stops once idle."""
        h = self.holder
        if h is not None and self.queue and h.state == RUNNING and not h.closing:
            log.info("engine of route %r: stopping once its requests in flight end, for the next engine of group %r",
                     h.name, self.name)
            h.drain("group")


class Engine:
    """One route's model server: its state, its process, the requests it serves."""

    def __init__(self, owner: Engines, route: Route, group: Group | None, predecessor: Engine | None) -> None:
        assert route.engine is not None
        self.owner = owner
        self.name = route.name
        self.config: EngineConfig = route.engine
        self.template = route.config.upstreams[0]
        self.group = group
        self.predecessor = predecessor  # the engine a reload replaced: it must be gone before this starts
        self.state = STOPPED
        self.closing = False  # takes no new request (a group switch or a reload waits for it)
        self.retired = False  # replaced or removed by a reload: stops once idle, never starts again
        self.cause = "idle"  # why it is closing
        self.inflight = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.failures = 0  # failed starts and crashes in a row
        self.not_before = 0.0  # monotonic: no start before this (backoff)
        self.last_failure = ""
        self.started_at = 0.0
        self.last_used = 0.0  # monotonic: when the last request ended (the idle clock)
        self._start: asyncio.Task[None] | None = None
        self._current: _Start | None = None
        self._stop: asyncio.Task[None] | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._pools: list[Pool] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self.attach(route)

    # --- the request side ---------------------------------------------------------------------

    def attach(self, route: Route) -> None:
        """A table's route uses this engine: its upstream follows the engine's port, and the
        route file's latest timings apply (a reload that changes only those restarts nothing)."""
        self.config = route.engine or self.config
        self.template = route.config.upstreams[0]  # with `${PORT}`; its path may change on a reload
        pool = route.pool
        if not any(p is pool for p in self._pools):
            self._pools = [*self._pools[-7:], pool]  # the tables in use; older ones are gone
            if self.port:
                pool.members[0].moved(self._url())

    def admit(self) -> bool:
        """The hot path: the engine runs and takes requests; count this one in."""
        if self.state == RUNNING and not self.closing:
            self.inflight += 1
            return True
        return False

    async def wait(self) -> None:
        """Start the engine, or join the start under way, and be admitted with it; raises
        `EngineStartFailed`. A caller that is cancelled (the client left) leaves cleanly."""
        while not self.admit():
            if self.retired:  # a request that matched a table a reload replaced while it waited
                raise self._retired_error()
            now = time.monotonic()
            if self.not_before > now:
                raise self._backoff_error(now)
            if self._start is None or self._start.done():
                self._begin_start()
            start = self._current
            assert start is not None
            start.waiters += 1
            try:
                await asyncio.shield(start.outcome)
            except BaseException:
                if start.ok:  # admitted at the start's success, then cancelled: give the slot back
                    self.leave()
                else:
                    start.waiters -= 1
                raise
            if start.ok:
                return

    def leave(self) -> None:
        """A request of this engine ended (its last byte, an error, or the client left)."""
        self.inflight -= 1
        if self.inflight or self.state != RUNNING:
            return
        if self.closing:
            self._begin_stop(self.cause)
        elif self.config.idle_ttl > 0:
            self._idle_from_now()

    def _idle_from_now(self) -> None:
        """The idle clock starts now. One timer at a time, which looks again when it fires: a
        request costs a clock reading, not a timer made and cancelled (3 us -> 0.3 us)."""
        self.last_used = time.monotonic()
        if self._idle is None:
            self._idle = asyncio.get_running_loop().call_later(self.config.idle_ttl, self._idle_over)

    def _retired_error(self) -> EngineStartFailed:
        return EngineStartFailed(f"the engine of route {self.name!r} is being replaced (the route file changed) or "
                                 "the proxy is stopping; send the request again", headers={"retry-after": "1"})

    def _backoff_error(self, now: float) -> EngineStartFailed:
        wait = self.not_before - now
        return EngineStartFailed(
            f"engine of route {self.name!r} failed {self.failures} time(s) in a row, the next start is in "
            f"{wait:.0f} s; last failure: {self.last_failure}",
            headers={"retry-after": str(max(1, round(wait)))},
        )

    # --- starting -----------------------------------------------------------------------------

    def _begin_start(self) -> None:
        self._current = start = _Start()
        self._start = self._spawn_task(self._run_start(start))
        self._start.add_done_callback(_retrieved)  # its waiters learn the outcome from `start.outcome`

    async def _run_start(self, start: _Start) -> None:
        try:
            await self._starting(start)
        except BaseException as exc:
            start.fail(exc if isinstance(exc, EngineStartFailed) else self._retired_error())
            raise
        start.outcome.set_result(None)

    async def _starting(self, start: _Start) -> None:
        if self._stop is not None and not self._stop.done():
            await asyncio.shield(self._stop)  # an idle stop still under way: let it finish first
        prev = self.predecessor
        while prev is not None and prev.state != STOPPED and not self.retired:
            await asyncio.sleep(0.05)  # a reload's old process holds the memory this one needs
        self.predecessor = None
        if self.group is not None:
            await self.group.acquire(self)
        if self.retired:
            if self.group is not None:
                self.group.release(self)
            raise self._retired_error()
        self.state = STARTING
        self.closing = False
        began = time.monotonic()
        try:
            await self._launch()
        except BaseException as exc:
            if isinstance(exc, EngineStartFailed):
                self._failed(exc.message)
                observe.engine_started(self.name, None)
                log.error("%s", exc.message)
                start.fail(exc)  # the waiting requests get their 503 now, not after the kill below
            await self._kill()
            self.state = STOPPED
            if self.group is not None:
                self.group.release(self)
            raise
        self.state = RUNNING
        self.started_at = time.monotonic()
        self.inflight += start.waiters
        start.ok = True
        observe.engine_started(self.name, self.started_at - began)
        log.info("engine of route %r is ready on port %d after %.1f s (pid %d)", self.name, self.port,
                 self.started_at - began, self.proc.pid if self.proc else 0)  # fmt: skip
        if self.group is not None:
            self.group.evict()
        if self.closing and self.inflight == 0:
            self._begin_stop(self.cause)
        elif self.inflight == 0 and self.config.idle_ttl > 0:
            self._idle_from_now()

    async def _launch(self) -> None:
        """Spawn the command on a fresh port and poll its health until it passes. The port is
        free when picked but not held (the engine binds it later): if the engine exits before it
        is ready while another process holds that port now, it lost that race, and is started once
        more on another port, within the same `start_timeout`. (llama-server logs "couldn't bind
        HTTP server socket" and exits, tools/server/server.cpp; uvicorn under vLLM exits on
        EADDRINUSE.)"""
        deadline = time.monotonic() + self.config.start_timeout
        try:
            await self._spawn(deadline)
        except EngineStartFailed:
            proc = self.proc
            if proc is None or proc.returncode is None or not port_taken(self.port):
                raise
            log.warning("engine of route %r exited before it was ready, and port %d is now held by another "
                        "process: starting it again on another port", self.name, self.port)  # fmt: skip
            await self._kill()  # it has exited: this takes what it left in its process group
            await self._spawn(deadline)

    async def _spawn(self, deadline: float) -> None:
        cfg = self.config
        self.port = port = free_port()
        argv = [a.replace(PORT, str(port)) for a in cfg.argv]
        self.tail.clear()
        log.info("starting the engine of route %r: %s", self.name, cfg.shown(argv))
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True, limit=1 << 20,
                env={**os.environ, **cfg.env} if cfg.env else None, preexec_fn=_die_with_parent(os.getpid()),
            )  # fmt: skip
        except OSError as exc:
            raise EngineStartFailed(f"engine of route {self.name!r} could not run {argv[0]}: {exc}") from None
        self.proc = proc
        for pool in self._pools:
            pool.members[0].moved(self._url())
        self._spawn_task(self._pump(proc))
        self._spawn_task(self._watch(proc))
        health = self._origin() + cfg.health
        pause = HEALTH_POLL[0]
        while True:
            if proc.returncode is not None:
                await asyncio.sleep(0.05)  # the last lines may still be in the pipe
                taken = f" (port {port}, its ${{PORT}}, is held by another process)" if port_taken(port) else ""
                raise self._start_error(f"exited with code {proc.returncode} before it was ready{taken}")
            if await self._healthy(health):
                return
            now = time.monotonic()
            if now >= deadline:
                raise self._start_error(f"was not ready within start_timeout ({cfg.start_timeout:g} s): "
                                        f"GET {cfg.health} did not answer 200")
            await asyncio.sleep(min(pause, deadline - now))
            pause = min(pause * 2, HEALTH_POLL[1])

    async def _healthy(self, url: str) -> bool:
        session = self.owner.session
        try:
            async with session.get(url, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=2)) as response:
                return response.status == 200  # llama.cpp answers 503 "Loading model" until then
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    def _start_error(self, why: str) -> EngineStartFailed:
        lines = [line for line in self.tail if line.strip()][-MESSAGE_LINES:]
        output = ("; its last output:\n" + "\n".join(lines)) if lines else "; it wrote nothing"
        return EngineStartFailed(f"engine of route {self.name!r} {why}{output}")

    def _url(self) -> str:
        return self.template.replace(PORT, str(self.port))

    def _origin(self) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(self._url())
        return f"{parts.scheme}://{parts.netloc}"

    async def _pump(self, proc: asyncio.subprocess.Process) -> None:
        """The engine's output, line by line, into the log (with the route named) and the tail."""
        stream = proc.stdout
        assert stream is not None
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line longer than the buffer: take what is there
                line = await stream.read(1 << 16)
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            self.tail.append(text)
            log.info("engine %r: %s", self.name, text)

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        """Notice at once an engine that exits on its own while it serves."""
        code = await proc.wait()
        if self.proc is not proc or self.state != RUNNING:
            return  # stopped on purpose, or a start that is failing (it reports itself)
        self.proc = None
        self.state = STOPPED
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        # Counted (and the backoff set) before the pause below: a request in that pause, STOPPED
        # already, would otherwise start the engine at once however many crashes came before.
        self._failed(f"exited with code {code} while serving")
        await asyncio.sleep(0.05)  # the last lines may still be in the pipe
        lines = "\n".join(list(self.tail)[-MESSAGE_LINES:])
        if lines and self.proc is None:  # (a start in the pause has cleared the tail for its own output)
            self.last_failure += f"; its last output:\n{lines}"
        observe.engine_stopped(self.name, "crash")
        log.error("engine of route %r exited on its own with code %d; the next request starts it again%s",
                  self.name, code, f" (after {self.not_before - time.monotonic():.0f} s)"
                  if self.not_before > time.monotonic() else "")  # fmt: skip
        if self.group is not None:
            self.group.release(self)

    def _failed(self, why: str) -> None:
        """A failed start or a crash: count it, and back off from the second in a row."""
        now = time.monotonic()
        if self.started_at and now - self.started_at >= FORGIVEN_AFTER:
            self.failures = 0
        self.failures += 1
        self.last_failure = why
        self.not_before = now + (0.0 if self.failures == 1 else min(BACKOFF_FIRST * 2.0 ** (self.failures - 2), BACKOFF_CAP))

    # --- stopping -----------------------------------------------------------------------------

    def drain(self, cause: str) -> None:
        """Take no new request; stop once the ones in flight have ended."""
        self.closing = True
        self.cause = cause
        if self.inflight == 0 and self.state == RUNNING:
            self._begin_stop(cause)

    def retire(self) -> None:
        """A reload removed or changed this engine's route: drain and stop, never start again."""
        self.retired = True
        if self.state in (RUNNING, STARTING):
            log.info("engine of route %r: the route changed or was removed; stopping it once its requests end",
                     self.name)
            self.drain("reload")

    def _idle_over(self) -> None:
        self._idle = None
        ttl = self.config.idle_ttl
        if self.state != RUNNING or self.inflight or self.closing or ttl <= 0:
            return  # busy: the last request to end starts the clock again
        left = self.last_used + ttl - time.monotonic()
        if left > 0:  # a request came and went since the timer was set
            self._idle = asyncio.get_running_loop().call_later(left, self._idle_over)
            return
        log.info("engine of route %r: no request for %g s (idle_ttl); stopping it", self.name, ttl)
        self._begin_stop("idle")

    def _begin_stop(self, cause: str) -> None:
        if self.state != RUNNING:
            return
        self.state = STOPPING
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self._stop = self._spawn_task(self._terminate(cause))

    async def _terminate(self, cause: str) -> None:
        await self._kill()
        self.state = STOPPED
        if cause != "crash":
            self.failures = 0
        observe.engine_stopped(self.name, cause)
        log.info("engine of route %r stopped (%s)", self.name, cause)
        if self.group is not None:
            self.group.release(self)

    async def _kill(self) -> None:
        """SIGTERM to the process group, SIGKILL after `stop_timeout`; returns once it exited."""
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), self.config.stop_timeout)
            except TimeoutError:
                log.warning("engine of route %r did not exit within stop_timeout (%g s) of SIGTERM; killing it",
                            self.name, self.config.stop_timeout)
                _signal_group(proc.pid, signal.SIGKILL)
                await proc.wait()
        _signal_group(proc.pid, signal.SIGKILL)  # whatever it started and left behind in its group
        if self.proc is proc:
            self.proc = None

    async def close(self) -> None:
        """The proxy is stopping: stop now, whatever is in flight (uvicorn drained it first)."""
        self.retired = True
        if self._start is not None and not self._start.done():
            self._start.cancel()
            try:
                await self._start
            except BaseException:  # noqa: BLE001 - cancelled or failed: either way it is down
                pass
        if self._stop is not None and not self._stop.done():
            await self._stop
        if self.state == RUNNING:
            self.state = STOPPING
            await self._terminate("shutdown")
        for task in list(self._tasks):
            task.cancel()

    def _spawn_task(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def status(self) -> str:
        return STATUS[self.state]


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # its own session: its group id is its pid
    except (ProcessLookupError, PermissionError):
        pass


class Engines:
    """Every engine of this proxy process: found by route, adopted from each new table."""

    def __init__(self) -> None:
        self.session: aiohttp.ClientSession | None = None  # for health checks; set by `run`
        self._by_key: dict[tuple[Any, ...], Engine] = {}
        # Engines a reload retired, for requests that matched the previous table a moment before
        # the swap: they are told to send again, rather than start a process the table dropped.
        self._retired: dict[tuple[Any, ...], Engine] = {}
        self._groups: dict[str, Group] = {}
        self._table: RouteTable | None = None
        self._closed = False
        self._preloaded: set[tuple[Any, ...]] = set()  # started once by `preload`, not again on every reload

    def get(self, route: Route) -> Engine:
        """The engine of an engine route (made on first use; nothing starts until `wait`)."""
        engine = self._by_key.get(route.engine_key)
        if engine is None:
            engine = self._retired.get(route.engine_key)
            if engine is not None:
                return engine
            # A new table's route before `run` adopted the table: the route's previous engine,
            # if any, must be gone before this one starts.
            prev = next((e for (name, *_), e in self._by_key.items() if name == route.name), None)
            engine = self._make(route, prev)
        elif engine._pools[-1] is not route.pool:
            engine.attach(route)
        return engine

    def _make(self, route: Route, predecessor: Engine | None = None) -> Engine:
        assert route.engine is not None
        name = route.engine.group
        group = None if name is None else self._groups.setdefault(name, Group(name))
        engine = self._by_key[route.engine_key] = Engine(self, route, group, predecessor)
        engine.retired = self._closed  # a request that slipped in after shutdown began starts nothing
        return engine

    def status(self, route_name: str) -> str | None:
        """`loaded`, `loading` or `unloaded` for the current engine of a route; None: no engine."""
        for (name, *_), engine in self._by_key.items():
            if name == route_name:
                return engine.status
        return None

    def processes(self) -> dict[str, int]:
        """Route name -> pid of every engine process alive now (draining ones included)."""
        return {e.name: e.proc.pid for e in (*self._by_key.values(), *self._retired.values()) if e.proc is not None}

    def adopt(self, table: RouteTable) -> None:
        """A new table: engines whose route is gone or whose command or group changed are
        retired (drained, then stopped); a changed one that was running starts again as soon as
        the old process is gone."""
        self._table = table
        wanted = {r.engine_key: r for r in table.routes if r.engine is not None}
        for key in wanted:
            self._retired.pop(key, None)
        for key, engine in list(self._by_key.items()):
            if key in wanted:
                engine.attach(wanted[key])
                continue
            del self._by_key[key]
            self._retired[key] = engine
            was_up = engine.state in (RUNNING, STARTING)
            engine.retire()
            successor = next((r for k, r in wanted.items() if k[0] == engine.name and k not in self._by_key), None)
            if successor is not None:
                new = self._make(successor, predecessor=engine)
                if was_up:
                    new._begin_start()  # nobody waits: a failure is in the log
        self._preload(wanted)

    def _preload(self, wanted: dict[tuple[Any, ...], Route]) -> None:
        """`preload: true`: start now what no request asked for yet (start-up, or a reload that
        adds the route), in file order; in a group only while the group is free, so preloading
        never evicts a model (the first preloaded engine of a group wins)."""
        claimed: set[str] = set()  # groups a preload of this pass already started in (its task has not run yet)
        for key, route in wanted.items():
            assert route.engine is not None
            if not route.engine.preload or key in self._preloaded:
                continue
            self._preloaded.add(key)
            engine = self._by_key.get(key) or self._make(route)
            group = engine.group
            if engine.state != STOPPED or (engine._start is not None and not engine._start.done()):
                continue
            if group is not None and group.name in claimed:
                log.info("engine of route %r is not preloaded: another engine of group %r is", engine.name, group.name)
                continue
            if group is not None and (group.holder is not None or group.queue):
                log.info("engine of route %r is not preloaded: group %r already holds route %r", engine.name,
                         group.name, group.holder.name if group.holder else group.queue[0][0].name)  # fmt: skip
                continue
            if group is not None:
                claimed.add(group.name)
            log.info("preloading the engine of route %r", engine.name)
            engine._begin_start()  # nobody waits: a failure is in the log, the first request tries again

    async def run(self, holder: TableHolder, session: aiohttp.ClientSession) -> None:
        """Follow the holder's table until cancelled."""
        self.session = session
        while True:
            table = holder.current
            if table is not self._table:
                self.adopt(table)
            await asyncio.sleep(TICK)

    async def close(self) -> None:
        self._closed = True
        engines = [*self._by_key.values(), *self._retired.values()]
        self._by_key.clear()
        self._retired.clear()
        await asyncio.gather(*(e.close() for e in engines), return_exceptions=True)


def _retrieved(done: asyncio.Future[Any]) -> None:
    """A start's failure reaches its waiters through `_Start.outcome` (and the log); mark the
    task's and the outcome's own exception as seen, so asyncio does not report it again."""
    if not done.cancelled():
        done.exception()
