"""Engines on demand (proxy/engines.py): a route's `engine:` started on the first request,
stopped when idle, swapped within a group, restarted after a crash, never left behind.

The engine is tests/engine_script.py, a small loopback server with knobs (slow to load,
failing, crashing, deaf to SIGTERM) that writes a file per process start and exit; the
same behaviours run against the real llama-server in tests/engine/test_engine_ondemand.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy import catalog, engines, observe
from proxy.app import create_app
from proxy.config import load_dir
from proxy.errors import ConfigError
from proxy.reload import TableHolder
from proxy.routes import RouteTable
from servers import free_port, run_app, stop, wait_ready, wait_workers

SCRIPT = Path(__file__).resolve().parent / "engine_script.py"


def engine_route(name: str, log: Path, *knobs: str, models: str = "", engine: str = "",
                 path: str = "/v1/completions") -> str:  # fmt: skip
    """A route file whose engine is the script engine, writing its start/exit marks to `log`."""
    argv = [sys.executable, str(SCRIPT), "--port", "${PORT}", "--name", name, "--log", str(log), *knobs]
    return textwrap.dedent(f"""\
        name: {name}
        path: {path}
        {f"models: [{models}]" if models else ""}
        upstream: http://127.0.0.1:${{PORT}}/v1/completions
        engine:
          command: {json.dumps(argv)}
        """) + textwrap.indent(textwrap.dedent(engine), "  ")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def starts(log: Path) -> list[int]:
    """Pids of the engine processes that started, oldest first."""
    marks = sorted(log.glob("*.start"), key=lambda p: float(p.read_text()))
    return [int(p.stem) for p in marks]


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_for(check: Callable[[], Any], within: float = 10, what: str = "condition") -> Any:
    deadline = time.monotonic() + within
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what} not reached within {within} s"
        time.sleep(0.05)
    return value


def metric(name: str, **labels: str) -> float:
    value = observe.REGISTRY.get_sample_value(name, labels)
    return value or 0.0


def complete(base: str, model: str = "m", **kw: Any) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", json={"model": model, "prompt": "hi", **kw}, timeout=30)


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "marks"
    folder.mkdir()
    return folder


@pytest.fixture
def serve_holder() -> Iterator[Callable[..., str]]:
    """Serve a routes folder through a reloading holder (in this process); the base URL."""
    from contextlib import ExitStack

    with ExitStack() as stack:

        def start(folder: Path, **kw: Any) -> str:
            app = create_app(TableHolder.load(folder), reload=True, poll_interval=0.1, **kw)
            return stack.enter_context(run_app(app))

        yield start


def models(base: str) -> dict[str, str]:
    data = httpx.get(f"{base}/v1/models", timeout=5).json()["data"]
    return {m["id"]: m.get("status", {}).get("value") for m in data}


# --- start on the first request ----------------------------------------------------------------


def test_the_first_request_starts_the_engine_and_the_next_go_straight_through(routes_dir, serve_holder, log_dir,
                                                                             access_lines):  # fmt: skip
    name = unique("first")
    base = serve_holder(routes_dir(a=engine_route(name, log_dir, "--load-seconds", "0.3",
                                                  engine="env: {ENGINE_GREETING: hello}\n")))  # fmt: skip
    assert models(base) == {name: "unloaded"}, "listed before it ever ran"
    assert starts(log_dir) == [], "nothing starts before a request"

    first = complete(base)
    assert first.status_code == 200, first.text
    pid = int(first.headers["x-engine-pid"])
    assert first.json()["choices"][0]["text"] == f"{name} pid {pid} hello", "engine.env reached the engine"
    assert starts(log_dir) == [pid]
    assert models(base) == {name: "loaded"}
    assert httpx.get(f"{base}/v1/models/{name}", timeout=5).json()["status"] == {"value": "loaded"}
    second = complete(base, stream=True)
    assert second.status_code == 200 and int(second.headers["x-engine-pid"]) == pid
    assert f"pid {pid} hello #2" in second.text

    wait_for(lambda: len(access_lines()) == 2, what="two access lines")
    waited, straight = access_lines()
    assert waited["engine_wait_ms"] >= 250, "the first request waited for the engine's load"
    assert straight["engine_wait_ms"] is None, "a running engine costs no wait"
    assert waited["upstream"] == straight["upstream"] != "http://127.0.0.1/v1/completions"
    assert metric("llmproxy_engine_starts_total", route=name, result="ok") == 1
    assert metric("llmproxy_engine_start_seconds_count", route=name) == 1
    assert metric("llmproxy_engines_running", route=name) == 1


def test_twenty_simultaneous_first_requests_start_one_process(routes_dir, serve_holder, log_dir):
    base = serve_holder(routes_dir(a=engine_route(unique("burst"), log_dir, "--load-seconds", "1")))

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(client.post(f"{base}/v1/completions", json={"model": "m", "prompt": str(i)})
                                          for i in range(20)))  # fmt: skip

    answers = asyncio.run(burst())
    assert [r.status_code for r in answers] == [200] * 20
    assert len({r.headers["x-engine-pid"] for r in answers}) == 1
    assert len(starts(log_dir)) == 1, "exactly one process for all of them"


# --- failures ------------------------------------------------------------------------------------


def test_a_failing_command_is_a_503_with_its_output(routes_dir, serve_holder, log_dir):
    name = unique("fails")
    base = serve_holder(routes_dir(a=engine_route(name, log_dir, "--fail", "error: cannot open /models/qwen.gguf")))
    r = complete(base)
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["code"] == "engine_start_failed" and err["type"] == "upstream_error"
    assert "exited with code 1 before it was ready" in err["message"]
    assert "cannot open /models/qwen.gguf" in err["message"], "the engine's last output is in the answer"
    assert metric("llmproxy_engine_starts_total", route=name, result="failed") == 1


def test_an_engine_that_never_gets_healthy_fails_after_start_timeout(routes_dir, serve_holder, log_dir):
    base = serve_holder(routes_dir(a=engine_route(unique("slow"), log_dir, "--load-seconds", "60",
                                                  engine="start_timeout: 1\nstop_timeout: 1\n")))  # fmt: skip
    r = complete(base)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_start_failed"
    assert "not ready within start_timeout (1 s)" in r.json()["error"]["message"]
    (pid,) = starts(log_dir)
    wait_for(lambda: not alive(pid), within=5, what="the timed-out engine stopped")


def test_a_timed_out_start_is_answered_before_the_engine_is_made_to_exit(routes_dir, serve_holder, log_dir):
    """The 503 goes out when start_timeout runs out, not after the stop of a process deaf to
    SIGTERM (stop_timeout); the group stays held until that process has really gone."""
    base = serve_holder(routes_dir(a=engine_route(unique("deaf"), log_dir, "--load-seconds", "60", "--ignore-term",
                                                  engine="start_timeout: 1\nstop_timeout: 6\n")))  # fmt: skip
    began = time.monotonic()
    r = complete(base)
    took = time.monotonic() - began
    assert r.status_code == 503 and "not ready within start_timeout" in r.json()["error"]["message"]
    assert took < 5, f"answered after {took:.1f} s: it waited for the engine's stop"
    (pid,) = starts(log_dir)
    wait_for(lambda: not alive(pid), within=15, what="the deaf engine killed after stop_timeout")


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process holds: listening on 127.0.0.1, never answering."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_an_engine_that_lost_its_port_to_another_process_starts_once_more_on_another(
        routes_dir, serve_holder, log_dir, taken_port, monkeypatch):  # fmt: skip
    """`${PORT}` is free when picked, but the engine binds it later: taken meanwhile, the start
    is tried once more on a new port instead of answering 503."""

    picks = iter([taken_port])
    monkeypatch.setattr(engines, "free_port", lambda: next(picks, None) or free_port())
    base = serve_holder(routes_dir(a=engine_route(unique("race"), log_dir)))
    r = complete(base)
    assert r.status_code == 200, r.text
    first, second = starts(log_dir)
    assert int(r.headers["x-engine-pid"]) == second, "the second process, on its own port, served"
    assert not alive(first)


def test_an_engine_whose_port_is_always_taken_says_so(routes_dir, serve_holder, log_dir, taken_port, monkeypatch):
    from proxy import engines

    monkeypatch.setattr(engines, "free_port", lambda: taken_port)
    base = serve_holder(routes_dir(a=engine_route(unique("taken"), log_dir)))
    r = complete(base)
    assert r.status_code == 503, r.text
    assert f"(port {taken_port}, its ${{PORT}}, is held by another process)" in r.json()["error"]["message"]


def test_a_crash_is_noticed_restarted_and_repeated_crashes_back_off(routes_dir, serve_holder, log_dir, monkeypatch):
    # 3 s instead of 1 s after the second crash: the request below must land inside the backoff, and one
    # second between seeing the crash counted and that request arriving is tight on a loaded machine.
    monkeypatch.setattr(engines, "BACKOFF_FIRST", 3.0)
    name = unique("crashy")
    base = serve_holder(routes_dir(a=engine_route(name, log_dir, "--exit-after", "1")))
    first = complete(base)
    assert first.status_code == 200
    wait_for(lambda: metric("llmproxy_engine_stops_total", route=name, cause="crash") == 1, what="the crash seen")
    assert models(base) == {name: "unloaded"}

    second = complete(base)  # the first crash: started again at once
    assert second.status_code == 200 and second.headers["x-engine-pid"] != first.headers["x-engine-pid"]
    wait_for(lambda: metric("llmproxy_engine_stops_total", route=name, cause="crash") == 2, what="the second crash")

    backing_off = complete(base)  # two in a row: no tight restart loop
    assert backing_off.status_code == 503, backing_off.text
    assert backing_off.json()["error"]["code"] == "engine_start_failed"
    assert "failed 2 time(s) in a row" in backing_off.json()["error"]["message"]
    assert backing_off.headers["retry-after"] in ("1", "2", "3")
    assert len(starts(log_dir)) == 2

    wait_for(lambda: complete(base).status_code == 200, within=5, what="a start once the backoff is over")
    assert len(starts(log_dir)) == 3


def test_a_crash_with_requests_in_flight_gives_them_the_usual_upstream_error(routes_dir, serve_holder, log_dir):
    name = unique("dies")
    base = serve_holder(routes_dir(a=engine_route(name, log_dir, "--die-on", "die")))
    assert complete(base).status_code == 200
    r = httpx.post(f"{base}/v1/completions", json={"model": "m", "prompt": "die"}, timeout=30)
    # `upstream_broken`; or, when it died on a reused connection without a byte of answer, the
    # request is sent once more on a new connection (proxy/transport.py), which its port refuses.
    assert r.status_code == 502 and r.json()["error"]["code"] in ("upstream_broken", "upstream_unreachable"), r.text
    wait_for(lambda: metric("llmproxy_engine_stops_total", route=name, cause="crash") == 1, what="the crash seen")
    assert complete(base).status_code == 200, "the next request starts it again"

    streamed = httpx.post(f"{base}/v1/completions", json={"model": "m", "prompt": "die", "stream": True}, timeout=30)
    # The script ends its streams by closing the connection (no chunked encoding), so a death looks
    # like an end to HTTP: the client sees the stream stop before `[DONE]`.
    assert streamed.status_code == 200 and streamed.text.count("data: ") == 1, streamed.text
    wait_for(lambda: metric("llmproxy_engine_stops_total", route=name, cause="crash") == 2, what="the second crash")
    assert len(starts(log_dir)) == 2


# --- idle ------------------------------------------------------------------------------------------


def test_idle_stop_never_cuts_a_stream_and_the_next_request_starts_it_again(routes_dir, serve_holder, log_dir):
    name = unique("idle")
    base = serve_holder(routes_dir(a=engine_route(name, log_dir, "--events", "8", "--interval", "0.25",
                                                  engine="idle_ttl: 0.5\n")))  # fmt: skip
    # A 2 s stream on an engine with a 0.5 s idle_ttl: in flight, so never idle.
    r = complete(base, stream=True)
    assert r.status_code == 200 and r.text.count("data: ") == 9, r.text  # a stop in flight would cut it
    (pid,) = starts(log_dir)
    # The process is gone (or a zombie) a moment before the proxy's loop has reaped it and counted the stop.
    wait_for(lambda: metric("llmproxy_engine_stops_total", route=name, cause="idle") == 1, within=10, what="idle stop")
    assert not alive(pid)
    # Not `alive(pid)` right after the stream: on a loaded machine the client may read the stream's end
    # idle_ttl after the proxy sent it, when the stop has rightly come. The marks, written by the engine,
    # tell it: SIGTERM came no sooner than the 8 x 0.25 s of the stream, plus idle_ttl, after its start.
    lived = float((log_dir / f"{pid}.exit").read_text()) - float((log_dir / f"{pid}.start").read_text())
    assert lived >= 8 * 0.25 + 0.5, f"stopped {lived:.2f} s after its start: while the stream was in flight"
    assert metric("llmproxy_engines_running", route=name) == 0
    assert complete(base).status_code == 200
    assert len(starts(log_dir)) == 2


def test_restarts_keep_one_upstream_label_in_logs_and_metrics(routes_dir, serve_holder, log_dir, access_lines):
    """Each start picks a new `${PORT}`; the access log's `upstream` and the metric series keep
    the URL as written, so a long-lived proxy does not grow one series per restart."""
    name = unique("label")
    base = serve_holder(routes_dir(a=engine_route(name, log_dir, engine="idle_ttl: 0.3\n") + "balance: least-busy\n"))
    for n in (1, 2, 3):
        assert complete(base).status_code == 200
        wait_for(lambda n=n: metric("llmproxy_engine_stops_total", route=name, cause="idle") == n, what="idle stop")
    assert len(starts(log_dir)) == 3, "three processes, three ports"
    wait_for(lambda: len(access_lines()) == 3, what="three access lines")
    assert {line["upstream"] for line in access_lines()} == {"http://127.0.0.1:${PORT}/v1/completions"}
    series = {s.labels["upstream"] for family in observe.REGISTRY.collect() for s in family.samples
              if s.labels.get("route") == name and "upstream" in s.labels}  # fmt: skip
    assert series == {"http://127.0.0.1:${PORT}/v1/completions"}, series


def test_each_request_starts_the_idle_clock_again(routes_dir, serve_holder, log_dir):
    # 3.2 s of traffic, longer than idle_ttl, the requests 0.4 s apart: each gap leaves 1.6 s for a
    # loaded machine to take between a request's end at the proxy and the next one's arrival (with
    # idle_ttl 1, 0.6 s was tight).
    base = serve_holder(routes_dir(a=engine_route(unique("busy"), log_dir, engine="idle_ttl: 2\n")))
    pid = int(complete(base).headers["x-engine-pid"])
    for _ in range(8):
        time.sleep(0.4)
        assert int(complete(base).headers["x-engine-pid"]) == pid
    assert starts(log_dir) == [pid], "never stopped while requests kept coming"
    wait_for(lambda: not alive(pid), within=10, what="the idle stop once they stopped")


# --- groups ----------------------------------------------------------------------------------------


def test_a_group_runs_one_engine_at_a_time_the_old_one_gone_before_the_new_starts(routes_dir, serve_holder,
                                                                                  log_dir):  # fmt: skip
    a, b = unique("a"), unique("b")
    group = "group: gpu0\n"
    folder = routes_dir(
        a=engine_route(a, log_dir, "--events", "6", "--interval", "0.25", models="alpha", engine=group),
        b=engine_route(b, log_dir, "--load-seconds", "0.2", models="beta", engine=group),
    )
    base = serve_holder(folder)
    first = complete(base, "alpha")
    assert first.status_code == 200
    pid_a = int(first.headers["x-engine-pid"])

    # A stream on alpha is in flight when beta is asked for: beta waits for it, the stream is not cut.
    # (Its first event read before beta is asked: a fixed sleep let beta overtake it on a loaded machine.)
    async def both() -> tuple[int, str, httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            body = {"model": "alpha", "prompt": "x", "stream": True}
            async with client.stream("POST", f"{base}/v1/completions", json=body) as stream:
                chunks = stream.aiter_text()
                text = await anext(chunks)  # alpha is streaming
                other = asyncio.ensure_future(client.post(f"{base}/v1/completions",
                                                          json={"model": "beta", "prompt": "y"}))
                async for chunk in chunks:
                    text += chunk
            return stream.status_code, text, await other

    status, text, other = asyncio.run(both())
    assert status == 200 and text.count("data: ") == 7, "the stream ran to its end"
    assert other.status_code == 200
    pid_b = int(other.headers["x-engine-pid"])
    assert not alive(pid_a)
    exit_a = float((log_dir / f"{pid_a}.exit").read_text())
    start_b = float((log_dir / f"{pid_b}.start").read_text())
    assert exit_a < start_b, "beta started only after alpha had exited"
    assert models(base) == {"alpha": "unloaded", "beta": "loaded"}
    assert metric("llmproxy_engine_stops_total", route=a, cause="group") == 1

    back = complete(base, "alpha")  # and back: beta stops, alpha starts again
    assert back.status_code == 200 and int(back.headers["x-engine-pid"]) not in (pid_a, pid_b)
    assert not alive(pid_b)


def test_a_group_switch_is_first_come_first_served(routes_dir, serve_holder, log_dir, caplog):
    """While a switch to beta waits, new alpha requests queue behind it instead of keeping
    alpha busy: beta's request is answered before the alpha requests sent after it."""
    import logging

    caplog.set_level(logging.INFO, logger="llmproxy.engine")
    group = "group: gpu0\n"
    a = unique("a")
    folder = routes_dir(
        a=engine_route(a, log_dir, "--events", "4", "--interval", "0.2", models="alpha", engine=group),
        b=engine_route(unique("b"), log_dir, models="beta", engine=group),
    )
    base = serve_holder(folder)
    assert complete(base, "alpha").status_code == 200
    done: dict[str, float] = {}

    def evicted() -> bool:  # logged by the group as beta's start joins its queue
        return any(f"engine of route {a!r}: stopping once its requests in flight end" in r.getMessage()
                   for r in caplog.records)

    # Each step waits until the proxy has seen the one before (fixed delays of 0.2 s let a loaded
    # machine reorder them): alpha-1 streaming, then beta queued, then the late alpha requests.
    async def run() -> None:
        async with httpx.AsyncClient(timeout=30) as client:

            async def ask(tag: str, model: str) -> None:
                r = await client.post(f"{base}/v1/completions", json={"model": model, "prompt": tag, "stream": True})
                assert r.status_code == 200, r.text
                done[tag] = time.monotonic()

            async def first() -> None:
                async with client.stream("POST", f"{base}/v1/completions",
                                         json={"model": "alpha", "prompt": "alpha-1", "stream": True}) as r:
                    chunks = r.aiter_bytes()
                    await anext(chunks)
                    streaming.set()
                    async for _ in chunks:
                        pass
                done["alpha-1"] = time.monotonic()

            streaming = asyncio.Event()
            tasks = [asyncio.ensure_future(first())]
            await asyncio.wait_for(streaming.wait(), 10)
            tasks.append(asyncio.ensure_future(ask("beta", "beta")))
            deadline = time.monotonic() + 10
            while not evicted():
                assert time.monotonic() < deadline, "beta's switch never queued"
                await asyncio.sleep(0.02)
            tasks += [asyncio.ensure_future(ask(f"alpha-late-{i}", "alpha")) for i in range(3)]
            await asyncio.gather(*tasks)

    asyncio.run(run())
    assert done["alpha-1"] < done["beta"], "the stream in flight finished first"
    assert all(done["beta"] < done[f"alpha-late-{i}"] for i in range(3)), "later alpha requests waited their turn"


