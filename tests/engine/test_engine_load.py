"""`balance_load:` against the real llama-server: its `/metrics` gauges are the ones the dialect
names, they count a busy slot and a deferred request, and the proxy steers by them."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

from conftest import start_engine
from proxy.adapters.dialects import FACTS
from proxy.engine_load import queue_depth
from servers import run_mock


def depth(url: str) -> float | None:
    report = FACTS["llama.cpp"].load
    assert report is not None
    text = httpx.get(f"{url}{report.path}", timeout=10).content
    return queue_depth(text, frozenset(g.encode() for g in report.gauges))


def test_the_engines_own_queue_steers_least_busy(engine_bin: Path, engine_model: Path, tmp_path: Path,
                                                 routes_dir, proxy_for):  # fmt: skip
    with start_engine(engine_bin, engine_model, tmp_path, slots=1) as eng, run_mock() as mock:
        assert depth(eng.url) == 0  # the gauges are there (names as the binary writes them), idle
        # Another proxy replica's traffic: two long generations on a one-slot engine, one of them deferred.
        body = {"prompt": "hello", "max_tokens": 1800, "ignore_eos": True}
        others = [threading.Thread(target=lambda: httpx.post(f"{eng.url}/v1/completions", json=body, timeout=120),
                                   daemon=True) for _ in range(2)]
        for t in others:
            t.start()
        deadline = time.monotonic() + 20
        while depth(eng.url) != 2:  # requests_processing 1 + requests_deferred 1
            assert time.monotonic() < deadline, "llama-server reported its busy slot and its deferred request"
            time.sleep(0.05)
        base = proxy_for(routes_dir(r=f"""
            path: /v1/completions
            upstream: [{eng.url}/v1/completions, {mock.url}/v1/completions]
            dialect: llama.cpp
            balance: least-busy
            balance_load: {{interval: 0.1}}
        """))
        marks = mock.mock.scrapes
        while mock.mock.scrapes < marks + 2:  # scraped together: the engine's answer has been applied
            assert time.monotonic() < deadline + 10, "the upstreams were scraped"
            time.sleep(0.02)
        for _ in range(3):
            r = httpx.post(f"{base}/v1/completions", json={"prompt": "p", "max_tokens": 1}, timeout=30)
            assert r.status_code == 200, r.text
        assert len(mock.requests) == 3  # all went to the idle one; without balance_load, ties would alternate
        for t in others:
            t.join(120)
