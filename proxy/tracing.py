"""Opt-in OpenTelemetry traces: one span per proxied request, GenAI semantic conventions.

Off by default, and then free: nothing here imports OpenTelemetry, and the forwarder
pays one `TRACER is not None` test per request. `serve --otlp-endpoint URL` (or
`setup(exporter=...)` in tests) turns it on; the SDK and the OTLP/HTTP exporter are the
optional `otel` extra, a well-kept library rather than a hand-written OTLP encoder.

Each span follows the GenAI client-span conventions
(https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-spans/): name
`{gen_ai.operation.name} {gen_ai.request.model}`, kind CLIENT, attributes
`gen_ai.operation.name`, `gen_ai.request.model`, `gen_ai.response.model`,
`gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens`,
`gen_ai.response.finish_reasons`, `server.address`, `server.port`, and `error.type`
on failures. The client's W3C `traceparent` (if any) is the span's parent, and the
span's own `traceparent` goes upstream, so a vLLM started with
`--otlp-traces-endpoint` continues the same trace.

Finish reasons and token counts are read from the bytes the client gets (so they are
known for every adapter, passthrough included); prompts and completions are recorded
only with `--otlp-content` (they are user data), as `gen_ai.input.messages` and
`gen_ai.output.messages`.
"""

from __future__ import annotations

import re
import time
from time import perf_counter
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgspec

from . import errors
from .request_model import read_once
from .served import AUTO
from .version import version

if TYPE_CHECKING:
    from .forward import Exchange
    from .observe import Meter

TRACER: Any = None  # an opentelemetry Tracer while tracing is on; the forwarder tests this
CONTENT = False  # record prompts and completions
_provider: Any = None

_CONTENT_CAP = 1 << 20  # bytes of an answer kept for `gen_ai.output.messages`
_FINISH = re.compile(rb'"(?:finish_reason|stop_reason)"\s*:\s*"([A-Za-z_]+)"')
_INPUT = re.compile(rb'"(?:prompt_tokens|input_tokens)"\s*:\s*(\d+)')
_OUTPUT = re.compile(rb'"(?:completion_tokens|output_tokens)"\s*:\s*(\d+)')
_TAIL = 512  # bytes of the previous chunk kept to match across a chunk boundary


def missing() -> str | None:
    """Why tracing cannot be turned on here, or None."""
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as exc:
        return f"OpenTelemetry is not installed ({exc.name}); install the extra: pip install 'llmproxy[otel]'"
    return None


def setup(endpoint: str | None = None, *, content: bool = False, exporter: Any = None) -> Any:
    """Turn tracing on: spans go to `exporter` (tests: the SDK's InMemorySpanExporter, sent
    at once) or over OTLP/HTTP to `endpoint` (batched). Returns the TracerProvider.

    The provider is ours, not the global one: the proxy may run inside an application
    that has its own."""
    global TRACER, CONTENT, _provider
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "llmproxy", "service.version": version()}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    shutdown()
    _provider = provider
    TRACER = provider.get_tracer("llmproxy", version())
    CONTENT = content
    return provider


def flush() -> None:
    """Send the spans batched so far (the app's shutdown; the process may exit next)."""
    if _provider is not None:
        _provider.force_flush()


def shutdown() -> None:
    """Send what is batched and turn tracing off (at the app's shutdown)."""
    global TRACER, _provider
    if _provider is not None:
        _provider.shutdown()
    TRACER = None
    _provider = None


def start(exchange: Exchange, scope: dict[str, Any], meter: Meter) -> Span:
    """The span of one exchange, started when the request arrived; its `traceparent` is put
    into the upstream request's headers."""
    return Span(exchange, scope, meter)


