"""Engines on demand with the real llama-server (proxy/engines.py; README "Several models on
one GPU"): the lifecycle tests/test_engines.py plays with a script engine, here with the
engine this project builds (`just test-engine`) and its tiny model, two routes of the same
gguf standing for two models of one GPU."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.app import create_app
from proxy.reload import TableHolder
from servers import free_port, run_app, stop, wait_ready
from test_engines import alive, metric, wait_for


def llama_route(name: str, engine_bin: Path, model: Path, *, models: str = "", engine: str = "",
                extra: tuple[str, ...] = ()) -> str:  # fmt: skip
    argv = [str(engine_bin), "-m", str(model), "--host", "127.0.0.1", "--port", "${PORT}", "-c", "2048", "-np", "2",
            "-t", "2", "--no-webui", *extra]  # fmt: skip
    return textwrap.dedent(f"""\
        name: {name}
        path: /v1/completions
        {f"models: [{models}]" if models else ""}
        upstream: http://127.0.0.1:${{PORT}}/v1/completions
        engine:
          command: {json.dumps(argv)}
          stop_timeout: 5
        """) + textwrap.indent(textwrap.dedent(engine), "  ")


class Served:
    """An in-process proxy over a reloading routes folder, its engine log, its engines."""

    def __init__(self, base: str, app: Any, records: list[logging.LogRecord]) -> None:
        self.base = base
        self.app = app
        self.records = records

    def ask(self, model: str = "m", **kw: Any) -> httpx.Response:
        body = {"model": model, "prompt": "Hello", "max_tokens": 4, "temperature": 0, **kw}
        return httpx.post(f"{self.base}/v1/completions", json=body, timeout=120)

    def pids(self) -> dict[str, int]:
        return self.app.state.engines.processes()

    def log(self) -> list[str]:
        return [r.getMessage() for r in self.records]

    def models(self) -> dict[str, str]:
        data = httpx.get(f"{self.base}/v1/models", timeout=5).json()["data"]
        return {m["id"]: m["status"]["value"] for m in data}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    from contextlib import ExitStack

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("llmproxy.engine")
    saved = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    with ExitStack() as stack:

        def start(**files: str) -> Served:
            folder = tmp_path / "routes.d"
            folder.mkdir(exist_ok=True)
            for name, text in files.items():
                (folder / f"{name}.yaml").write_text(text)
            app = create_app(TableHolder.load(folder), reload=True, poll_interval=0.1)
            return Served(stack.enter_context(run_app(app)), app, records)

        try:
            yield start
        finally:
            stack.close()
            log.removeHandler(handler)
            log.setLevel(saved)


def test_twenty_first_requests_start_one_llama_server(served, engine_bin, engine_model):
    s = served(a=llama_route("real-burst", engine_bin, engine_model))
    assert s.models() == {"real-burst": "unloaded"}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"model": "m", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
            return await asyncio.gather(*(client.post(f"{s.base}/v1/completions", json=body) for _ in range(20)))

    answers = asyncio.run(burst())
    assert [r.status_code for r in answers] == [200] * 20, answers[0].text
    assert all(r.json()["object"] == "text_completion" for r in answers)
    assert sum("starting the engine of route 'real-burst'" in m for m in s.log()) == 1, "one process for all"
    assert metric("llmproxy_engine_starts_total", route="real-burst", result="ok") == 1
    assert any(m.startswith("engine 'real-burst': ") for m in s.log()), "llama-server's output is in the log"
    assert s.models() == {"real-burst": "loaded"}


def test_idle_stop_never_cuts_a_stream_and_the_next_request_restarts(served, engine_bin, engine_model):
    # idle_ttl 2 s: the stream below must reach the proxy within it of this first answer (0.5 s was
    # tight on a loaded machine), and last well past it: 3000 tokens (3.2 s for 2000 measured here),
    # in the one slot of 4096 that `-c 4096 -np 1` gives (the later flags win: common/arg.cpp).
    s = served(a=llama_route("real-idle", engine_bin, engine_model, engine="idle_ttl: 2\n",
                             extra=("-c", "4096", "-np", "1")))
    assert s.ask().status_code == 200  # the idle clock runs from here
    pid = s.pids()["real-idle"]
    # At once a stream longer than idle_ttl: the timer fires while it is in flight, and must not stop
    # the engine (`ignore_eos`: llama-server writes all of n_predict, tools/server/README.md).
    body = {"model": "m", "prompt": "Hello", "max_tokens": 3000, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{s.base}/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: {"))
        began = time.monotonic()
        rest = [line for line in lines if line.startswith("data: ")]
        took = time.monotonic() - began
    assert r.status_code == 200 and rest[-1] == "data: [DONE]", rest[-3:]
    assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length", "the whole stream, not cut"
    assert took > 2, f"the stream lasted {took:.2f} s, not past idle_ttl: too short to tell (raise max_tokens)"
    # Not stopped under it: a stop would have cut the stream above. (No `stops == 0` check here: the
    # client may read the stream's end idle_ttl after the proxy sent it, when the stop has rightly come.)
    assert s.pids().get("real-idle", pid) == pid, "the first request's llama-server served the stream"
    assert json.loads(first[6:])["object"] == "text_completion"
    # llama-server is gone (or a zombie) a moment before the proxy's loop reaps it and counts the stop
    # (this ordering failed CI once): wait for the count, which comes after the exit.
    wait_for(lambda: metric("llmproxy_engine_stops_total", route="real-idle", cause="idle") == 1, within=15,
             what="llama-server stopped when idle")
    assert not alive(pid)
    assert s.ask().status_code == 200
    # Started again: counted before the answer went out (reading `pids()` after it could find the new
    # one idle-stopped already, idle_ttl after the answer, on a loaded machine).
    assert metric("llmproxy_engine_starts_total", route="real-idle", result="ok") == 2


def test_group_swap_between_two_models(served, engine_bin, engine_model):
    group = "group: gpu0\n"
    s = served(a=llama_route("real-alpha", engine_bin, engine_model, models="alpha", engine=group),
               b=llama_route("real-beta", engine_bin, engine_model, models="beta", engine=group))
    assert s.ask("alpha").status_code == 200
    alpha = s.pids()["real-alpha"]
    r = s.ask("beta")
    assert r.status_code == 200, r.text
    assert not alive(alpha), "alpha's llama-server exited before beta's answered"
    assert list(s.pids()) == ["real-beta"]
    log = s.log()
    stopped = next(i for i, m in enumerate(log) if "engine of route 'real-alpha' stopped (group)" in m)
    started = next(i for i, m in enumerate(log) if "starting the engine of route 'real-beta'" in m)
    assert stopped < started, "beta was spawned only after alpha had exited"
    assert s.models() == {"alpha": "unloaded", "beta": "loaded"}
    assert s.ask("alpha").status_code == 200 and list(s.pids()) == ["real-alpha"]


def test_a_crash_is_noticed_and_the_next_request_restarts_it(served, engine_bin, engine_model):
    import os

    s = served(a=llama_route("real-crash", engine_bin, engine_model))
    assert s.ask().status_code == 200
    pid = s.pids()["real-crash"]
    os.kill(pid, signal.SIGKILL)  # the engine dies on its own, as far as the proxy knows
    wait_for(lambda: metric("llmproxy_engine_stops_total", route="real-crash", cause="crash") == 1,
             what="the crash noticed")  # fmt: skip
    assert s.models() == {"real-crash": "unloaded"}
    assert s.ask().status_code == 200
    assert s.pids()["real-crash"] != pid


def test_a_failing_command_answers_503_with_llama_servers_output(served, engine_bin, tmp_path):
    s = served(a=llama_route("real-bad", engine_bin, tmp_path / "no-such-model.gguf"))
    r = s.ask()
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["code"] == "engine_start_failed"
    assert "exited with code" in err["message"] and "failed to load model" in err["message"], err["message"]


def test_reload_restarts_a_changed_engine_and_stops_a_removed_one(served, engine_bin, engine_model, tmp_path):
    s = served(a=llama_route("real-a", engine_bin, engine_model, models="alpha"),
               b=llama_route("real-b", engine_bin, engine_model, models="beta"))
    assert s.ask("alpha").status_code == 200 and s.ask("beta").status_code == 200
    pids = s.pids()
    folder = tmp_path / "routes.d"
    (folder / "b.yaml").unlink()
    wait_for(lambda: not alive(pids["real-b"]), within=15, what="the removed route's llama-server stopped")
    (folder / "a.yaml").write_text(llama_route("real-a", engine_bin, engine_model, models="alpha", extra=("-np", "1")))
    wait_for(lambda: not alive(pids["real-a"]), within=15, what="the changed route's old llama-server stopped")
    wait_for(lambda: s.pids().get("real-a"), within=15, what="the new llama-server")
    assert s.ask("alpha").status_code == 200
    assert s.pids() == {"real-a": s.pids()["real-a"]} and s.pids()["real-a"] != pids["real-a"]


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_no_llama_server_outlives_the_proxy(engine_bin, engine_model, tmp_path, how):
    folder = tmp_path / "routes.d"
    folder.mkdir()
    (folder / "a.yaml").write_text(llama_route("real-orphan", engine_bin, engine_model))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    err = tmp_path / "stderr"
    with err.open("wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--routes", str(folder), "--port", str(port),
                                 "--log-format", "text"], stdout=subprocess.DEVNULL, stderr=stderr)  # fmt: skip
    try:
        wait_ready(proc, base, err)
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, timeout=120)
        assert r.status_code == 200, r.text
        (pid,) = [int(p) for p in re.findall(r"is ready on port \d+ after [\d.]+ s \(pid (\d+)\)", err.read_text())]
        assert alive(pid)
        proc.send_signal(getattr(signal, how))
        proc.wait(30)
        wait_for(lambda: not alive(pid), within=10, what=f"llama-server gone after {how} of the proxy")
    finally:
        if proc.poll() is None:
            stop(proc)
