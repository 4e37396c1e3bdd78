"""`balance_load:` the engines' own queue depth, read from fakes on loopback that serve the
engines' metric texts (each text as the engine's source writes it: proxy/adapters/dialects.py)."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import httpx
import pytest

from proxy import engine_load
from proxy.adapters.dialects import FACTS
from proxy.config import ConfigError, load_file
from proxy.engine_load import LoadWatch, queue_depth
from proxy.routes import RouteTable
from test_balance import access, fleet, route, served, turns  # noqa: F401 (fleet: a fixture)


def vllm_text(running: int, waiting: int) -> str:
    """vLLM's /metrics (vllm/v1/metrics/loggers.py): one series per engine, beside a longer name."""
    return (
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        f'vllm:num_requests_running{{engine="0",model_name="m"}} {float(running)}\n'
        "# TYPE vllm:num_requests_waiting gauge\n"
        f'vllm:num_requests_waiting{{engine="0",model_name="m"}} {float(waiting)}\n'
        'vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 50.0\n'
        'vllm:num_preemptions_total{engine="0",model_name="m"} 7.0\n'
    )


def llama_text(processing: int, deferred: int) -> str:
    """llama-server's /metrics with --metrics (tools/server/server-task.cpp `to_metrics`)."""
    return (
        "# HELP llamacpp:requests_processing Number of requests processing\n"
        "# TYPE llamacpp:requests_processing gauge\n"
        f"llamacpp:requests_processing {processing}\n"
        "# HELP llamacpp:requests_deferred Number of requests deferred\n"
        "# TYPE llamacpp:requests_deferred gauge\n"
        f"llamacpp:requests_deferred {deferred}\n"
    )


def sglang_text(running: int, queued: int) -> str:
    """SGLang's /metrics with --enable-metrics (python/sglang/srt/metrics/collector.py)."""
    labels = 'engine_type="unified",model_name="m",moe_ep_rank="0",pp_rank="0",tp_rank="0"'
    return (f"sglang:num_running_reqs{{{labels}}} {float(running)}\n"
            f"sglang:num_queue_reqs{{{labels}}} {float(queued)}\n"
            f"sglang:num_grammar_queue_reqs{{{labels}}} 9.0\n")


def gauges(dialect: str) -> frozenset[bytes]:
    report = FACTS[dialect].load
    assert report is not None
    return frozenset(g.encode() for g in report.gauges)


def test_each_engines_text_gives_its_queue_depth():
    assert queue_depth(vllm_text(3, 4).encode(), gauges("vllm")) == 7  # the *_by_reason series is not counted
    assert queue_depth(llama_text(4, 2).encode(), gauges("llama.cpp")) == 6
    assert queue_depth(sglang_text(5, 1).encode(), gauges("sglang")) == 6
    two_engines = vllm_text(1, 0) + vllm_text(2, 2).replace('engine="0"', 'engine="1"')
    assert queue_depth(two_engines.encode(), gauges("vllm")) == 5  # data-parallel engines add up
    assert queue_depth(llama_text(1, 1).encode(), gauges("vllm")) is None  # not this server's names
    assert FACTS["openai"].load is None


def _scraped(*mocks, times: int = 2) -> None:
    """Wait until each mock was scraped `times` more times: the earlier answers have been applied."""
    marks = [m.mock.scrapes for m in mocks]
    deadline = time.monotonic() + 10
    while any(m.mock.scrapes < k + times for m, k in zip(mocks, marks)):
        assert time.monotonic() < deadline, "the upstreams were scraped"
        time.sleep(0.02)


LOAD = "{from: metrics, interval: 0.1}"


