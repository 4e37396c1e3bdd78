"""The real engine in the loop: llama.cpp's `llama-server` serving a tiny random Qwen2.5 model.

Session fixtures `engine_bin` and `engine_model` build the server (tests/engine/build.sh, cached
outside the checkout) and write the model (tests/engine/make_model.py) on first use. When either
cannot be made the tests FAIL with the reason: `just test-engine` never skips silently.
`engine` is one shared server for the session; `start_engine(...)` starts another with its own
options (fault tests that must not disturb the shared one).
"""

from __future__ import annotations

import os
import shutil
import textwrap
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_model  # noqa: E402

from servers import free_port, wait_ready  # noqa: E402

# Small enough to be quick on 2 shared cores, big enough for every conversation the tests send.
CTX_PER_SLOT = 2048
SLOTS = 4
# The three faces, each a route to the same upstream.
FACES = {"chat": ("/v1/chat/completions", "chat-to-completions"),
         "messages": ("/v1/messages", "messages-to-completions"),
         "responses": ("/v1/responses", "responses-to-completions")}


class Engine:
    """A running llama-server: its base URL, and its log for failure messages."""

    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path, ctx_per_slot: int) -> None:
        self.url = url
        self.proc = proc
        self.log = log
        self.ctx_per_slot = ctx_per_slot

    def log_tail(self, n: int = 40) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])


@pytest.fixture(scope="session")
def engine_cache() -> Path:
    """The cache folder build.sh fills (builds once, then returns at once)."""
    if shutil.which("bash") is None:
        pytest.fail("test-engine: bash is needed to run tests/engine/build.sh")
    done = subprocess.run(["bash", str(HERE / "build.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable})  # fmt: skip
    if done.returncode != 0:
        tail = "\n".join(done.stderr.splitlines()[-30:])
        pytest.fail(f"test-engine: llama-server could not be built (tests/engine/build.sh exit "
                    f"{done.returncode}):\n{tail}", pytrace=False)  # fmt: skip
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def engine_bin(engine_cache: Path) -> Path:
    """Path to the built `llama-server`."""
    path = engine_cache / "bin" / "llama-server"
    if not os.access(path, os.X_OK):
        pytest.fail(f"test-engine: {path} is missing after build.sh", pytrace=False)
    return path


@pytest.fixture(scope="session")
def engine_model(engine_cache: Path) -> Path:
    """Path to the tiny model (written once per make_model.py and template version)."""
    path = make_model.model_path(engine_cache)
    if not path.exists():
        try:
            make_model.write_model(engine_cache / "src", path)
        except Exception as exc:  # a clear failure, not a skip
            pytest.fail(f"test-engine: could not write the tiny model {path}: {exc!r}", pytrace=False)
    return path


@contextmanager
def start_engine(binary: Path, model: Path, log_dir: Path, *, slots: int = SLOTS,
                 ctx_per_slot: int = CTX_PER_SLOT, extra: tuple[str, ...] = ()) -> Iterator[Engine]:  # fmt: skip
    """Start `llama-server` on a free loopback port; yield it once `/health` answers 200.

    The port is free when picked but bound by llama-server a moment later: taken in between (a
    client connection's ephemeral port), it exits with "couldn't bind HTTP server socket"
    (tools/server/server.cpp), and is started again on another (the session's one engine
    failing would fail every test)."""
    for attempt in range(3):
        port = free_port()
        log = log_dir / f"llama-server-{port}.log"
        args = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                "-c", str(ctx_per_slot * slots), "-np", str(slots), "-t", "2", "--no-webui",
                "--slots", "--metrics", *extra]  # fmt: skip
        with log.open("wb") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        engine = Engine(f"http://127.0.0.1:{port}", proc, log, ctx_per_slot)
        if attempt == 2 or not _lost_its_port(proc, engine.url, log):
            break
    try:
        wait_ready(proc, engine.url, log, within=60, path="/health")
        yield engine
    finally:
        proc.terminate()  # only the server this helper started
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _lost_its_port(proc: subprocess.Popen[bytes], url: str, log: Path, within: float = 60) -> bool:
    """Whether the engine exited at start-up because its port was taken; False once it answers."""
    import time

    import httpx

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return "couldn't bind HTTP server socket" in log.read_text(errors="replace")
        try:
            httpx.get(f"{url}/health", timeout=2)
            return False  # any answer (503 while loading): it holds its port
        except httpx.TransportError:
            time.sleep(0.05)
    return False


@pytest.fixture(scope="session")
def engine(engine_bin: Path, engine_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """One llama-server shared by the session's tests."""
    with start_engine(engine_bin, engine_model, tmp_path_factory.mktemp("engine")) as running:
        yield running


@pytest.fixture
def through(routes_dir: Callable[..., Path], proxy_for: Callable[..., str]) -> Callable[..., str]:
    """`through(upstream_url, extra="reasoning: think")` -> base URL of a proxy whose three faces
    route to that upstream with `dialect: llama.cpp` and the built-in `qwen2.5` template."""

    def start(upstream: str, extra: str = "") -> str:
        files = {name: f"path: {path}\nupstream: {upstream}/v1/completions\nadapter: {adapter}\n"
                       f"dialect: llama.cpp\ntemplate: qwen2.5\n{textwrap.dedent(extra)}"
                 for name, (path, adapter) in FACES.items()}
        return proxy_for(routes_dir(**files))

    return start
