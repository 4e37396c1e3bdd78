"""`python -m proxy.demo` runs end to end on loopback and refuses any other upstream."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy import demo

SHIPPED = Path(__file__).resolve().parent.parent / "routes.d"


def test_demo_streams_and_calls_a_tool_over_the_shipped_routes(monkeypatch, capsys):
    monkeypatch.setenv("QWEN_BASE_URL", "http://127.0.0.1:9")  # restored after; the demo points it at its mock
    demo.run(SHIPPED, pace_ms=1)
    out = capsys.readouterr().out
    assert "[Hello! ][The ][proxy ]" in out  # deltas printed as they arrived, one per upstream event
    assert "finish_reason=tool_calls  get_weather" in out
    assert "after the tool result: It is 21 °C and sunny in Paris." in out
    assert "both servers stopped" in out


def test_demo_refuses_a_route_that_is_not_on_loopback(routes_dir, monkeypatch):
    folder = routes_dir(far="""
        path: /v1/chat/completions
        upstream: http://192.0.2.10:8019/v1/completions  # TEST-NET-1: never routed
        adapter: chat-to-completions
    """)
    with pytest.raises(SystemExit, match="not at loopback"):
        demo.run(folder)
