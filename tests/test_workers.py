"""`llmproxy serve --workers 2`: one port, two processes, metrics that add up across them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from servers import free_port, stop, wait_ready


def _requests_total(base: str, route: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=5).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "llmproxy_requests_total" and s.labels["route"] == route
    )


def _log_lines(path: Path) -> list[dict]:
    """The JSON lines written so far; a line still being written (no newline yet) is left for later."""
    text = path.read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.strip()]


def test_two_workers_share_one_port_and_their_metrics_add_up(upstream, routes_dir, tmp_path):
    folder = routes_dir(w=f"name: workers\npath: /v1/completions\nupstream: {upstream.url}/v1/completions\n")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--routes", str(folder), "--port", str(port), "--workers", "2"],
            stdout=stdout, stderr=stderr, env=env,
        )  # fmt: skip
    try:
        wait_ready(proc, base, err)
        logs = _log_lines(err)
        (shared,) = [Path(line["message"].rsplit(" ", 1)[1]) for line in logs if "are summed through" in line["message"]]
        assert shared.is_dir()

        # Fresh connections until both workers have served some (each counts into its own file).
        sent = 0
        pids: set[str] = set()
        deadline = time.monotonic() + 20
        while len(pids) < 2 and sent < 300 and time.monotonic() < deadline:
            r = httpx.post(f"{base}/v1/completions", json={"model": "m", "prompt": "hi"}, timeout=5)
            assert r.status_code == 200
            sent += 1
            pids = {p.stem.rsplit("_", 1)[1] for p in shared.glob("counter_*.db")}
        assert len(pids) == 2, "both workers should have served requests"

        # Whichever worker answers the scrape, it reports every worker's requests. A worker counts a
        # request after its last byte went out, so the scrape (maybe on the other worker) can come
        # first: wait for the last count, then ask again.
        _wait(lambda: _requests_total(base, "workers") == sent, 10, "the workers' counts do not add up")
        for _ in range(6):
            assert _requests_total(base, "workers") == sent
    finally:
        proc.send_signal(signal.SIGTERM)  # only the server this test started
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0, err.read_text()
    assert not shared.exists(), "the CLI removes the metrics folder it made"
    access = [line for line in _log_lines(out)]
    assert len(access) == sent and {line["event"] for line in access} == {"access"}
    assert {line["status"] for line in access} == {200}


@contextmanager
def _workers(folder: Path, tmp_path: Path, *extra: str) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    """`serve --workers 2` over `folder`, ready; stopped (exit 0) at the end."""
    port, err = free_port(), tmp_path / "stderr"
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--routes", str(folder), "--port", str(port), "--workers", "2",
             *extra],
            stdout=subprocess.DEVNULL, stderr=stderr, env=env,
        )  # fmt: skip
    try:
        wait_ready(proc, base, err)
        # /readyz answers once one worker is up; a SIGHUP reaching the other before its app installed
        # the handler would kill it (SIGHUP's default action), and uvicorn would replace it.
        _wait(lambda: _started(err) >= 2, 30, "both workers should start")
        yield proc, base, err
    finally:
        assert stop(proc) == 0


def _wait(check, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _started(err: Path) -> int:
    """Workers whose app has started (uvicorn's line, after the lifespan set the SIGHUP handler)."""
    return sum(m == "Application startup complete." for m in _messages(err))


def _statuses(base: str, path: str, n: int = 12) -> set[int]:
    """Each on a fresh connection, so both workers answer some."""
    return {httpx.post(f"{base}{path}", json={"model": "m", "prompt": "hi"}, timeout=5).status_code for _ in range(n)}


def _all_ok(base: str, path: str) -> bool:
    """Every one of a few fresh connections answered 200 (a connection the killed worker had
    accepted may still fail while uvicorn replaces it)."""
    try:
        return _statuses(base, path, 16) == {200}
    except httpx.TransportError:
        return False


def _reloads(base: str, result: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=5).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "llmproxy_reloads_total" and s.labels["result"] == result)  # fmt: skip


def _messages(err: Path) -> list[str]:
    return [line["message"] for line in _log_lines(err)]


def _break_and_sighup(route_file: Path, proc: subprocess.Popen, err: Path) -> None:
    route_file.write_text("path: /v1/a\nupstream: [not a url\n")
    proc.send_signal(signal.SIGHUP)
    _wait(lambda: any("routes not reloaded" in m for m in _messages(err)), 5, "the broken file was not reported")