class Span:
    """One request's span, and what it learns from the answer's bytes on the way out."""

    __slots__ = ("span", "finish_reasons", "input_tokens", "output_tokens", "content", "_tail", "_send")

    def __init__(self, exchange: Exchange, scope: dict[str, Any], meter: Meter) -> None:
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        propagator = TraceContextTextMapPropagator()
        incoming = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
                    if k in (b"traceparent", b"tracestate")}  # fmt: skip
        parent = propagator.extract(incoming) if incoming else None
        route = exchange.route
        model = read_once(meter)
        operation = operation_name(route.config.adapter, route.config.path)
        parts = urlsplit(exchange.upstream.url)
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "server.address": parts.hostname or "",
            "server.port": parts.port or (443 if parts.scheme == "https" else 80),
            "http.request.method": exchange.method,
            "url.path": route.config.path,
            "llmproxy.route": route.name,
        }
        if model is not None:
            attributes["gen_ai.request.model"] = model
        started = time.time_ns() - int((perf_counter() - meter.start) * 1e9)
        self.span = TRACER.start_span(
            f"{operation} {model}" if model else operation,
            context=parent, kind=SpanKind.CLIENT, attributes=attributes, start_time=started,
        )  # fmt: skip
        carrier: dict[str, str] = {}
        from opentelemetry.trace import set_span_in_context

        propagator.inject(carrier, context=set_span_in_context(self.span))
        exchange.headers = [(k, v) for k, v in exchange.headers if k.lower() not in ("traceparent", "tracestate")]
        exchange.headers.extend(carrier.items())
        self.finish_reasons: list[str] = []
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.content: bytearray | None = bytearray() if CONTENT else None
        self._tail = b""
        self._send: Any = None
        if CONTENT and meter.body:
            self.span.set_attribute("gen_ai.input.messages", _input_messages(meter.body))

    def wrap(self, send: Any) -> Any:
        self._send = send
        return self.send

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            body = message.get("body")
            if body:
                self._read(body)
        await self._send(message)

    def _read(self, chunk: bytes) -> None:
        text = self._tail + chunk
        for m in _FINISH.finditer(text):
            if m.end() > len(self._tail):  # a match wholly inside the tail was counted last time
                self.finish_reasons.append(m.group(1).decode())
        for m in _INPUT.finditer(text):
            self.input_tokens = int(m.group(1))
        for m in _OUTPUT.finditer(text):
            self.output_tokens = int(m.group(1))
        self._tail = chunk[-_TAIL:]
        if self.content is not None and len(self.content) < _CONTENT_CAP:
            self.content += chunk[: _CONTENT_CAP - len(self.content)]

    def end(self, exchange: Exchange, meter: Meter) -> None:
        from opentelemetry.trace import Status, StatusCode

        span = self.span
        route = exchange.route
        usage = exchange.call.usage
        inp, out = usage if usage else (self.input_tokens, self.output_tokens)
        request_model = read_once(meter)
        pinned = route.config.upstream_model
        response_model = pinned if pinned and pinned != AUTO else request_model  # `auto`: learnt per upstream
        if response_model is not None:
            span.set_attribute("gen_ai.response.model", response_model)
        if inp is not None:
            span.set_attribute("gen_ai.usage.input_tokens", inp)
        if out is not None:
            span.set_attribute("gen_ai.usage.output_tokens", out)
        if self.finish_reasons:
            span.set_attribute("gen_ai.response.finish_reasons", list(dict.fromkeys(self.finish_reasons)))
        if meter.status is not None:
            span.set_attribute("http.response.status_code", meter.status)
        if exchange.choice is not None:  # `balance:`: which upstream served, and why
            span.set_attribute("llmproxy.upstream", exchange.upstream.label)
            span.set_attribute("llmproxy.upstream.choice", exchange.choice)
        err = exchange.error
        if err is not None or (meter.status or 0) >= 500 or exchange.disconnected:
            # An upstream's own status is the error type (OTel's HTTP convention); its `code` is a string or null.
            kind = "client_disconnected" if exchange.disconnected and err is None else (
                str(err.status) if isinstance(err, errors.UpstreamStatus)
                else str(err.code) if err is not None and err.code is not None
                else type(err).__name__ if err else "http_error"
            )
            span.set_attribute("error.type", kind)
            span.set_status(Status(StatusCode.ERROR, kind))
        if self.content is not None and self.content:
            span.set_attribute("gen_ai.output.messages", _output_messages(bytes(self.content)))
        span.end()


def operation_name(adapter: str, path: str) -> str:
    """`gen_ai.operation.name`: a translating adapter serves a chat face (chat, Messages,
    Responses); a passthrough route is named by its path."""
    if adapter != "passthrough" or path.endswith(("/chat/completions", "/messages", "/responses")):
        return "chat"
    if path.endswith("/completions"):
        return "text_completion"
    if path.endswith("/embeddings"):
        return "embeddings"
    return path.rstrip("/").rsplit("/", 1)[-1] or "request"


class _Body(msgspec.Struct):
    model: Any = None
    messages: Any = None
    prompt: Any = None
    input: Any = None
    system: Any = None


def _body(data: bytes | None) -> _Body | None:
    if not data:
        return None
    try:
        return msgspec.json.decode(data, type=_Body)
    except msgspec.DecodeError:
        return None


def _input_messages(data: bytes) -> str:
    """The conversation as the client sent it (chat `messages`, Responses `input`, a `prompt`)."""
    body = _body(data)
    if body is None:
        return data[:_CONTENT_CAP].decode("utf-8", "replace")
    if body.messages is not None:
        messages = body.messages if body.system is None else [{"role": "system", "content": body.system}, *body.messages]
    elif body.input is not None:
        messages = body.input if isinstance(body.input, list) else [{"role": "user", "content": body.input}]
    else:
        messages = [{"role": "user", "content": body.prompt}]
    return msgspec.json.encode(messages).decode()


def _output_messages(data: bytes) -> str:
    """The answer's text, joined from a JSON body or from SSE events, as one assistant message."""
    docs: list[Any] = []
    if data.lstrip().startswith(b"{"):
        try:
            docs.append(msgspec.json.decode(data))
        except msgspec.DecodeError:
            pass
    else:
        for line in data.split(b"\n"):
            if line.startswith(b"data:"):
                try:
                    docs.append(msgspec.json.decode(line[5:].strip()))
                except msgspec.DecodeError:
                    continue
    texts: list[str] = []
    for doc in docs:
        if not isinstance(doc, dict):
            continue
        for choice in doc.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            part = choice.get("message") or choice.get("delta") or {}
            text = part.get("content") if isinstance(part, dict) else None
            text = text if isinstance(text, str) else choice.get("text")
            if isinstance(text, str):
                texts.append(text)
        delta = doc.get("delta")
        if isinstance(delta, dict) and isinstance(delta.get("text"), str):  # Anthropic Messages stream
            texts.append(delta["text"])
        elif isinstance(delta, str) and doc.get("type") == "response.output_text.delta":  # OpenAI Responses stream
            texts.append(delta)
        for block in doc.get("content") or ():  # Anthropic Messages, whole
            if isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
        for item in doc.get("output") or ():  # OpenAI Responses, whole
            for part in (item.get("content") or ()) if isinstance(item, dict) else ():
                if isinstance(part, dict) and part.get("type") == "output_text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
    return msgspec.json.encode([{"role": "assistant", "content": "".join(texts)}]).decode()
