"""The official `anthropic` client (and Claude Code's request shape) against the Messages face,
with the mock legacy-completions upstream behind the proxy."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest

from faces_util import said, sse_events, tokenized

ROUTE = """
    name: qwen-messages
    path: /v1/messages
    upstream: {upstream}/v1/completions
    adapter: messages-to-completions
    reasoning: {reasoning}
    hosted_tools: {hosted}
    {extra}
    default_headers: {{Authorization: Bearer s3cret}}
"""
WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TOOL_TEXT = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')


@pytest.fixture
def messages(upstream, routes_dir, proxy_for):
    """`messages(reasoning=..., hosted=...)` -> (anthropic client, proxy base URL)."""

    def make(reasoning: str = "none", hosted: str = "ignore", extra: str = "") -> tuple[anthropic.Anthropic, str]:
        folder = routes_dir(messages=ROUTE.format(upstream=upstream.url, reasoning=reasoning, hosted=hosted,
                                                  extra=extra))
        base = proxy_for(folder)
        return anthropic.Anthropic(base_url=base, api_key="client-key", max_retries=0, timeout=10), base

    return make


def test_create_returns_a_message_and_renders_system_blocks(messages, upstream):
    client, _ = messages()
    msg = client.messages.create(
        model="qwen", max_tokens=100, system=[{"type": "text", "text": "You are terse."},
                                              {"type": "text", "text": "Answer in English."}],
        messages=[{"role": "user", "content": "Hi"}], extra_headers=said("Hello there!"))
    assert msg.type == "message" and msg.role == "assistant" and msg.model == "qwen"
    assert msg.id.startswith("msg_")
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == "Hello there!"
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    assert msg.usage.input_tokens > 0 and msg.usage.output_tokens == 2
    sent = json.loads(upstream.requests[-1].body)
    assert sent["prompt"] == ("<|im_start|>system\nYou are terse.\n\nAnswer in English.<|im_end|>\n"
                              "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert sent["max_tokens"] == 100


def test_stream_event_sequence_is_exactly_the_apis(messages):
    client, base = messages()
    with client.messages.stream(model="qwen", max_tokens=50, messages=[{"role": "user", "content": "Count"}],
                                extra_headers=said("One two three.")) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert pieces == ["One ", "two ", "three."]
    assert final.content[0].text == "One two three." and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 3 and final.usage.input_tokens > 0
    raw = httpx.post(f"{base}/v1/messages", timeout=10, headers=said("One two."), json={
        "model": "qwen", "max_tokens": 50, "stream": True, "messages": [{"role": "user", "content": "Hi"}]})
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    events = sse_events(raw.text)
    assert all(name == data["type"] for name, data in events)
    assert [name for name, _ in events] == [
        "message_start", "content_block_start", "ping", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop"]
    assert events[0][1]["message"]["content"] == [] and events[0][1]["message"]["stop_reason"] is None
    assert events[-2][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}


@pytest.mark.parametrize("stream", [False, True])
def test_tool_round_trip(messages, upstream, stream):
    client, _ = messages()
    history: list[dict] = [{"role": "user", "content": "Weather in Paris?"}]

    def ask(text: str) -> anthropic.types.Message:
        kw = dict(model="qwen", max_tokens=200, messages=history, tools=[WEATHER], extra_headers=said(text, 7))
        if not stream:
            return client.messages.create(**kw)
        with client.messages.stream(**kw) as s:
            return s.get_final_message()

    first = ask(TOOL_TEXT)
    assert first.stop_reason == "tool_use"
    assert [b.type for b in first.content] == ["text", "tool_use"]
    assert first.content[0].text == "Let me check."
    call = first.content[1]
    assert call.name == "get_weather" and call.input == {"city": "Paris"} and call.id.startswith("toolu_")
    history.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]})
    history.append({"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": call.id, "content": [{"type": "text", "text": "18 C, sunny"}]},
        {"type": "text", "text": "Thanks"}]})
    second = ask("It is 18 C and sunny.")
    assert second.content[0].text == "It is 18 C and sunny." and second.stop_reason == "end_turn"
    prompt = json.loads(upstream.requests[-1].body)["prompt"]
    assert ('<|im_start|>assistant\nLet me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n18 C, sunny\n'
            '</tool_response><|im_end|>\n<|im_start|>user\nThanks<|im_end|>\n') in prompt
    assert "<tools>" in prompt and '"name": "get_weather"' in prompt


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_call_with_bare_arguments_gives_the_same_object_streamed_or_not(messages, stream):
    """`tool_use.input` is always an object, and the stream's `partial_json` builds the same one."""
    client, _ = messages()
    kw = dict(model="qwen", max_tokens=200, messages=[{"role": "user", "content": "Echo hello"}], tools=[WEATHER],
              extra_headers=said('<tool_call>\n{"name": "get_weather", "arguments": "hello"}\n</tool_call>', 3))
    if stream:
        with client.messages.stream(**kw) as s:
            msg = s.get_final_message()
    else:
        msg = client.messages.create(**kw)
    (call,) = [b for b in msg.content if b.type == "tool_use"]
    assert call.input == {"arguments": "hello"}


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_blocks(messages, stream):
    client, _ = messages(reasoning="think")
    kw = dict(model="qwen", max_tokens=300, thinking={"type": "enabled", "budget_tokens": 200},
              messages=[{"role": "user", "content": "2+2?"}],
              extra_headers=said("<think>Two and two make four.</think>It is 4.", 5))
    if stream:
        with client.messages.stream(**kw) as s:
            kinds = [e.type for e in s]
            msg = s.get_final_message()
        assert "thinking" in kinds and "signature" in kinds
    else:
        msg = client.messages.create(**kw)
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking == "Two and two make four." and msg.content[0].signature
    assert msg.content[1].text == "It is 4."
    # The thinking block goes back in the history as Claude Code sends it.
    again = client.messages.create(model="qwen", max_tokens=50, messages=[
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": [b.model_dump() for b in msg.content]},
        {"role": "user", "content": "And 3+3?"}], extra_headers=said("6"))
    assert again.content[-1].text == "6"


