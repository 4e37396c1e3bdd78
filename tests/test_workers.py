"""`llmproxy serve --workers 2`: one port, two processes, metrics that add up across them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from servers import free_port


def _requests_total(base: str, route: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=5).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "llmproxy_requests_total" and s.labels["route"] == route
    )


def _log_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, "the workers did not start\n" + err.read_text()
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
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

        # Whichever worker answers the scrape, it reports every worker's requests.
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
