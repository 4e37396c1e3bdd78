"""The official `openai` client against the proxy, with the mock legacy-completions upstream behind it."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

ROUTE = """
    name: qwen-chat
    path: /v1/chat/completions
    upstream: {upstream}/v1/completions
    adapter: chat-to-completions
    stream: {stream}
    reasoning: {reasoning}
    default_headers: {{Authorization: Bearer s3cret, X-Route: chat}}
"""
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]
TOOL_TEXT = ('I will look both up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')


@pytest.fixture
def chat(upstream, routes_dir, proxy_for):
    """`chat(stream=..., reasoning=...)` -> an OpenAI client pointed at a fresh proxy."""

    def make(stream: str = "auto", reasoning: str = "none") -> openai.OpenAI:
        folder = routes_dir(chat=ROUTE.format(upstream=upstream.url, stream=stream, reasoning=reasoning))
        base = proxy_for(folder)
        return openai.OpenAI(base_url=f"{base}/v1", api_key="client-key", max_retries=0, timeout=10)

    return make


def text_headers(text: str, events: int | None = None) -> dict[str, str]:
    headers = {"x-mock-text-json": json.dumps(text)}
    if events is not None:
        headers["x-mock-events"] = str(events)
    return headers


def test_non_stream_returns_the_upstream_text_exactly(chat, upstream):
    client = chat()
    r = client.chat.completions.create(model="qwen", messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        extra_headers={"x-mock-text": "Hello, world!  Two spaces."})
    assert r.object == "chat.completion" and r.model == "qwen"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "Hello, world!  Two spaces."
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.total_tokens > 0
    seen = upstream.requests[-1]
    assert seen.path == "/v1/completions"
    assert seen.headers["authorization"] == "Bearer s3cret" and seen.headers["x-route"] == "chat"
    sent = json.loads(seen.body)
    assert sent["prompt"] == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                              "<|im_start|>assistant\n")
    assert sent["stop"] == ["<|im_end|>", "<|endoftext|>"]


def test_stream_returns_the_upstream_text_exactly_in_pieces(chat):
    client = chat()
    text = "One two three four five."
    stream = client.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "Count"}],
                                            stream=True, extra_headers={"x-mock-text": text})
    chunks = list(stream)
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert contents == ["One ", "two ", "three ", "four ", "five."]  # one chunk per upstream event
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.object == "chat.completion.chunk" and c.model == "qwen" for c in chunks)


def test_stream_include_usage_and_exactly_one_done(chat):
    client = chat()
    stream = client.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "Hi"}], stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    raw = httpx.post(str(client.base_url) + "chat/completions", timeout=10, json={
        "model": "qwen", "messages": [{"role": "user", "content": "Hi"}], "stream": True})
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.count("data: [DONE]") == 1 and raw.text.endswith("data: [DONE]\n\n")


def test_bad_request_is_a_400_the_client_understands(chat):
    client = chat()
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="qwen", messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}])
    assert err.value.status_code == 400
    assert err.value.body["param"] == "messages[0].content"


@pytest.mark.parametrize("stream", [False, True])
def test_tool_round_trip(chat, upstream, stream):
    client = chat()
    messages: list[dict] = [{"role": "user", "content": "Weather and time in Paris?"}]

    def ask(text: str):
        kw = dict(model="qwen", messages=messages, tools=TOOLS, extra_headers=text_headers(text, 17))
        if not stream:
            return client.chat.completions.create(**kw)
        state = ChatCompletionStreamState()
        for chunk in client.chat.completions.create(stream=True, **kw):
            state.handle_chunk(chunk)
        return state.get_final_completion()

    first = ask(TOOL_TEXT)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I will look both up."
    calls = choice.message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert len({c.id for c in calls}) == 2
    prompt = json.loads(upstream.requests[-1].body)["prompt"]
    assert "<tools>\n" + json.dumps(TOOLS[0], ensure_ascii=False) + "\n" in prompt

    messages.append(choice.message.model_dump(exclude_none=True, include={"role", "content", "tool_calls"}))
    messages.append({"role": "tool", "tool_call_id": calls[0].id, "content": "21 °C, sunny"})
    messages.append({"role": "tool", "tool_call_id": calls[1].id, "content": "12:00"})
    final = ask("It is 21 °C and sunny; the time is 12:00.")
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.content == "It is 21 °C and sunny; the time is 12:00."
    assert not final.choices[0].message.tool_calls
    prompt = json.loads(upstream.requests[-1].body)["prompt"]
    assert prompt.endswith(
        '<|im_start|>assistant\nI will look both up.\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
        "<|im_end|>\n<|im_start|>user\n<tool_response>\n21 °C, sunny\n</tool_response>\n<tool_response>\n12:00\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_streamed_tool_calls_accumulate_like_the_whole_answer(chat):
    client = chat()
    kw = dict(model="qwen", messages=[{"role": "user", "content": "x"}], tools=TOOLS)
    whole = client.chat.completions.create(**kw, extra_headers=text_headers(TOOL_TEXT))
    for events in (1, 5, 23, len(TOOL_TEXT)):
        state = ChatCompletionStreamState()
        for chunk in client.chat.completions.create(stream=True, **kw, extra_headers=text_headers(TOOL_TEXT, events)):
            state.handle_chunk(chunk)
        streamed = state.get_final_completion().choices[0]
        assert streamed.message.content == whole.choices[0].message.content
        assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls] == [
            (c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]
        assert streamed.finish_reason == whole.choices[0].finish_reason == "tool_calls"


# (A thought closed without `<think>` splits only after a template that pre-fills it: tests/test_reasoning_stream.py.)
@pytest.mark.parametrize("text", ["<think>\nTwo and two.\n</think>\n\nFour.", "\n<think>Two and two.</think>\n\nFour."])
def test_reasoning_split_out_when_enabled(chat, text):
    client = chat(reasoning="think")
    msg = client.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "2+2?"}],
                                         extra_headers=text_headers(text)).choices[0].message
    assert msg.content == "Four."
    assert msg.model_extra["reasoning_content"] == msg.model_extra["reasoning"] == "Two and two."
    reasoning, content = "", ""
    for chunk in client.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "2+2?"}],
                                                stream=True, extra_headers=text_headers(text, 9)):
        delta = chunk.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""
    assert (reasoning, content) == ("Two and two.", "Four.")


def test_reasoning_stays_in_content_when_not_enabled(chat):
    text = "<think>hmm</think>Four."
    msg = chat().chat.completions.create(model="qwen", messages=[{"role": "user", "content": "2+2?"}],
                                         extra_headers=text_headers(text)).choices[0].message
    assert msg.content == text and "reasoning_content" not in (msg.model_extra or {})


def test_stream_always_aggregates_for_a_non_stream_client(chat, upstream):
    r = chat(stream="always").chat.completions.create(model="qwen", messages=[{"role": "user", "content": "Hi"}],
                                                      extra_headers={"x-mock-text": "Streamed upstream, whole here."})
    assert r.choices[0].message.content == "Streamed upstream, whole here."
    assert r.usage is not None and r.usage.total_tokens > 0
    assert json.loads(upstream.requests[-1].body)["stream"] is True


def test_stream_never_synthesizes_chunks_for_a_stream_client(chat, upstream):
    stream = chat(stream="never").chat.completions.create(
        model="qwen", messages=[{"role": "user", "content": "Hi"}], stream=True,
        stream_options={"include_usage": True}, extra_headers={"x-mock-text": "Whole upstream, streamed here."})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Whole upstream, streamed here."
    assert chunks[-1].usage is not None
    assert "stream" not in json.loads(upstream.requests[-1].body)


def test_malformed_upstream_event_reaches_the_client_as_a_stream_error(routes_dir, upstream, proxy_for):
    """The upstream's second event is not JSON (the mock's `malformed-after:1` fault)."""
    folder = routes_dir(chat=ROUTE.format(upstream=upstream.url, stream="auto", reasoning="none"))
    base = proxy_for(folder)
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0, timeout=10)
    got = []
    with pytest.raises(openai.APIError, match="malformed stream event"):
        for chunk in client.chat.completions.create(
            model="qwen", stream=True, messages=[{"role": "user", "content": "Hi"}],
            extra_headers={"x-mock-text": "Hel lo", "x-mock-fault": "malformed-after:1"},
        ):
            got.append(chunk.choices[0].delta.content)
    assert got == ["Hel "]