def test_sighup_with_workers_reports_a_broken_file_once_and_keeps_serving(upstream, routes_dir, tmp_path):
    good = f"path: /v1/a\nupstream: {upstream.url}/v1/completions\n"
    folder = routes_dir(a=good)
    with _workers(folder, tmp_path) as (proc, base, err):
        _break_and_sighup(folder / "a.yaml", proc, err)
        time.sleep(1.5)  # room for a second report, or for uvicorn's restart of the workers, to show up
        assert _statuses(base, "/v1/a") == {200}  # every worker keeps the previous table
        assert _reloads(base, "failed") == 1  # what an alert watches, counted once

        (folder / "a.yaml").write_text(good)
        (folder / "b.yaml").write_text(f"path: /v1/b\nupstream: {upstream.url}/v1/completions\n")
        proc.send_signal(signal.SIGHUP)
        _wait(lambda: sum("routes reloaded from" in m and "route(s)" in m for m in _messages(err)) == 2, 15,
              "both workers should reload")  # fmt: skip
        assert _statuses(base, "/v1/b") == {200}
        assert _reloads(base, "ok") == 2  # one per worker
        assert proc.poll() is None
    text = err.read_text()
    assert "Traceback" not in text and "aborting the restart" not in text, text
    reports = [m for m in _messages(err) if "routes not reloaded" in m]
    assert len(reports) == 1 and "a.yaml:3: yaml:" in reports[0], reports
    assert not any(line["level"] == "error" and "routes not reloaded" not in line["message"] for line in _log_lines(err))


def test_reload_with_workers_is_watched_once(upstream, routes_dir, tmp_path):
    folder = routes_dir(a=f"path: /v1/a\nupstream: {upstream.url}/v1/completions\n")
    with _workers(folder, tmp_path, "--reload") as (proc, base, err):
        (folder / "b.yaml").write_text("path: /v1/b\nupstream: {not a url\n")
        _wait(lambda: any("routes not reloaded" in m for m in _messages(err)), 5, "the broken file was not reported")
        (folder / "b.yaml").write_text(f"path: /v1/b\nupstream: {upstream.url}/v1/completions\n")
        _wait(lambda: _statuses(base, "/v1/b", 6) == {200}, 10, "the fixed file was not picked up by every worker")
    assert len([m for m in _messages(err) if "routes not reloaded" in m]) == 1
    assert "Traceback" not in err.read_text()


def _workers_of(pid: int) -> set[int]:
    """uvicorn's worker processes (multiprocessing `spawn` children), not its resource tracker."""
    out = set()
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            out.add(int(child))
    return out


def test_a_worker_replaced_while_a_file_is_broken_serves_the_last_good_table(upstream, routes_dir, tmp_path):
    """uvicorn replaces a worker that dies; with a broken file the newcomer serves the table the
    others serve instead of failing to start (and uvicorn restarting it over and over)."""
    folder = routes_dir(a=f"path: /v1/a\nupstream: {upstream.url}/v1/completions\n")
    with _workers(folder, tmp_path) as (proc, base, err):
        _break_and_sighup(folder / "a.yaml", proc, err)
        before = _workers_of(proc.pid)
        assert len(before) >= 2
        victim = min(before)
        os.kill(victim, signal.SIGKILL)  # a worker of the server this test started
        _wait(lambda: any("serving the last table that loaded" in m for m in _messages(err)), 30,
              "no replacement worker started")  # fmt: skip
        _wait(lambda: len(_workers_of(proc.pid) - before) >= 1, 30, "the worker was not replaced")
        _wait(lambda: _all_ok(base, "/v1/a"), 15, "the replacement does not serve the last good table")
        # No restart loop: a worker started on the broken file does not fail. (How many workers
        # start is uvicorn's business: on a loaded machine it also replaces a worker whose health
        # ping is late, and that one serves the last good table too.) A failing newcomer would
        # log a traceback, and uvicorn would stop the parent ("failed to start") or restart it.
        time.sleep(2)
        assert proc.poll() is None
        text = err.read_text()
        assert "Traceback" not in text and "failed to start" not in text, text
        assert _all_ok(base, "/v1/a")
    # The broken file is reported as an error once (by the supervisor), however many workers start on it.
    assert [line["message"] for line in _log_lines(err) if line["level"] == "error"] == [
        m for m in _messages(err) if "routes not reloaded" in m]
    assert len([m for m in _messages(err) if "routes not reloaded" in m]) == 1



def test_a_sighup_to_a_starting_worker_is_taken_once_it_can_reload_not_its_death(upstream, routes_dir, tmp_path):
    """A SIGHUP can reach a worker before its app has set the handler (the supervisor passes one on
    to every worker, also to one uvicorn has just spawned; an operator signals one): SIGHUP's default
    action killed it. Workers start with SIGHUP blocked and take it once their handler is set: the
    newcomer lives, and reloads."""
    folder = routes_dir(a=f"path: /v1/a\nupstream: {upstream.url}/v1/completions\n")
    with _workers(folder, tmp_path) as (proc, base, err):
        before = _workers_of(proc.pid)
        os.kill(min(before), signal.SIGKILL)  # a worker of the server this test started: uvicorn replaces it
        deadline = time.monotonic() + 30
        while not (new := _workers_of(proc.pid) - before):
            assert time.monotonic() < deadline, "the worker was not replaced"
            time.sleep(0.005)
        os.kill(min(new), signal.SIGHUP)  # spawned a moment ago: still importing, far from its handler
        _wait(lambda: _started(err) >= 3, 30, "the replacement did not start")
        _wait(lambda: sum("routes reloaded from" in m and "route(s)" in m for m in _messages(err)) == 1, 10,
              "the replacement did not reload on the SIGHUP it was sent")  # fmt: skip
        assert _all_ok(base, "/v1/a")
    died = [m for m in _messages(err) if m.startswith("Child process") and m.endswith("died")]
    assert len(died) == 1, died  # the one the test killed
