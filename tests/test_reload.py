"""Hot reload of the routes folder: real proxy and mock upstream on loopback, real files."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from proxy.app import create_app
from proxy.reload import TableHolder, fingerprint
from servers import MockServer, free_port, run_app

POLL = 0.2  # the safety-net check in these tests; inotify usually answers well before it


def route(upstream: MockServer, path: str) -> str:
    return textwrap.dedent(f"""
        path: {path}
        upstream: {upstream.url}/v1/completions
    """)


def put(path: Path, text: str) -> None:
    """Write as editors and config tools do: a temporary file renamed over the old one, so no
    check can read a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def status(base: str, path: str) -> int:
    return httpx.post(f"{base}{path}", json={"model": "m", "prompt": "hi"}, timeout=5).status_code


def reloaded(base: str) -> float:
    """`llmproxy_reloads_total{result="ok"}` of a served proxy."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=5).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "llmproxy_reloads_total" and s.labels.get("result") == "ok")  # fmt: skip


def wait_for(check: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "not reloaded in time"
        time.sleep(0.02)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "routes.d"
    path.mkdir()
    return path


@pytest.fixture
def serve() -> Iterator[Callable[[TableHolder], str]]:
    from contextlib import ExitStack

    with ExitStack() as stack:
        yield lambda holder: stack.enter_context(run_app(create_app(holder, reload=True, poll_interval=POLL)))


def test_add_break_and_delete_files(upstream, folder, serve, caplog):
    caplog.set_level(logging.INFO, logger="llmproxy")
    (folder / "a.yaml").write_text(route(upstream, "/a"))
    base = serve(TableHolder.load(folder))
    assert status(base, "/a") == 200 and status(base, "/b") == 404

    put(folder / "b.yaml", route(upstream, "/b"))
    wait_for(lambda: status(base, "/b") == 200)  # how soon: test_file_events_wake_the_watcher_before_the_periodic_check

    put(folder / "a.yaml", "path: /a\nupstream: [not a url\n")
    wait_for(lambda: any("routes not reloaded" in r.getMessage() for r in caplog.records))
    message = next(r.getMessage() for r in caplog.records if "routes not reloaded" in r.getMessage())
    assert f"{folder / 'a.yaml'}:3: yaml: " in message  # FILE:LINE: field: reason
    assert status(base, "/a") == 200 and status(base, "/b") == 200  # the old table keeps serving

    (folder / "a.yaml").unlink()
    wait_for(lambda: status(base, "/a") == 404)
    assert status(base, "/b") == 200
    errors = [r for r in caplog.records if "routes not reloaded" in r.getMessage()]
    assert len(errors) == 1  # reported once, not on every check


def test_file_events_wake_the_watcher_before_the_periodic_check(upstream, folder):
    """With a 60 s check, only watchfiles' events can explain a quick reload; and shutdown
    must not wait for the check either (`stop()` ends the watcher thread)."""
    (folder / "a.yaml").write_text(route(upstream, "/a"))
    app = create_app(TableHolder.load(folder), reload=True, poll_interval=60)
    with run_app(app) as base:
        time.sleep(0.1)  # let the watcher start: an edit before that is the periodic check's job
        put(folder / "b.yaml", route(upstream, "/b"))
        # Either bound only has to tell seconds from the 60 s check: 2 s (watchfiles' 300 ms debounce,
        # the reload, a request; uvicorn's 0.1 s shutdown tick and lifespan) was tight on a loaded machine.
        wait_for(lambda: status(base, "/b") == 200, 10.0)
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 10.0


def test_editor_save_by_rename(upstream, folder, serve):
    (folder / "a.yaml").write_text(route(upstream, "/a"))
    base = serve(TableHolder.load(folder))
    tmp = folder / ".a.yaml.swp"
    tmp.write_text(route(upstream, "/renamed"))
    assert status(base, "/renamed") == 404  # hidden files are not routes
    os.replace(tmp, folder / "a.yaml")
    wait_for(lambda: status(base, "/renamed") == 200)
    assert status(base, "/a") == 404


def test_configmap_symlink_swap(upstream, folder, serve):
    """The layout kubelet writes: files are symlinks into `..data`, itself a symlink to a
    timestamped dir; an update writes a new dir and renames a new `..data` link over the old."""
    first = folder / "..2026_01_01_00_00_00.000000001"
    first.mkdir()
    (first / "a.yaml").write_text(route(upstream, "/v1"))
    (folder / "..data").symlink_to(first.name)
    (folder / "a.yaml").symlink_to("..data/a.yaml")
    base = serve(TableHolder.load(folder))
    assert status(base, "/v1") == 200

    second = folder / "..2026_01_01_00_01_00.000000002"
    second.mkdir()
    (second / "a.yaml").write_text(route(upstream, "/v2"))
    (folder / "..data_tmp").symlink_to(second.name)
    os.replace(folder / "..data_tmp", folder / "..data")  # the atomic swap
    wait_for(lambda: status(base, "/v2") == 200)
    assert status(base, "/v1") == 404


def test_stream_running_during_reload_finishes_intact(upstream, folder, serve):
    (folder / "a.yaml").write_text(route(upstream, "/a"))
    holder = TableHolder.load(folder)
    base = serve(holder)
    old = holder.current
    body = {"model": "m", "prompt": "hi", "stream": True}
    with httpx.stream("POST", f"{base}/a", json=body, headers={"x-mock-hold": "k"}, timeout=10) as r:
        chunks = r.iter_raw()
        first = next(chunks)
        assert first.startswith(b"data: ")
        (folder / "a.yaml").unlink()  # the route goes away while its stream runs
        wait_for(lambda: holder.current is not old)
        assert status(base, "/a") == 404
        upstream.release("k")
        raw = first + b"".join(chunks)
    assert raw.endswith(b"data: [DONE]\n\n")
    texts = [line for line in raw.split(b"\n\n") if line.startswith(b'data: {')]
    assert b"".join(t.split(b'"text":"')[1].split(b'"')[0] for t in texts) == b"Hello from the mock upstream."


def test_edit_between_load_and_serving_is_not_missed(upstream, folder, serve):
    (folder / "a.yaml").write_text(route(upstream, "/a"))
    holder = TableHolder.load(folder)  # the snapshot is taken here, with the table
    (folder / "b.yaml").write_text(route(upstream, "/b"))  # ... before the watcher starts
    base = serve(holder)
    wait_for(lambda: status(base, "/b") == 200)


def test_fingerprint_follows_symlinks_and_ignores_hidden(folder):
    target = folder / "..data_1"
    target.mkdir()
    (target / "a.yaml").write_text("one")
    (folder / "a.yaml").symlink_to(target / "a.yaml")
    before = fingerprint(folder)
    (folder / ".a.yaml.swp").write_text("noise")
    assert fingerprint(folder) == before
    (target / "a.yaml").write_text("two")  # the link is unchanged; what it points at is not
    assert fingerprint(folder) != before
    (target / "a.yaml").write_text("one")
    assert fingerprint(folder) == before


def test_sighup_reloads(folder, upstream):
    """SIGHUP reloads even without watching; signal handlers need the main thread, so this
    runs the holder's handler in an event loop of the test's own (main) thread."""
    (folder / "a.yaml").write_text(route(upstream, "/a"))
    holder = TableHolder.load(folder)
    old = holder.current

    async def main() -> None:
        with holder.reload_on_sighup():
            (folder / "b.yaml").write_text(route(upstream, "/b"))
            os.kill(os.getpid(), signal.SIGHUP)
            deadline = time.monotonic() + 10
            while holder.current is old and time.monotonic() < deadline:
                await asyncio.sleep(0.01)

    assert threading.current_thread() is threading.main_thread()
    asyncio.run(main())
    assert holder.current is not old and "/b" in holder.current.paths


def test_serve_reload_and_sighup_from_the_command_line(upstream, folder):
    """`llmproxy serve --reload` in its own process: a new file is served, SIGHUP reloads too."""
    (folder / "a.yaml").write_text(route(upstream, "/a"))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--routes", str(folder), "--port", str(port), "--reload",
         "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, 15)
        assert status(base, "/a") == 200
        put(folder / "b.yaml", route(upstream, "/b"))
        wait_for(lambda: status(base, "/b") == 200)
        assert [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]] == ["a", "b"]  # the new table
        reloads = reloaded(base)
        os.kill(proc.pid, signal.SIGHUP)  # reloads (unchanged files) and keeps serving
        wait_for(lambda: reloaded(base) == reloads + 1)
        assert proc.poll() is None and status(base, "/a") == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