def test_max_tokens_and_stop_sequence(messages, upstream):
    client, _ = messages()
    cut = client.messages.create(model="qwen", max_tokens=3, messages=[{"role": "user", "content": "Go"}],
                                 extra_headers=said("a b c", **{"x-mock-finish": "length"}))
    assert cut.stop_reason == "max_tokens"
    with client.messages.stream(model="qwen", max_tokens=30, stop_sequences=["END", "STOP"],
                                messages=[{"role": "user", "content": "Go"}],
                                extra_headers=said("a b", **{"x-mock-stop-reason": "STOP"})) as s:
        msg = s.get_final_message()
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == "STOP"
    assert json.loads(upstream.requests[-1].body)["stop"][:2] == ["END", "STOP"]


def test_what_claude_code_sends_works(messages, upstream, proxy_for):
    """The shape of a Claude Code request: `?beta=true`, several betas, many tools without `type`,
    system blocks with cache_control, context_management, metadata.user_id as JSON text, thinking
    with budget_tokens = max_tokens - 1, temperature in the body, and a server tool."""
    client, base = messages()
    tools = [{"name": f"Tool{i}", "description": f"tool {i}", "input_schema": {
        "type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"],
        "additionalProperties": False, "$schema": "http://json-schema.org/draft-07/schema#"}} for i in range(24)]
    tools.append({"type": "web_search_20250305", "name": "web_search", "max_uses": 5})
    body = {
        "model": "claude-sonnet-4-5-20250929", "max_tokens": 32000, "stream": True, "temperature": 1,
        "thinking": {"type": "enabled", "budget_tokens": 31999},
        "system": [{"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.",
                    "cache_control": {"type": "ephemeral"}},
                   {"type": "text", "text": "Be helpful.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>ctx</system-reminder>"},
            {"type": "text", "text": "hello", "cache_control": {"type": "ephemeral"}}]}],
        "tools": tools,
        "metadata": {"user_id": json.dumps({"device_id": "abc", "session_id": "s-1"})},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    }
    headers = {"anthropic-version": "2023-06-01", "x-api-key": "sk-ant-fake",
               "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27",
               "accept-encoding": "gzip, deflate, br, zstd", **said("Hi! How can I help?")}
    r = httpx.post(f"{base}/v1/messages?beta=true", json=body, headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    text = "".join(d["delta"].get("text", "") for n, d in events if n == "content_block_delta")
    assert text == "Hi! How can I help?" and events[-1][0] == "message_stop"
    seen = upstream.requests[-1]
    assert seen.path == "/v1/completions" and seen.query == ""  # `?beta=true` is not for the upstream
    assert seen.headers["accept-encoding"] == "identity"
    assert not {"x-api-key", "anthropic-version", "anthropic-beta"} & set(seen.headers)  # for the proxy only
    assert seen.headers["authorization"] == "Bearer s3cret"
    sent = json.loads(seen.body)
    assert sent["max_tokens"] == 32000 and sent["temperature"] == 1
    assert sent["prompt"].count('"name": "Tool') == 24 and "web_search" not in sent["prompt"]
    metrics = httpx.get(f"{base}/metrics", timeout=10).text
    assert 'llmproxy_tools_left_out_total{route="qwen-messages",tool="web_search_20250305"} 1.0' in metrics


def test_hosted_tools_reject_names_them(messages):
    client, _ = messages(hosted="reject")
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model="qwen", max_tokens=10, messages=[{"role": "user", "content": "x"}],
                               tools=[WEATHER, {"type": "web_search_20250305", "name": "web_search"}])
    assert err.value.body["type"] == "error"
    assert err.value.body["error"]["type"] == "invalid_request_error"
    assert "web_search_20250305" in err.value.body["error"]["message"]


