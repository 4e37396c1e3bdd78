"""Opt-in OpenTelemetry traces, read with the SDK's in-memory exporter; off by default and free."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from proxy import tracing
from proxy.app import create_app
from proxy.routes import RouteTable
from servers import run_app

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_PARENT = f"00-{CLIENT_TRACE}-b7ad6b7169203331-01"


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    tracing.setup(exporter=exporter)
    try:
        yield exporter
    finally:
        tracing.shutdown()


@pytest.fixture
def chat_route(upstream, routes_dir):
    return routes_dir(q=f"""
        name: qwen-chat
        path: /v1/chat/completions
        models: [qwen]
        upstream_model: Qwen2.5-7B-Instruct
        adapter: chat-to-completions
        upstream: {upstream.url}/v1/completions
    """)


def test_one_span_per_request_with_genai_attributes_and_traceparent_upstream(upstream, chat_route, spans):
    import openai

    with run_app(create_app(RouteTable.from_dir(chat_route))) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0,
                               default_headers={"traceparent": CLIENT_PARENT})  # fmt: skip
        r = client.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "secret prompt"}],
                                           extra_headers={"x-mock-text": "a b c"})  # fmt: skip
        assert r.choices[0].message.content == "a b c"
        chunks = list(client.chat.completions.create(
            model="qwen", messages=[{"role": "user", "content": "hi there"}], stream=True,
            extra_headers={"x-mock-text": "one two three four", "x-mock-events": "4"},
        ))  # fmt: skip
        assert chunks
    whole, streamed = spans.get_finished_spans()
    for span in (whole, streamed):
        assert span.name == "chat qwen" and span.kind is SpanKind.CLIENT
        a = span.attributes
        assert a["gen_ai.operation.name"] == "chat"
        assert a["gen_ai.request.model"] == "qwen"
        assert a["gen_ai.response.model"] == "Qwen2.5-7B-Instruct"
        assert a["gen_ai.response.finish_reasons"] == ("stop",)
        assert a["server.address"] == "127.0.0.1" and a["server.port"] == upstream.port
        assert span.status.status_code is not StatusCode.ERROR
        # The client's trace continues: its traceparent is the span's parent.
        assert format(span.context.trace_id, "032x") == CLIENT_TRACE
        assert format(span.parent.span_id, "016x") == "b7ad6b7169203331"
    assert (whole.attributes["gen_ai.usage.input_tokens"], whole.attributes["gen_ai.usage.output_tokens"]) == (
        r.usage.prompt_tokens, r.usage.completion_tokens)
    assert streamed.attributes["gen_ai.usage.output_tokens"] == 4  # the proxy asks the upstream for usage
    # Upstream gets the span's own traceparent (same trace, the span as parent), not the client's.
    sent = [req.headers["traceparent"] for req in upstream.requests]
    assert sent == [f"00-{CLIENT_TRACE}-{format(s.context.span_id, '016x')}-01" for s in (whole, streamed)]
    # No prompt or completion text unless --otlp-content.
    for span in (whole, streamed):
        assert not any("secret prompt" in str(v) or "a b c" == v for v in span.attributes.values())
        assert "gen_ai.input.messages" not in span.attributes


def test_passthrough_spans_learn_finish_reasons_and_usage_from_the_answer(upstream, routes_dir, spans):
    folder = routes_dir(c=f"path: /v1/completions\nupstream: {upstream.url}/v1/completions\n")
    with run_app(create_app(RouteTable.from_dir(folder))) as base:
        r = httpx.post(f"{base}/v1/completions", json={"model": "m", "prompt": "one two"}, headers={"x-mock-text": "x y"})
        assert r.status_code == 200
        assert httpx.post(f"{base}/v1/completions", json={"model": "m", "prompt": "p"},
                          headers={"x-mock-status": "503"}).status_code == 503  # fmt: skip
    ok, failed = spans.get_finished_spans()
    assert ok.name == "text_completion m" and ok.attributes["gen_ai.operation.name"] == "text_completion"
    assert ok.attributes["gen_ai.usage.input_tokens"] == 2 and ok.attributes["gen_ai.usage.output_tokens"] == 2
    assert ok.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert ok.parent is None  # no traceparent from the client: a new trace
    assert failed.status.status_code is StatusCode.ERROR and failed.attributes["error.type"] == "503"


def test_content_is_recorded_only_when_asked(upstream, chat_route):
    exporter = InMemorySpanExporter()
    tracing.setup(exporter=exporter, content=True)
    try:
        with run_app(create_app(RouteTable.from_dir(chat_route))) as base:
            body = {"model": "qwen", "messages": [{"role": "user", "content": "what is 2+2"}], "stream": True}
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body,
                              headers={"x-mock-text": "four", "x-mock-events": "2"}) as r:  # fmt: skip
                r.read()
    finally:
        tracing.shutdown()
    (span,) = exporter.get_finished_spans()
    assert span.attributes["gen_ai.input.messages"] == '[{"role":"user","content":"what is 2+2"}]'
    assert span.attributes["gen_ai.output.messages"] == '[{"role":"assistant","content":"four"}]'


def test_tracing_off_imports_no_opentelemetry_and_sends_no_traceparent(upstream, routes_dir):
    assert tracing.TRACER is None
    folder = routes_dir(c=f"path: /v1/completions\nupstream: {upstream.url}/v1/completions\n")
    with run_app(create_app(RouteTable.from_dir(folder))) as base:
        assert httpx.post(f"{base}/v1/completions", json={"model": "m", "prompt": "p"}).status_code == 200
    assert "traceparent" not in upstream.requests[0].headers
    code = ("import sys, proxy.app, proxy.cli, proxy.forward; "
            "sys.exit(any(m.startswith('opentelemetry') for m in sys.modules))")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_otlp_endpoint_without_the_extra_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_otel(name, *args, **kwargs):
        if name.startswith("opentelemetry"):
            raise ImportError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_otel)
    assert "pip install 'llmproxy[otel]'" in tracing.missing()


def test_serve_exports_over_otlp_http(upstream, routes_dir, tmp_path):
    """`llmproxy serve --otlp-endpoint`: spans reach a (loopback) collector as OTLP/HTTP protobuf,
    flushed at the latest when the server stops."""
    import os
    import signal
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from servers import free_port

    received: list[tuple[str, str, bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            received.append((self.path, self.headers.get("content-type", ""), body))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    collector = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    folder = routes_dir(c=f"path: /v1/completions\nupstream: {upstream.url}/v1/completions\n")
    port = free_port()
    endpoint = f"http://127.0.0.1:{collector.server_port}/v1/traces"
    err = tmp_path / "stderr"
    with err.open("wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--routes", str(folder), "--port", str(port),
                                 "--otlp-endpoint", endpoint], stdout=subprocess.DEVNULL, stderr=stderr)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "m", "prompt": "p"}, timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)  # only the server this test started
        assert proc.wait(15) == 0
        collector.shutdown()
    assert received, "no spans exported\n" + err.read_text()
    path, content_type, body = received[0]
    assert path == "/v1/traces" and content_type == "application/x-protobuf"
    assert b"gen_ai.request.model" in body and b"text_completion m" in body
    assert os.environ.get("LLMPROXY_OTLP_ENDPOINT") is None  # the test process is untouched


@pytest.mark.parametrize(
    "answer",
    [
        b'{"choices":[{"index":0,"message":{"role":"assistant","content":"Hi there"}}]}',  # chat
        b'{"choices":[{"index":0,"text":"Hi there"}]}',  # completions
        b'data: {"choices":[{"delta":{"content":"Hi "}}]}\n\ndata: {"choices":[{"delta":{"content":"there"}}]}\n\n'
        b"data: [DONE]\n\n",  # chat stream
        b'{"type":"message","content":[{"type":"text","text":"Hi there"}]}',  # Anthropic Messages
        b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"type":"text_delta","text":"Hi "}}'
        b'\n\nevent: content_block_delta\ndata: {"type":"content_block_delta","delta":{"type":"text_delta",'
        b'"text":"there"}}\n\n',  # Anthropic stream
        b'{"object":"response","output":[{"type":"message","content":[{"type":"output_text","text":"Hi there"}]}]}',
        b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"Hi "}\n\n'
        b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"there"}\n\n',
    ],
)
def test_output_content_is_read_from_every_face(answer):
    assert tracing._output_messages(answer) == '[{"role":"assistant","content":"Hi there"}]'


def test_a_balanced_route_names_the_upstream_and_why_on_the_span(upstream, routes_dir, spans):
    folder = routes_dir(c=f"path: /v1/completions\nupstream: [{upstream.url}/v1/completions]\nbalance: least-busy\n")
    with run_app(create_app(RouteTable.from_dir(folder))) as base:
        assert httpx.post(f"{base}/v1/completions", json={"model": "m", "prompt": "p"}).status_code == 200
    (span,) = spans.get_finished_spans()
    assert span.attributes["llmproxy.upstream"] == f"{upstream.url}/v1/completions"
    assert span.attributes["llmproxy.upstream.choice"] == "least-busy"
