"""Key rotation on a Kubernetes Secret volume: the kubelet swaps `..data`, never the visible file.

`serve --keys /etc/llmproxy/keys/keys.yaml` must read and watch that path as given: resolved
once at start, it would name the first timestamped folder, which the kubelet deletes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from kubelet import project
from servers import free_port, stop, wait_ready

OLD = "sk-old-0123456789abcdef"
NEW = "sk-new-fedcba9876543210"
WITHIN = 2.0  # seconds the issue allows for a rotation to take effect
CONFIRM = 30.0  # seconds the polling that confirms it may take (16 fresh connections on a loaded machine)


def _keys(*pairs: tuple[str, str]) -> dict[str, str]:
    return {"keys.yaml": "keys:\n" + "".join(f"  - name: {n}\n    key: {k}\n" for n, k in pairs)}


def _status(base: str, key: str) -> int:
    # A fresh connection each time, so that with --workers 2 both workers are asked.
    return httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5).status_code


def _streak(holds: Callable[[], bool], since: float, what: str) -> float:
    """Poll until `holds()` is true 8 times in a row (fresh connections: both workers), within CONFIRM s
    of `since`; the time the streak began (its own requests are the measurement, not the swap's delay)."""
    began, streak = since, 0
    while streak < 8:
        assert time.monotonic() - since < CONFIRM, what
        asked = time.monotonic()
        if holds():
            began = asked if streak == 0 else began
            streak += 1
        else:
            streak = 0
        time.sleep(0.02)
    return began


def _until(base: str, key: str, status: int, keep: str) -> None:
    """Poll until `key` answers `status` 8 times in a row; the streak must have begun within WITHIN s
    of the swap; meanwhile `keep` must never be refused."""

    def holds() -> bool:
        reached = _status(base, key) == status
        assert _status(base, keep) == 200, "a key that stays valid was refused during the rotation"
        return reached

    swapped = time.monotonic()
    began = _streak(holds, swapped, f"key did not reach {status} for 8 requests in a row")
    assert began - swapped < WITHIN, f"key did not reach {status} within {WITHIN} s"


def _serve(workers: int, routes: Path, tmp_path: Path) -> tuple[Path, str, Path, subprocess.Popen[bytes]]:
    """A real `serve --keys` on a Secret volume holding only OLD: (volume, base URL, stderr file, process)."""
    volume = tmp_path / "secret"
    project(volume, _keys(("old", OLD)), mode=0o440)
    port = free_port()
    err = tmp_path / "stderr"
    env = {k: v for k, v in os.environ.items() if k not in ("PROMETHEUS_MULTIPROC_DIR", "LLMPROXY_KEYS")}
    with err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--routes", str(routes), "--port", str(port),
             "--workers", str(workers), "--keys", str(volume / "keys.yaml"), "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=stderr, env=env, cwd=tmp_path,
        )  # fmt: skip
    return volume, f"http://127.0.0.1:{port}", err, proc


@pytest.mark.parametrize("workers", [1, 2])
def test_a_key_rotated_on_a_secret_volume_works_and_the_revoked_one_is_refused(workers, completions_route, tmp_path):
    volume, base, err, proc = _serve(workers, completions_route, tmp_path)
    try:
        wait_ready(proc, base, err)
        assert _status(base, OLD) == 200 and _status(base, NEW) == 401
        # The README's rotation: add the new key, move the clients, remove the old one.
        project(volume, _keys(("old", OLD), ("new", NEW)), mode=0o440)
        _until(base, NEW, 200, keep=OLD)
        project(volume, _keys(("new", NEW)), mode=0o440)
        _until(base, OLD, 401, keep=NEW)
        assert [p.name for p in volume.iterdir() if p.name.startswith("..2")] != [], "the kubelet layout"
    finally:
        code = stop(proc)
    assert code == 0, err.read_text()
    assert "not reloaded" not in err.read_text()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_key_swapped_outright_never_leaves_a_connection_with_neither_key(workers, completions_route, tmp_path):
    """The kubelet's swap from a Secret holding only the old key to one holding only the new:
    within WITHIN s the old key is refused and the new one works on every worker, and on each
    connection (one worker) at every moment one of the two is accepted: asked old first, then
    new, a reload between the two still leaves one 200. Never both refused, never a flap back."""
    volume, base, err, proc = _serve(workers, completions_route, tmp_path)
    # Keep-alive connections stay on the worker that accepted them; several, so both workers are likely asked.
    clients = [httpx.Client(base_url=base, timeout=5) for _ in range(6)]
    try:
        wait_ready(proc, base, err)

        def ask(client: httpx.Client, key: str) -> int:
            return client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code

        for client in clients:
            assert (ask(client, OLD), ask(client, NEW)) == (200, 401)
        project(volume, _keys(("new", NEW)), mode=0o440)
        projected = time.monotonic()
        swapped = [False] * len(clients)
        while not all(swapped):
            # The time a round of asking starts: a connection seen swapped in it had swapped by then or
            # during it (12 requests, which a loaded machine may stretch: not the rotation's delay).
            round_start = time.monotonic()
            assert round_start - projected < WITHIN, f"not every connection saw the swap within {WITHIN} s"
            for i, client in enumerate(clients):
                old, new = ask(client, OLD), ask(client, NEW)
                assert 200 in (old, new), "both keys refused on one worker during the swap"
                if swapped[i]:
                    assert (old, new) == (401, 200), "a worker went back to the revoked key"
                swapped[i] = swapped[i] or (old, new) == (401, 200)
            time.sleep(0.02)
        # Fresh connections too, so every worker is asked: a worker the kept connections missed may
        # swap a poll later (each watches the file itself), hence no "never refused" across workers.
        began = _streak(lambda: (_status(base, OLD), _status(base, NEW)) == (401, 200), projected,
                        "fresh connections did not all see the swap")
        assert began - projected < WITHIN, f"a worker did not see the swap within {WITHIN} s"
    finally:
        for client in clients:
            client.close()
        code = stop(proc)
    assert code == 0, err.read_text()
    assert "not reloaded" not in err.read_text()