def test_bad_input_gets_anthropic_errors_naming_the_field(messages):
    client, base = messages()
    r = httpx.post(f"{base}/v1/messages", timeout=10, json={"model": "q", "messages": [
        {"role": "user", "content": "x"}]})
    assert r.status_code == 400
    assert r.json() == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "max_tokens: Field required (the Messages API requires it)"}}
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model="q", max_tokens=10, messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
    assert err.value.body["error"]["message"].startswith("messages[0].content[1]: image blocks are not supported")
    r = httpx.post(f"{base}/v1/messages", timeout=10, content=b"{not json")
    assert r.status_code == 400 and r.json()["type"] == "error"
    r = httpx.post(f"{base}/v1/messages", timeout=10, json={"model": "q", "max_tokens": "ten", "messages": []})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]


def test_proxy_level_errors_in_anthropic_shape(messages, routes_dir, upstream, proxy_for):
    client, base = messages(extra="models: [qwen]")
    with pytest.raises(anthropic.NotFoundError) as err:
        client.messages.create(model="llama", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.InternalServerError) as err:
        client.messages.create(model="qwen", max_tokens=10, messages=[{"role": "user", "content": "x"}],
                               extra_headers={"x-mock-status": "500"})
    assert err.value.status_code == 500 and err.value.body["error"]["type"] == "api_error"
    assert "answered 500" in err.value.body["error"]["message"]
    big = httpx.post(f"{base}/v1/messages", timeout=10, content=b"x" * (11 * 2**20))
    assert big.status_code == 413 and big.json()["error"]["type"] == "request_too_large"