# --- reload ----------------------------------------------------------------------------------------


def test_reload_restarts_a_changed_engine_stops_a_removed_one_and_a_broken_file_keeps_them(routes_dir, serve_holder,
                                                                                          log_dir):  # fmt: skip
    a, b = unique("a"), unique("b")
    folder = routes_dir(a=engine_route(a, log_dir, models="alpha"), b=engine_route(b, log_dir, models="beta"))
    base = serve_holder(folder)
    pid_a = int(complete(base, "alpha").headers["x-engine-pid"])
    pid_b = int(complete(base, "beta").headers["x-engine-pid"])

    failed = metric("llmproxy_reloads_total", result="failed")
    (folder / "b.yaml").write_text("name: oops\npath: /v1/completions\nupstream: [")  # broken
    # Refused, then the check (a fixed second's sleep could end before the reload had looked).
    wait_for(lambda: metric("llmproxy_reloads_total", result="failed") > failed, what="the broken file refused")
    assert alive(pid_a) and alive(pid_b), "a broken file keeps the running engines"
    assert int(complete(base, "beta").headers["x-engine-pid"]) == pid_b

    (folder / "b.yaml").unlink()  # removed route: its engine stops
    wait_for(lambda: metric("llmproxy_engine_stops_total", route=b, cause="reload") == 1,
             what="the removed route's engine stopped")
    assert not alive(pid_b)

    # A changed command: the old process goes, the new one starts at once (it was running).
    (folder / "a.yaml").write_text(engine_route(a, log_dir, "--name", "changed", models="alpha"))
    wait_for(lambda: not alive(pid_a), what="the changed engine's old process stopped")
    new = wait_for(lambda: [p for p in starts(log_dir) if p not in (pid_a, pid_b)], what="the new process")
    r = complete(base, "alpha")
    assert r.status_code == 200 and "changed pid" in r.text and int(r.headers["x-engine-pid"]) == new[0]
    assert models(base) == {"alpha": "loaded"}


