"""The processes under test: the mock upstream and the proxy, each its own process on 127.0.0.1.

CPU and memory are read from /proc so that the figure belongs to one process
and not to the load generator sharing the two cores.
"""

from __future__ import annotations

import ctypes
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"  # loopback only, always
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 20.0

PASSTHROUGH_ROUTE = """\
name: bench-completions
path: /v1/completions
upstream: {upstream}/v1/completions
timeout: {{connect: 5, read: 60}}
"""
CHAT_ROUTE = """\
name: bench-chat
path: /v1/chat/completions
upstream: {upstream}/v1/completions
adapter: chat-to-completions
timeout: {{connect: 5, read: 60}}
"""


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads), fields 14 and 15 of /proc/PID/stat."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of the process in seconds: user space (Python) and the kernel (syscalls, TCP)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name (field 2) may hold spaces; the fields after it are fixed.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def tree(pid: int) -> list[int]:
    """`pid` and its descendants (uvicorn's workers under `--workers N`)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def tree_cpu(pid: int) -> float:
    """CPU seconds of `pid` and its live descendants."""
    total = 0.0
    for p in tree(pid):
        try:
            total += cpu_seconds(p)
        except OSError:
            pass
    return total


def tree_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of `pid` and its live descendants."""
    user = system = 0.0
    for p in tree(pid):
        try:
            u, s = cpu_split(p)
        except OSError:
            continue
        user += u
        system += s
    return user, system


def tree_rss(pid: int) -> float:
    """RSS (MiB) of `pid` and its live descendants."""
    total = 0.0
    for p in tree(pid):
        try:
            total += rss_mib(p)
        except (OSError, RuntimeError):
            pass
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # A killed bench must not leave servers behind: PR_SET_PDEATHSIG (1) = SIGTERM.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class Child:
    """One server process; `stop()` is safe to call twice."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        """CPU seconds of the process and its workers, if any."""
        return tree_cpu(self.pid)

    def rss(self) -> float:
        return tree_rss(self.pid)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _spawn(name: str, argv: list[str], env: dict[str, str], cwd: Path, logdir: Path) -> Child:
    log = logdir / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    return Child(name, proc, log)


def _get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection(HOST, port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def _wait_ready(child: Child, port: int, path: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise StartError(f"{child.name} exited with code {child.proc.returncode}:\n{child.log_tail()}")
        try:
            if _get(port, path) == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise StartError(f"{child.name} not ready on port {port} after {START_TIMEOUT:.0f} s:\n{child.log_tail()}")


class StartError(RuntimeError):
    """A server did not come up; the message carries the end of its log."""


@dataclass
class Stack:
    mock: Child
    mock_port: int
    proxy: Child
    proxy_port: int
    chat_missing: str | None  # why the chat route could not be loaded, or None
    src: Path


def _check_chat(python: str, env: dict[str, str], src: Path, folder: Path) -> str | None:
    """Load the chat route alone (`llmproxy check`): None when it loads, else the reason."""
    only = folder.parent / "chat-only"
    only.mkdir(exist_ok=True)
    (only / "chat.yaml").write_text((folder / "chat.yaml").read_text())
    done = subprocess.run([python, "-m", "proxy", "check", "--routes", str(only)], env=env, cwd=src,
                          capture_output=True, text=True, timeout=60)
    if done.returncode == 0:
        return None
    lines = [ln for ln in (done.stderr or done.stdout).strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else f"check exited {done.returncode}"


def bench_env(src: Path) -> dict[str, str]:
    """The servers' environment: no HTTP proxy variables, and the `proxy` package under test first."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    # `python -m proxy` must import the copy under test first (the editable install comes after).
    env["PYTHONPATH"] = str(src) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


@contextmanager
def start(src: Path, python: str = sys.executable, chat: bool = True, serve_args: tuple[str, ...] = ()) -> Iterator[Stack]:
    """Start the mock upstream and the proxy (`src` holds the `proxy` package); stop both on exit.

    `serve_args`: more `llmproxy serve` options (`--workers 2`)."""
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llmproxy-bench-")))
        env = bench_env(src)
        mock_port = free_port()
        upstream = f"http://{HOST}:{mock_port}"
        env["QWEN_BASE_URL"] = upstream  # belt and braces: never the shipped default address
        mock = _spawn("mock-upstream", [python, "-m", "proxy", "mock-upstream", "--host", HOST, "--port", str(mock_port)],
                      env, src, tmp)
        stack.callback(mock.stop)
        _wait_ready(mock, mock_port, "/v1/models")

        routes = tmp / "routes.d"
        routes.mkdir()
        (routes / "completions.yaml").write_text(textwrap.dedent(PASSTHROUGH_ROUTE.format(upstream=upstream)))
        (routes / "chat.yaml").write_text(textwrap.dedent(CHAT_ROUTE.format(upstream=upstream)))
        chat_missing = _check_chat(python, env, src, routes) if chat else "not requested"
        if chat_missing is not None:
            (routes / "chat.yaml").unlink()

        proxy_port = free_port()
        proxy = _spawn("proxy", [python, "-m", "proxy", "serve", "--routes", str(routes), "--host", HOST,
                                 "--port", str(proxy_port), "--log-level", "warning", *serve_args], env, src, tmp)
        stack.callback(proxy.stop)
        _wait_ready(proxy, proxy_port, "/readyz")
        yield Stack(mock, mock_port, proxy, proxy_port, chat_missing, src)


@contextmanager
def pipe(stack: Stack, python: str, script: Path) -> Iterator[tuple[Child, int]]:
    """The byte pipe (`pipe.py`) in front of the mock: (its process, its port); stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="llmproxy-pipe-") as tmp:
        port = free_port()
        child = _spawn("pipe", [python, str(script), "--port", str(port), "--upstream-port", str(stack.mock_port)],
                       dict(os.environ), script.parent, Path(tmp))
        try:
            _wait_ready(child, port, "/v1/models")
            yield child, port
        finally:
            child.stop()