def test_unreachable_upstream_and_mid_stream_failure(routes_dir, proxy_for, upstream):
    folder = routes_dir(messages=ROUTE.format(upstream="http://127.0.0.1:9", reasoning="none", hosted="ignore",
                                              extra=""))
    base = proxy_for(folder)
    client = anthropic.Anthropic(base_url=base, api_key="k", max_retries=0, timeout=10)
    with pytest.raises(anthropic.APIStatusError) as err:
        client.messages.create(model="q", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 502 and err.value.body["error"]["type"] == "api_error"
    folder = routes_dir(messages=ROUTE.format(upstream=upstream.url + "", reasoning="none", hosted="ignore",
                                              extra=""))
    base = proxy_for(folder)
    client = anthropic.Anthropic(base_url=base, api_key="k", max_retries=0, timeout=10)
    with pytest.raises(anthropic.APIStatusError) as err:
        with client.messages.stream(model="q", max_tokens=10, messages=[{"role": "user", "content": "x"}],
                                    extra_headers=said("a b c d", **{"x-mock-fault": "drop-after:2"})) as s:
            s.get_final_message()
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "api_error"


def test_count_tokens_uses_the_upstream_tokenizer_or_estimates(messages, upstream, routes_dir, proxy_for):
    client, _ = messages()
    kw = dict(model="qwen", messages=[{"role": "user", "content": "one two three"}], system="sys")
    counted = client.messages.count_tokens(**kw)
    prompt, count = tokenized(upstream)
    assert prompt.endswith("<|im_start|>user\none two three<|im_end|>\n<|im_start|>assistant\n")
    assert counted.input_tokens == count
    # An upstream without /tokenize (here: a path prefix the mock does not serve) -> the estimate.
    folder = routes_dir(messages=ROUTE.format(upstream=upstream.url + "/other", reasoning="none",
                                              hosted="ignore", extra=""))
    other = anthropic.Anthropic(base_url=proxy_for(folder), api_key="k", max_retries=0, timeout=10)
    assert other.messages.count_tokens(**kw).input_tokens == -(-len(prompt.encode()) // 4)


@pytest.mark.parametrize("mode", ["always", "never"])
def test_route_stream_modes(messages, mode):
    """`stream: always` (SSE upstream, whole answer to the client) and `never` (the reverse)."""
    client, _ = messages(extra=f"stream: {mode}")
    whole = client.messages.create(model="q", max_tokens=20, messages=[{"role": "user", "content": "x"}],
                                   extra_headers=said("a b c"))
    assert whole.content[0].text == "a b c" and whole.stop_reason == "end_turn"
    with client.messages.stream(model="q", max_tokens=20, messages=[{"role": "user", "content": "x"}],
                                extra_headers=said("a b c")) as s:
        assert s.get_final_message().content[0].text == "a b c"


def test_thinking_switch_reaches_the_template(messages, upstream):
    """`thinking: disabled` renders Qwen3's empty think block (`enable_thinking: false`); enabled does not."""
    client, _ = messages(extra="template: qwen3")
    client.messages.create(model="q", max_tokens=10, thinking={"type": "disabled"},
                           messages=[{"role": "user", "content": "x"}])
    assert json.loads(upstream.requests[-1].body)["prompt"].endswith("<think>\n\n</think>\n\n")
    client.messages.create(model="q", max_tokens=10, thinking={"type": "enabled", "budget_tokens": 1024},
                           messages=[{"role": "user", "content": "x"}])
    assert json.loads(upstream.requests[-1].body)["prompt"].endswith("<|im_start|>assistant\n")


def test_stream_and_whole_agree_however_the_upstream_splits(messages):
    """The same completion (thinking, text, two tool calls), split into 1..40 upstream events, gives the
    same message streamed (the SDK's accumulator) as whole."""
    client, _ = messages(reasoning="think")
    text = ("<think>Look up both.</think>Checking both cities.\n" + TOOL_TEXT.split("\n", 1)[1]
            + '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    kw = dict(model="q", max_tokens=100, tools=[WEATHER], messages=[{"role": "user", "content": "x"}])

    def shape(m):
        return [(b.type, getattr(b, "text", None) or getattr(b, "thinking", None) or getattr(b, "input", None))
                for b in m.content], m.stop_reason

    whole = shape(client.messages.create(**kw, extra_headers=said(text)))
    assert whole == ([("thinking", "Look up both."), ("text", "Checking both cities."),
                      ("tool_use", {"city": "Paris"}), ("tool_use", {"city": "Oslo"})], "tool_use")
    for events in (1, 2, 3, 7, 13, 40):
        with client.messages.stream(**kw, extra_headers=said(text, events)) as s:
            assert shape(s.get_final_message()) == whole, events