# --- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(("engine", "upstream", "message"), [
    ("command: no-such-llm-server --port ${PORT}", "http://127.0.0.1:${PORT}/v1", "program 'no-such-llm-server' not found on PATH"),
    ("command: ./missing/llama-server --port ${PORT}", "http://127.0.0.1:${PORT}/v1", "not found (relative paths are read from the routes folder)"),
    ("command: ./r.yaml --port ${PORT}", "http://127.0.0.1:${PORT}/v1", "is not an executable file"),
    ("command: sh --port ${PORT}", "http://127.0.0.1:8000/v1", "the upstream must name it"),
    ("command: sh --port 8000", "http://127.0.0.1:${PORT}/v1", "never passes it to the server"),
    ("command: sh --port ${PORT}\n  health: health", "http://127.0.0.1:${PORT}/v1", "engine.health: must be a path"),
    ("command: sh 'unclosed --port ${PORT}", "http://127.0.0.1:${PORT}/v1", "cannot be split as a shell would"),
    ("command: ''", "http://127.0.0.1:${PORT}/v1", "engine.command: is empty"),
    ("command: sh --port ${PORT}\n  start_timeout: 0", "http://127.0.0.1:${PORT}/v1", "engine.start_timeout"),
    ("command: sh --port ${PORT}", '["http://127.0.0.1:${PORT}/v1", "http://127.0.0.1:${PORT}/v2"]', "has one upstream"),
    ("command: sh --port ${PORT:-8000}", "http://127.0.0.1:${PORT}/v1", "write ${PORT}: in a route with engine:"),
])  # fmt: skip
def test_check_refuses_an_engine_that_cannot_work(routes_dir, engine, upstream, message):
    folder = routes_dir(r=f"path: /v1/completions\nupstream: {upstream}\nengine:\n  {engine}\n")
    with pytest.raises(ConfigError) as err:
        load_dir(folder)
    assert message in str(err.value)
    assert str(folder / "r.yaml") in str(err.value)