def test_least_busy_counts_what_the_engine_reports(fleet, routes_dir, proxy_for):
    """Another proxy replica keeps `a` busy: this one sees it in a's metrics and sends elsewhere."""
    a, b = fleet[:2]
    a.mock.metrics_text, b.mock.metrics_text = vllm_text(3, 2), vllm_text(0, 0)
    base = proxy_for(routes_dir(r=route([a, b], balance="least-busy", balance_load=LOAD)))
    _scraped(a, b)
    for _ in range(4):
        assert httpx.post(f"{base}/v1/completions", json={"prompt": "p"}, timeout=10).status_code == 200
    assert (len(a.requests), len(b.requests)) == (0, 4)


def test_the_prefix_guard_spills_when_the_engine_reports_a_queue(fleet, routes_dir, proxy_for, caplog):
    caplog.set_level(logging.INFO, logger="llmproxy.access")
    a, b = fleet[:2]
    a.mock.metrics_text = b.mock.metrics_text = sglang_text(0, 0)
    base = proxy_for(routes_dir(r=route([a, b], balance="{policy: prefix, spill_margin: 4}", dialect="sglang",
                                        balance_load=LOAD)))
    prompts = turns("loaded", 3)
    assert httpx.post(f"{base}/v1/completions", json={"prompt": prompts[0]}, timeout=10).status_code == 200
    home, other = (a, b) if served([a, b], "[conversation loaded]") == [0] else (b, a)
    home.mock.metrics_text = sglang_text(4, 1)  # 5 requests from elsewhere: more than the margin
    _scraped(a, b)
    assert httpx.post(f"{base}/v1/completions", json={"prompt": prompts[1]}, timeout=10).status_code == 200
    assert any("turn 1 of loaded" in q.body for q in other.requests)
    home.mock.metrics_text = sglang_text(4, 0)  # 4: within the margin; the conversation now lives on `other`
    _scraped(a, b)
    assert httpx.post(f"{base}/v1/completions", json={"prompt": prompts[2]}, timeout=10).status_code == 200
    assert any("turn 2 of loaded" in q.body for q in other.requests)
    assert [rec["choice"] for rec in access(caplog, 3)] == ["least-busy", "spill", "affinity"]


def test_a_failing_scrape_stops_contributing_and_marks_nothing_down(fleet, routes_dir, proxy_for, caplog):
    caplog.set_level(logging.INFO, logger="llmproxy")
    a, b = fleet[:2]
    a.mock.metrics_text, b.mock.metrics_text = llama_text(4, 3), llama_text(0, 0)
    base = proxy_for(routes_dir(r=route([a, b], balance="least-busy", dialect="llama.cpp", balance_load=LOAD)))
    _scraped(a, b)
    for _ in range(2):
        assert httpx.post(f"{base}/v1/completions", json={"prompt": "p"}, timeout=10).status_code == 200
    assert len(a.requests) == 0
    a.mock.metrics_text = None  # llama-server without --metrics: 501
    _scraped(a, b)
    for _ in range(4):
        assert httpx.post(f"{base}/v1/completions", json={"prompt": "p"}, timeout=10).status_code == 200
    assert (len(a.requests), len(b.requests)) == (2, 4)  # ties in turn again; `a` still serves
    warnings = [r.getMessage() for r in caplog.records if r.name == "llmproxy.engine_load"]
    assert len(warnings) == 1 and "answered 501 (start llama-server with --metrics)" in warnings[0], warnings
    a.mock.metrics_text = llama_text(0, 0)
    _scraped(a)
    assert any("is read again" in r.getMessage() for r in caplog.records if r.name == "llmproxy.engine_load")


