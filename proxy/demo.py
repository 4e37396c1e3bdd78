"""`python -m proxy.demo` (`just demo`): the default route end to end, on loopback, in a few seconds.

Starts the mock upstream and the proxy (uvicorn) on ephemeral loopback ports
over the shipped `routes.d/` with `QWEN_BASE_URL` pointed at the mock, streams
one chat answer with the official `openai` client printing the deltas as they
arrive, shows a tool-call round trip, a streamed Anthropic Messages answer with
a tool call (the `anthropic` SDK, as Claude Code) and a streamed OpenAI
Responses answer (as Codex), then shuts both down. Every route's
upstream is checked to be on loopback before anything is sent, so the
shipped default address is never reached.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .settings import env_default

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_TIMEOUT = 10.0  # seconds, per request and per start/stop step


@contextmanager
def _mock_upstream() -> Iterator[str]:
    from .mock_upstream import MockUpstream

    ready = threading.Event()
    box: dict[str, Any] = {}

    def main() -> None:
        loop = asyncio.new_event_loop()
        server = loop.run_until_complete(MockUpstream().serve("127.0.0.1", 0))
        box.update(loop=loop, port=server.sockets[0].getsockname()[1])
        ready.set()
        loop.run_forever()
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()

    thread = threading.Thread(target=main, name="mock-upstream", daemon=True)
    thread.start()
    if not ready.wait(_TIMEOUT):
        raise RuntimeError("the mock upstream did not start")
    try:
        yield f"http://127.0.0.1:{box['port']}"
    finally:
        box["loop"].call_soon_threadsafe(box["loop"].stop)
        thread.join(_TIMEOUT)


@contextmanager
def _proxy(routes: Path) -> Iterator[str]:
    import uvicorn

    from .app import create_app
    from .routes import RouteTable

    table = RouteTable.from_dir(routes)
    for route in table.routes:
        for url in route.upstreams:
            if urlsplit(url).hostname not in _LOOPBACK:
                raise SystemExit(f"demo: route {route.name} points at {url}, not at loopback; refusing to send")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(table), loop="uvloop", http="httptools", access_log=False, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="proxy", daemon=True)
    thread.start()
    deadline = time.monotonic() + _TIMEOUT
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the proxy did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(_TIMEOUT)
        sock.close()


def _say(text: str = "", end: str = "\n") -> None:
    sys.stdout.write(text + end)
    sys.stdout.flush()


def run(routes: Path, pace_ms: int = 60) -> None:
    """The demo over `routes`; the mock spaces its stream events `pace_ms` apart so the deltas show."""
    import openai

    with _mock_upstream() as mock:
        os.environ["QWEN_BASE_URL"] = mock  # the shipped routes read it at load time
        os.environ.pop("QWEN_API_KEY", None)
        with _proxy(routes) as base:
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="demo", max_retries=0, timeout=_TIMEOUT)
            _say(f"mock upstream {mock}, proxy {base}, routes {routes}\n")

            _say("1) streaming chat: POST /v1/chat/completions, stream=True")
            _say("   deltas: ", end="")
            stream = client.chat.completions.create(
                model="qwen", stream=True, stream_options={"include_usage": True},
                messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}],
                extra_headers={"x-mock-text": "Hello! The proxy turned your chat into a completion and back.",
                               "x-mock-interval-ms": str(pace_ms)},
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    _say(f"[{chunk.choices[0].delta.content}]", end="")
                if chunk.usage:
                    _say(f"\n   usage: {chunk.usage.prompt_tokens} prompt + {chunk.usage.completion_tokens} "
                         "completion tokens")

            _say("\n2) tool call: the model answers with <tool_call>, the client gets tool_calls")
            tools = [{"type": "function", "function": {
                "name": "get_weather", "description": "Current weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
            messages: list[Any] = [{"role": "user", "content": "What's the weather in Paris?"}]
            scripted = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
            first = client.chat.completions.create(model="qwen", messages=messages, tools=tools,
                                                   extra_headers={"x-mock-text-json": json.dumps(scripted)})
            call = first.choices[0].message.tool_calls[0]
            _say(f"   finish_reason={first.choices[0].finish_reason}  "
                 f"{call.function.name}({call.function.arguments})  id={call.id}")
            answer = first.choices[0].message.model_dump(exclude_none=True, include={"role", "content", "tool_calls"})
            messages += [answer, {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21, "sky": "sunny"}'}]
            reply = json.dumps("It is 21 °C and sunny in Paris.")  # JSON-escaped: header values are ASCII
            final = client.chat.completions.create(model="qwen", messages=messages, tools=tools,
                                                   extra_headers={"x-mock-text-json": reply})
            _say(f"   after the tool result: {final.choices[0].message.content}")

            _say("\n3) Anthropic Messages (Claude Code, the anthropic SDK): POST /v1/messages, streamed")
            import anthropic

            claude = anthropic.Anthropic(base_url=base, api_key="demo", max_retries=0, timeout=_TIMEOUT)
            with claude.messages.stream(
                model="qwen", max_tokens=256, messages=[{"role": "user", "content": "What's the weather in Paris?"}],
                tools=[{"name": "get_weather", "description": "Current weather in a city",
                        "input_schema": tools[0]["function"]["parameters"]}],
                extra_headers={"x-mock-text-json": json.dumps("Let me look.\n" + scripted),
                               "x-mock-interval-ms": str(pace_ms)},
            ) as events:
                _say("   events: ", end="")
                for ev in events:
                    if ev.type in ("content_block_start", "message_delta", "message_stop"):
                        _say(f"[{ev.type}]", end="")
                msg = events.get_final_message()
            blocks = ", ".join(f"{b.type}({b.input if b.type == 'tool_use' else b.text!r})" for b in msg.content)
            _say(f"\n   content: {blocks}; stop_reason={msg.stop_reason}")

            _say("\n4) OpenAI Responses (Codex, the Agents SDK): POST /v1/responses, streamed")
            _say("   deltas: ", end="")
            with client.responses.stream(
                model="qwen", input="Say hello.", instructions="Be brief.",
                extra_headers={"x-mock-text": "Hello from the Responses face.", "x-mock-interval-ms": str(pace_ms)},
            ) as rstream:
                for rev in rstream:
                    if rev.type == "response.output_text.delta":
                        _say(f"[{rev.delta}]", end="")
                response = rstream.get_final_response()
            _say(f"\n   status={response.status}, output_text={response.output_text!r}")
    _say("\ndone: both servers stopped.")


def main() -> int:
    routes = Path(env_default("routes") or Path(__file__).resolve().parent.parent / "routes.d")
    started = time.monotonic()
    run(routes)
    _say(f"({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