def test_port_is_never_read_from_the_environment_in_an_engine_route(routes_dir, monkeypatch):
    monkeypatch.setenv("PORT", "9999")
    folder = routes_dir(r="""
        path: /v1/completions
        upstream: http://127.0.0.1:${PORT}/v1/completions
        default_headers: {X-Port: "${PORT}"}
        engine: {command: "sh -c 'exec sleep 1' --port ${PORT}"}
    """)
    with pytest.raises(ConfigError, match=r"default_headers.X-Port: \$\{PORT\} is only filled in"):
        load_dir(folder)
    (folder / "r.yaml").write_text(textwrap.dedent("""
        path: /v1/completions
        upstream: http://127.0.0.1:${PORT}/v1/completions
        engine: {command: "sh -c 'exec sleep 1' --port ${PORT}", idle_ttl: 30, group: gpu0}
    """))
    (route,) = load_dir(folder)
    assert route.upstream == "http://127.0.0.1:${PORT}/v1/completions"
    assert route.engine is not None and route.engine.argv[1:] == ("-c", "exec sleep 1", "--port", "${PORT}")
    assert Path(route.engine.argv[0]).is_absolute(), "the program is resolved as check saw it"


def test_check_prints_the_engine_and_serve_refuses_workers(routes_dir, log_dir):
    folder = routes_dir(a=engine_route("eng", log_dir, engine="idle_ttl: 600\ngroup: gpu0\n"))
    done = subprocess.run([sys.executable, "-m", "proxy", "check", "--routes", str(folder)], capture_output=True,
                          text=True, timeout=30)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "engine: " in done.stdout and "(idle_ttl 600 s, group gpu0; started on the first request)" in done.stdout
    done = subprocess.run([sys.executable, "-m", "proxy", "serve", "--routes", str(folder), "--workers", "2",
                           "--port", str(free_port())], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 2
    assert "--workers 2: route(s) 'eng'" in done.stderr and "each worker would start its own copy" in done.stderr
    assert starts(log_dir) == []


# --- the proxy's life: no orphans ------------------------------------------------------------------


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_no_engine_outlives_the_proxy(routes_dir, log_dir, tmp_path, how):
    """A real `llmproxy serve`: its engines end with it, stopped in order on SIGTERM/SIGINT,
    killed by the kernel (PR_SET_PDEATHSIG) on `kill -9` of the proxy. The engine here also
    ignores SIGTERM, so the orderly stop has to escalate to SIGKILL."""
    folder = routes_dir(a=engine_route("orphan", log_dir, "--ignore-term", engine="stop_timeout: 0.5\n"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    err = tmp_path / "stderr"
    with err.open("wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--routes", str(folder), "--port", str(port),
                                 "--log-format", "text", "--grace-period", "1"],
                                stdout=subprocess.DEVNULL, stderr=stderr)  # fmt: skip
    try:
        wait_ready(proc, base, err)
        r = complete(base)
        assert r.status_code == 200, r.text
        pid = int(r.headers["x-engine-pid"])
        assert os.getpgid(pid) == pid, "the engine runs in its own process group"
        proc.send_signal(getattr(signal, how))
        code = proc.wait(20)
        wait_for(lambda: not alive(pid), within=5, what=f"the engine gone after {how} of the proxy")
    finally:
        if proc.poll() is None:
            stop(proc)
    if how != "SIGKILL":
        assert code == 0, err.read_text()
        text = err.read_text()
        assert "did not exit within stop_timeout (0.5 s) of SIGTERM; killing it" in text
        assert "engine of route 'orphan' stopped (shutdown)" in text


def test_workers_refuse_a_reload_that_adds_an_engine(routes_dir, upstream, log_dir, tmp_path):
    """With `--workers 2` running, a route file with `engine:` dropped in is refused as a broken
    file is: reported once, the table stays, no worker starts a copy of the model."""
    folder = routes_dir(plain=f"path: /v1/completions\nupstream: {upstream.url}/v1/completions\n")
    port, err = free_port(), tmp_path / "stderr"
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with err.open("wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--routes", str(folder), "--port", str(port),
                                 "--workers", "2", "--reload"], stdout=subprocess.DEVNULL, stderr=stderr, env=env)  # fmt: skip
    try:
        wait_ready(proc, base, err)
        # Both workers up first: one still starting would read the folder after the drop-in, refuse
        # it too and log it a second time (wait_ready returns when the first answers).
        wait_workers(proc, err, 2)
        (folder / "eng.yaml").write_text(engine_route("eng", log_dir, models="eng"))
        wait_for(lambda: "each worker would start its own copy" in err.read_text(), what="the refusal logged")
        r = complete(base, "eng")
        assert r.status_code == 200 and "x-engine-pid" not in r.headers, "the plain route still answers"
        assert starts(log_dir) == []
    finally:
        assert stop(proc) == 0
    log = err.read_text()
    # Reported once by the supervisor. uvicorn also kills and replaces a worker whose health ping
    # is late on a loaded machine (supervisors/multiprocess.py keep_subprocess_alive, logging
    # "Child process [N] died"); that replacement reads the folder, refuses the engine route and
    # says so once too, which is the same refusal, not a loop.
    replaced = log.count("] died")
    assert 1 <= log.count("each worker would start its own copy") <= 1 + replaced, log


def test_check_probe_leaves_engines_alone(routes_dir, log_dir):
    folder = routes_dir(a=engine_route("lazy", log_dir))
    done = subprocess.run([sys.executable, "-m", "proxy", "check", "--probe", "--routes", str(folder)],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[not probed: its engine starts on demand]" in done.stdout
    assert starts(log_dir) == []


def test_a_secret_on_the_command_line_is_never_shown(routes_dir, serve_holder, log_dir, caplog):
    """llama-server and vLLM take `--api-key KEY`: `check` and the start-up log show `***`."""
    import logging

    folder = routes_dir(a=engine_route("secretive", log_dir, "--name", "s") .replace(
        '"--name", "secretive"', '"--name", "secretive", "--api-key", "sk-hunter2", "--hf-token=hf_abc"'))
    from proxy.cli import describe_engine

    (route,) = load_dir(folder)
    assert route.engine is not None
    shown = describe_engine(route.engine)
    assert "--api-key *** --hf-token=***" in shown and "hunter2" not in shown and "hf_abc" not in shown
    caplog.set_level(logging.INFO, logger="llmproxy.engine")
    base = serve_holder(folder)
    assert complete(base).status_code == 200
    started = [r.getMessage() for r in caplog.records if "starting the engine" in r.getMessage()]
    assert started and "--api-key ***" in started[0] and "hunter2" not in " ".join(started)


def test_a_replaced_worker_never_loads_an_engine_route(routes_dir, upstream, log_dir, tmp_path, monkeypatch):
    """uvicorn replaces a worker that stops answering its pings; the new one reads the folder
    again. With an engine route there (refused by the supervisor), it serves the last table
    that loaded instead, as it does for a broken file; a SIGHUP sent to one worker alike."""
    from proxy.reload import LAST_GOOD_ENV, save_last_good
    from proxy.routes import RouteTable

    folder = routes_dir(plain=f"path: /v1/completions\nupstream: {upstream.url}/v1/completions\n")
    last_good = tmp_path / "last-good.json"
    save_last_good(RouteTable.from_dir(folder), last_good)
    (folder / "eng.yaml").write_text(engine_route("eng", log_dir, models="eng"))
    holder = TableHolder.load(folder, last_good=last_good)
    assert [r.name for r in holder.current.routes] == ["plain"]
    monkeypatch.setenv(LAST_GOOD_ENV, str(last_good))
    assert holder.reload(force=True) is False, "a worker's own reload refuses it too"
    assert [r.name for r in holder.current.routes] == ["plain"]


def test_an_engine_route_is_listed_by_its_file_whether_its_engine_runs_or_not(routes_dir, serve_holder, log_dir,
                                                                              monkeypatch):  # fmt: skip
    """`/v1/models` never asks an engine for its names: they would come and go with the engine.
    Names a glob only stands for are not listed, and `check` says so."""
    name = unique("globbed")
    # idle_ttl outlasts the two requests between the completion and the `loaded` check (0.5 s was
    # tight on a loaded machine).
    folder = routes_dir(a=engine_route(name, log_dir, "--model-id", "qwen-7b", models="'qwen*'",
                                       engine="idle_ttl: 2\n"))  # fmt: skip
    monkeypatch.setattr(catalog, "TTL", 0.0)  # each listing asks again whatever it would ask
    base = serve_holder(folder)
    assert models(base) == {}
    assert complete(base, "qwen-7b").status_code == 200
    assert models(base) == {}, "the running engine's own list is not asked"
    assert httpx.get(f"{base}/v1/models/qwen-7b", timeout=5).json()["status"] == {"value": "loaded"}
    wait_for(lambda: metric("llmproxy_engine_stops_total", route=name, cause="idle") == 1, what="idle stop")
    assert httpx.get(f"{base}/v1/models/qwen-7b", timeout=5).json()["status"] == {"value": "unloaded"}

    (warning,) = [w for w in RouteTable.from_dir(folder).warnings() if "engine" in w]
    assert "a.yaml: models: names only globs, and a route with engine: is listed in /v1/models" in warning
    (folder / "a.yaml").write_text(engine_route(name, log_dir, models="'qwen*', qwen-7b"))
    assert RouteTable.from_dir(folder).warnings() == []


def test_preload_starts_an_engine_before_any_request_and_never_evicts_one(routes_dir, serve_holder, log_dir):
    """llama-swap #156 / #413: load a model ahead of the first request. In a group only the
    first preloaded engine starts (file order): preloading never swaps."""
    group = "group: gpu0\npreload: true\n"
    a, b = unique("a"), unique("b")
    folder = routes_dir(a=engine_route(a, log_dir, models="alpha", engine=group),
                        b=engine_route(b, log_dir, models="beta", engine=group),
                        c=engine_route(unique("c"), log_dir, models="gamma", engine="preload: true\n"))
    base = serve_holder(folder)
    wait_for(lambda: len(starts(log_dir)) == 2, what="two preloaded engines")
    # Started is not yet ready: wait for both to be `loaded` (a fixed 0.5 s was a guess).
    wait_for(lambda: models(base) == {"alpha": "loaded", "beta": "unloaded", "gamma": "loaded"},
             what="the preloaded engines ready, beta never started")
    r = complete(base, "alpha")
    assert r.status_code == 200
    assert int(r.headers["x-engine-pid"]) in starts(log_dir)
    assert len(starts(log_dir)) == 2, "the first request found it running"


def test_a_request_right_after_a_crash_meets_the_backoff(routes_dir, log_dir):
    """The crash is counted, and the backoff set, before the engine can be started again: a request
    in the moment after the process was reaped (the proxy waits 50 ms for its last output lines)
    must not start a second crash-in-a-row at once."""
    import aiohttp

    from proxy import engines as engines_module
    from proxy.errors import EngineStartFailed

    name = unique("reaped")
    (route,) = RouteTable.from_dir(routes_dir(a=engine_route(name, log_dir))).routes

    async def run() -> str:
        owner = engines_module.Engines()
        async with aiohttp.ClientSession() as session:
            owner.session = session
            engine = owner.get(route)
            try:
                for crash in (1, 2):
                    await engine.wait()
                    engine.leave()
                    os.kill(engine.proc.pid, signal.SIGKILL)
                    deadline = time.monotonic() + 10
                    while engine.state == engines_module.RUNNING:  # the proxy has reaped it
                        assert time.monotonic() < deadline
                        await asyncio.sleep(0.001)
                    if crash == 1:  # let the first one be counted; the second is asked for at once
                        while metric("llmproxy_engine_stops_total", route=name, cause="crash") < 1:
                            assert time.monotonic() < deadline
                            await asyncio.sleep(0.01)
                try:
                    await engine.wait()
                except EngineStartFailed as exc:
                    return exc.message
                engine.leave()
                return "started again at once"
            finally:
                await owner.close()

    said = asyncio.run(run())
    assert "failed 2 time(s) in a row" in said, said
    assert len(starts(log_dir)) == 2, "no third process after two crashes in a row"