def test_a_reload_stops_the_routes_task(fleet, routes_dir, monkeypatch):
    monkeypatch.setattr(engine_load, "MAX_TICK", 0.05)
    a, b = fleet[:2]
    a.mock.metrics_text = b.mock.metrics_text = vllm_text(0, 0)
    watched = RouteTable.from_dir(routes_dir(r=route([a, b], balance="least-busy", balance_load="{interval: 0.05}")))
    plain = RouteTable.from_dir(routes_dir(r=route([a, b], balance="least-busy")))

    class Holder:
        current = watched

    async def main() -> tuple[int, int]:
        async with aiohttp.ClientSession() as client:
            task = asyncio.ensure_future(LoadWatch(Holder).run(client))  # type: ignore[arg-type]
            await asyncio.sleep(0.5)
            Holder.current = plain  # a reload that drops balance_load
            # A scrape already under way may land late on a loaded machine: wait for the count to hold
            # still for 0.3 s (it cannot while the task scrapes every 0.05 s), bounded at 5 s.
            stopped, deadline = -1, asyncio.get_running_loop().time() + 5
            while stopped != a.mock.scrapes and asyncio.get_running_loop().time() < deadline:
                stopped = a.mock.scrapes
                await asyncio.sleep(0.3)
            await asyncio.sleep(0.5)
            task.cancel()
            return stopped, a.mock.scrapes - stopped

    stopped, after = asyncio.run(main())
    assert stopped >= 3  # scraped while the route had balance_load
    assert after == 0  # then no more


ROUTE = "path: /v1/completions\nupstream: [http://127.0.0.1:1/v1/completions, http://127.0.0.1:2/v1/completions]\n"


@pytest.mark.parametrize(("extra", "error"), [
    ("balance_load: {from: metrics}\n", "balance_load: round-robin does not look at load"),
    ("balance: least-busy\ndialect: openai\nbalance_load: {}\n",
     "balance_load: dialect openai reports no load (dialect vllm or llama.cpp or sglang does)"),
    ("balance: prefix\nbalance_load: {interval: 0}\n", "balance_load.interval: must be a positive"),
    ("balance: prefix\nbalance_load: {from: slots}\n", "balance_load.from"),
])
def test_config_errors(tmp_path, extra, error):
    f = tmp_path / "r.yaml"
    f.write_text(ROUTE + extra)
    with pytest.raises(ConfigError, match=error.replace("(", r"\(").replace(")", r"\)")):
        load_file(f)


def test_config_long_form(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text(ROUTE + "balance: prefix\ndialect: llama.cpp\nbalance_load: {from: metrics, interval: 5}\n")
    load = load_file(f).balance_load
    assert load is not None and (load.source, load.interval, load.timeout) == ("metrics", 5.0, 1.0)


def test_check_shows_the_engine_load(routes_dir, capsys):
    from proxy.cli import main as cli

    folder = routes_dir(m=ROUTE + "balance: least-busy\ndialect: llama.cpp\nbalance_load: {interval: 5}\n")
    assert cli(["check", "--routes", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "(balance: least-busy, engine load every 5 s)" in out
    assert "no effect" not in out  # on passthrough, `dialect:` says where the engine reports its load


def test_the_guard_moves_a_session_off_an_engine_loaded_from_elsewhere(fleet, routes_dir, proxy_for, caplog):
    """A session sticks to its upstream unless the guard moves it: here because its engine reports a queue."""
    caplog.set_level(logging.INFO, logger="llmproxy.access")
    a, b = fleet[:2]
    a.mock.metrics_text = b.mock.metrics_text = vllm_text(0, 0)
    base = proxy_for(routes_dir(r=route([a, b], balance="{policy: least-busy, spill_margin: 2, "
                                                        "session: {header: x-session-id}}", balance_load=LOAD)))
    hdrs = {"x-session-id": "s-9"}
    for k in range(2):
        assert httpx.post(f"{base}/v1/completions", json={"prompt": f"q{k}"}, headers=hdrs).status_code == 200
    home, other = (a, b) if a.requests else (b, a)
    assert len(home.requests) == 2
    home.mock.metrics_text = vllm_text(2, 1)
    _scraped(a, b)
    for k in range(2):
        assert httpx.post(f"{base}/v1/completions", json={"prompt": f"r{k}"}, headers=hdrs).status_code == 200
    assert len(other.requests) == 2  # moved, and stays on its new upstream
    assert [rec["choice"] for rec in access(caplog, 4)] == ["session", "session", "spill", "session"]
