"""The chat -> completions adapter on its own: request mapping, validation, response and chunk translation."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from proxy.adapters.chat_completions import ChatToCompletions
from proxy.config import RouteConfig
from proxy.errors import BadRequest, UpstreamBroken


def adapter(**kw: Any) -> ChatToCompletions:
    return ChatToCompletions(RouteConfig(name="chat", path="/v1/chat/completions",
                                         upstream="http://127.0.0.1:9/v1/completions",
                                         adapter="chat-to-completions", **kw))


def body(**kw: Any) -> bytes:
    doc = {"model": "qwen", "messages": [{"role": "user", "content": "Hi"}]}
    doc.update(kw)
    return json.dumps(doc).encode()


def upstream_doc(call: Any) -> dict[str, Any]:
    """The upstream body (without `max_tokens` when it waits for `auto`: no client limit)."""
    return json.loads(call.body)


def completion(*texts: str, finish: str = "stop", usage: bool = True, **extra: Any) -> bytes:
    doc: dict[str, Any] = {
        "id": "cmpl-abc", "object": "text_completion", "created": 1700000000, "model": "Qwen2.5-7B",
        "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": finish} for i, t in enumerate(texts)],
    }
    if usage:
        doc["usage"] = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    doc.update(extra)
    return json.dumps(doc).encode()


def event(text: str, finish: str | None = None, index: int = 0) -> bytes:
    return b"data: " + json.dumps({"id": "cmpl-abc", "object": "text_completion", "created": 1700000000,
                                   "choices": [{"index": index, "text": text, "finish_reason": finish}]}).encode() + b"\n\n"


USAGE_EVENT = b'data: {"id":"cmpl-abc","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}\n\n'


def run_events(call: Any, chunks: list[bytes]) -> list[bytes]:
    async def source():
        for c in chunks:
            yield c

    async def collect():
        return [e async for e in call.events(source())]

    return asyncio.run(collect())


def parse_sse(out: list[bytes]) -> list[Any]:
    """Every `data:` payload, in order (`[DONE]` as the string)."""
    events = []
    for block in b"".join(out).split(b"\n\n"):
        if block:
            assert block.startswith(b"data: "), block
            payload = block[6:]
            events.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return events


# --- request -------------------------------------------------------------------------------------

def test_prompt_stops_and_sampling_parameters_are_carried_over():
    call = adapter().request(body(
        max_tokens=50, temperature=0.2, top_p=0.9, n=2, stop=["END", "<|im_end|>"], seed=7, presence_penalty=0.5,
        frequency_penalty=0.25, logit_bias={"42": -100}, user="u1", top_k=20, min_p=0.05, repetition_penalty=1.1,
        store=True, metadata={"x": "y"}, parallel_tool_calls=False, response_format={"type": "text"},
    ))
    assert upstream_doc(call) == {
        "prompt": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "model": "qwen",
        "max_tokens": 50, "temperature": 0.2, "top_p": 0.9, "n": 2, "stop": ["END", "<|im_end|>", "<|endoftext|>"],
        "seed": 7, "presence_penalty": 0.5, "frequency_penalty": 0.25, "logit_bias": {"42": -100.0}, "user": "u1",
        "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
        "store": True, "metadata": {"x": "y"},  # not chat translation's: forwarded (vLLM takes extensions)
    }
    assert call.stream is False and call.translates is True


def test_minimal_request_sends_template_stops_only():
    assert upstream_doc(adapter().request(body())) == {
        "prompt": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "model": "qwen",
        "stop": ["<|im_end|>", "<|endoftext|>"]}


def test_client_stop_string_comes_first():
    assert upstream_doc(adapter().request(body(stop="\n\n")))["stop"] == ["\n\n", "<|im_end|>", "<|endoftext|>"]


def test_max_completion_tokens_wins_over_max_tokens():
    assert upstream_doc(adapter().request(body(max_tokens=5, max_completion_tokens=9)))["max_tokens"] == 9
    assert upstream_doc(adapter().request(body(max_completion_tokens=9)))["max_tokens"] == 9


def test_logprobs_map_to_the_completions_form():
    assert upstream_doc(adapter().request(body(logprobs=True, top_logprobs=3)))["logprobs"] == 3
    assert upstream_doc(adapter().request(body(logprobs=True)))["logprobs"] == 0
    assert "logprobs" not in upstream_doc(adapter().request(body(logprobs=False, top_logprobs=3)))


def test_upstream_model_is_sent_but_the_client_sees_its_own_name():
    call = adapter(upstream_model="Qwen2.5-7B-Instruct").request(body(model="qwen"))
    assert upstream_doc(call)["model"] == "Qwen2.5-7B-Instruct"
    assert json.loads(call.response(completion("ok")))["model"] == "qwen"


@pytest.mark.parametrize(("mode", "client", "upstream"), [
    ("auto", False, False), ("auto", True, True), ("always", False, True), ("never", True, False)])
def test_stream_mode_decides_what_the_upstream_does(mode, client, upstream):
    call = adapter(stream=mode).request(body(stream=client))
    doc = upstream_doc(call)
    assert call.stream is client
    assert doc.get("stream", False) is upstream
    assert ("stream_options" in doc) is upstream  # usage is always asked on upstream streams (metrics)


@pytest.mark.parametrize(("messages", "param"), [
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": 5}],
     "messages[2].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}], "messages[0].content"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "developer", "content": "x"}], "messages[0].role"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {}}]}],
     "messages[0].tool_calls[0].function.name"),
    ([], "messages"),
])
def test_bad_messages_are_400_naming_the_field(messages, param):
    with pytest.raises(BadRequest) as err:
        adapter().request(json.dumps({"model": "m", "messages": messages}).encode())
    assert err.value.status == 400 and err.value.param == param


def test_body_that_is_not_json_is_400():
    with pytest.raises(BadRequest) as err:
        adapter().request(b"{not json")
    assert err.value.code == "invalid_json"


def test_missing_messages_is_400_naming_it():
    with pytest.raises(BadRequest) as err:
        adapter().request(b'{"model": "m"}')
    assert err.value.param == "messages"


@pytest.mark.parametrize(("extra", "param"), [
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    ({"audio": {"voice": "alloy"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function",
      "function": {"name": "g"}}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"n": 0}, "n"),
    ({"temperature": "hot"}, "temperature"),
])
def test_unsupported_or_wrong_parameters_are_refused_with_a_reason(extra, param):
    with pytest.raises(BadRequest) as err:
        adapter().request(body(**extra))
    assert err.value.param == param
    assert err.value.message


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "get_time"}}]


def test_tool_choice_steers_the_listed_tools():
    prompt = upstream_doc(adapter().request(body(tools=TOOLS)))["prompt"]
    assert '"get_weather"' in prompt and '"get_time"' in prompt
    prompt = upstream_doc(adapter().request(body(tools=TOOLS, tool_choice="none")))["prompt"]
    assert "<tools>" not in prompt
    prompt = upstream_doc(adapter().request(body(tools=TOOLS, tool_choice={
        "type": "function", "function": {"name": "get_time"}})))["prompt"]
    assert '"get_time"' in prompt and '"get_weather"' not in prompt


def test_tool_choice_none_leaves_tool_call_text_as_content():
    call = adapter().request(body(tools=TOOLS, tool_choice="none"))
    text = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    assert json.loads(call.response(completion(text)))["choices"][0]["message"]["content"] == text


# --- whole answers -------------------------------------------------------------------------------

def test_text_completion_becomes_chat_completion():
    call = adapter().request(body())
    doc = json.loads(call.response(completion("Hello there.")))
    assert doc == {
        "id": "chatcmpl-abc", "object": "chat.completion", "created": 1700000000, "model": "qwen",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there."},
                     "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    }
    assert call.usage == (7, 3)


def test_trailing_stop_tokens_never_leak():
    call = adapter().request(body(n=2))
    doc = json.loads(call.response(completion("Hi!<|im_end|>", "Yo<|endoftext|><|im_end|>", finish="length")))
    assert [c["message"]["content"] for c in doc["choices"]] == ["Hi!", "Yo"]
    # The turn ended at the template stop the proxy cut at, whatever the server ran on to.
    assert [c["finish_reason"] for c in doc["choices"]] == ["stop", "stop"]


def test_no_usage_upstream_means_no_usage():
    call = adapter().request(body())
    assert "usage" not in json.loads(call.response(completion("x", usage=False)))
    assert call.usage is None


@pytest.mark.parametrize("bad", [b"not json", b'{"choices": "nope"}', b'{"object": "text_completion"}',
                                 b'{"choices": [{"text": 5}]}'])
def test_malformed_upstream_body_raises_upstream_broken(bad):
    with pytest.raises(UpstreamBroken):
        adapter().request(body()).response(bad)


def test_logprobs_are_translated_to_the_chat_form():
    call = adapter().request(body(logprobs=True, top_logprobs=1))
    up = json.loads(completion("Hi"))
    up["choices"][0]["logprobs"] = {"tokens": ["H", "i"], "token_logprobs": [-0.5, -0.25],
                                    "top_logprobs": [{"H": -0.5}, {"i": -0.25}], "text_offset": [0, 1]}
    lp = json.loads(call.response(json.dumps(up).encode()))["choices"][0]["logprobs"]
    assert lp == {"content": [
        {"token": "H", "logprob": -0.5, "bytes": [72], "top_logprobs": [{"token": "H", "logprob": -0.5, "bytes": [72]}]},
        {"token": "i", "logprob": -0.25, "bytes": [105], "top_logprobs": [{"token": "i", "logprob": -0.25, "bytes": [105]}]},
    ]}


def test_tool_calls_in_a_whole_answer():
    call = adapter().request(body(tools=TOOLS))
    text = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    choice = json.loads(call.response(completion(text)))["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("function", "get_weather", {"city": "Paris"}), ("function", "get_time", {})]
    assert all(c["id"].startswith("call_") for c in calls) and calls[0]["id"] != calls[1]["id"]


def test_reasoning_goes_to_both_fields_when_enabled():
    text = "<think>\n2+2 is 4.\n</think>\n\nIt is 4."
    msg = json.loads(adapter(reasoning="think").request(body()).response(completion(text)))["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": "It is 4.", "reasoning_content": "2+2 is 4.", "reasoning": "2+2 is 4."}
    msg = json.loads(adapter().request(body()).response(completion(text)))["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": text}


def test_always_mode_aggregates_the_upstream_stream():
    call = adapter(stream="always").request(body(tools=TOOLS))
    sse = (event("Checking. <tool") + event('_call>{"name": "get_time", ') + event('"arguments": {}}</tool_call>')
           + event("", "stop") + USAGE_EVENT + b"data: [DONE]\n\n")
    doc = json.loads(call.response(sse))
    msg = doc["choices"][0]["message"]
    assert msg["content"] == "Checking."
    assert msg["tool_calls"][0]["function"] == {"name": "get_time", "arguments": "{}"}
    assert doc["choices"][0]["finish_reason"] == "tool_calls"
    assert doc["usage"]["total_tokens"] == 10 and call.usage == (7, 3)


# --- streams -------------------------------------------------------------------------------------

def test_stream_events_are_translated_one_for_one():
    call = adapter().request(body(stream=True))
    chunks = [event("Hel"), event("lo "), event("world"), event("", "stop"), b"data: [DONE]\n\n"]
    out = run_events(call, chunks)
    events = parse_sse(out)
    assert len(events) == 5  # 4 chunks + [DONE]
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert deltas == [{"role": "assistant", "content": "Hel"}, {"content": "lo "}, {"content": "world"}, {}]
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]] == [None, None, None, "stop"]
    assert all(e["object"] == "chat.completion.chunk" and e["model"] == "qwen" and e["id"] == "chatcmpl-abc"
               for e in events[:-1])
    assert events[-1] == "[DONE]"
    assert call.usage is None


def test_stream_usage_only_when_asked_but_always_recorded():
    chunks = [event("Hi", "stop") + USAGE_EVENT + b"data: [DONE]\n\n"]
    call = adapter().request(body(stream=True))
    events = parse_sse(run_events(call, chunks))
    assert all("usage" not in e for e in events[:-1]) and call.usage == (7, 3)
    call = adapter().request(body(stream=True, stream_options={"include_usage": True}))
    events = parse_sse(run_events(call, chunks))
    assert events[-2]["choices"] == [] and events[-2]["usage"] == {
        "prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert events[-1] == "[DONE]"


def test_stream_split_across_reads_with_crlf_and_stop_token():
    call = adapter().request(body(stream=True))
    raw = (event("Hello") + event(" there<|im") + event("_end|>") + event("", "stop")).replace(b"\n", b"\r\n")
    raw += b"data: [DONE]\r\n\r\n"
    out = run_events(call, [raw[i:i + 7] for i in range(0, len(raw), 7)])
    events = parse_sse(out)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "Hello there"
    assert b"".join(out).count(b"data: [DONE]") == 1


def test_stream_without_done_still_ends_with_exactly_one_done():
    events = parse_sse(run_events(adapter().request(body(stream=True)), [event("a"), event("b")]))
    assert events[-1] == "[DONE]" and [e for e in events if e == "[DONE]"] == ["[DONE]"]
    assert events[-2]["choices"][0]["finish_reason"] == "stop"  # flushed at the end


def test_stream_with_two_choices_keeps_them_apart():
    call = adapter().request(body(stream=True, n=2))
    events = parse_sse(run_events(call, [event("a", index=0), event("b", index=1), event("", "stop", 0),
                                         event("", "stop", 1), b"data: [DONE]\n\n"]))
    firsts = {e["choices"][0]["index"]: e["choices"][0]["delta"] for e in events[:2]}
    assert firsts == {0: {"role": "assistant", "content": "a"}, 1: {"role": "assistant", "content": "b"}}


@pytest.mark.parametrize("bad", [b"data: {not json\n\n", b'data: {"choices": 3}\n\n', b'data: {"id": "x"}\n\n'])
def test_malformed_stream_event_raises_upstream_broken(bad):
    with pytest.raises(UpstreamBroken):
        run_events(adapter().request(body(stream=True)), [event("ok"), bad])


def test_upstream_error_event_mid_stream_raises_upstream_broken_with_its_message():
    with pytest.raises(UpstreamBroken, match="out of memory"):
        run_events(adapter().request(body(stream=True)),
                   [event("ok"), b'data: {"error": {"message": "out of memory", "type": "server_error"}}\n\n'])


def test_never_mode_synthesizes_chunks_from_a_whole_answer():
    call = adapter(stream="never").request(body(stream=True, stream_options={"include_usage": True}))
    up = completion("Whole answer.")
    events = parse_sse(run_events(call, [up[:10], up[10:]]))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Whole answer."}
    assert events[0]["choices"][0]["finish_reason"] == "stop"
    assert events[1]["usage"]["total_tokens"] == 10
    assert events[2] == "[DONE]"


def test_streamed_tool_calls_name_first_then_arguments():
    call = adapter().request(body(stream=True, tools=TOOLS))
    chunks = [event("Let me see."), event("\n<tool_"), event('call>\n{"name": "get_weather", "arguments": '),
              event('{"city": "Paris"}}\n</tool_call>'), event("", "stop"), b"data: [DONE]\n\n"]
    events = parse_sse(run_events(call, chunks))
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert deltas[0] == {"role": "assistant", "content": "Let me see."}
    tool_deltas = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert tool_deltas[0]["index"] == 0 and tool_deltas[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert tool_deltas[0]["id"].startswith("call_") and tool_deltas[0]["type"] == "function"
    assert tool_deltas[1] == {"index": 0, "function": {"arguments": '{"city": "Paris"}'}}
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert all("content" not in d for d in deltas[1:])  # the "\n" before the block is not content


def test_streamed_reasoning_fills_both_fields():
    call = adapter(reasoning="think").request(body(stream=True))
    events = parse_sse(run_events(call, [event("<think>Hmm"), event(", four.</think>"), event("\n\nFour."),
                                         event("", "stop"), b"data: [DONE]\n\n"]))
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert deltas[0] == {"role": "assistant", "reasoning_content": "Hmm", "reasoning": "Hmm"}
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Hmm, four."
    assert "".join(d.get("reasoning", "") for d in deltas) == "Hmm, four."
    assert "".join(d.get("content", "") for d in deltas) == "Four."


def test_template_that_prefills_think_streams_the_thought_at_once(tmp_path):
    path = tmp_path / "thinking.jinja"
    path.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
    call = adapter(template=str(path), reasoning="think").request(body(stream=True))
    assert upstream_doc(call)["prompt"].endswith("<|im_start|>assistant\n<think>\n")
    first = parse_sse(run_events(call, [event("Weighing it")]))[0]  # no `</think>` yet, but not held back
    assert first["choices"][0]["delta"]["reasoning_content"] == "Weighing it"
    call = adapter(template=str(path), reasoning="think").request(body())
    msg = json.loads(call.response(completion("Weighing it.\n</think>\n\nYes.")))["choices"][0]["message"]
    assert (msg["reasoning"], msg["content"]) == ("Weighing it.", "Yes.")


def test_upstream_that_ignores_the_stream_flag_is_still_understood():
    # stream: always, but the server answered whole JSON; stream: never, but it streamed anyway
    doc = json.loads(adapter(stream="always").request(body()).response(completion("Whole.")))
    assert doc["choices"][0]["message"]["content"] == "Whole."
    events = parse_sse(run_events(adapter(stream="never").request(body(stream=True)),
                                  [event("Str"), event("eamed.", "stop"), b"data: [DONE]\n\n"]))
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "Streamed."


def test_stream_that_carries_no_event_is_broken():
    with pytest.raises(UpstreamBroken, match="without any event"):
        run_events(adapter().request(body(stream=True)), [b'{"choices": []}'])
    with pytest.raises(UpstreamBroken):
        adapter(stream="always").request(body()).response(b"")


def test_events_of_one_read_go_out_together_and_none_is_lost_before_a_bad_one():
    call = adapter().request(body(stream=True))

    async def source():
        yield event("Hel") + event("lo")  # one network read, two events: one write
        yield event(" world") + b"data: {not json\n\n"  # the good event still reaches the client

    async def collect():
        out = []
        with pytest.raises(UpstreamBroken):
            async for chunk in call.events(source()):
                out.append(chunk)
        return out

    out = asyncio.run(collect())
    assert len(out) == 2
    assert [e["choices"][0]["delta"].get("content") for e in parse_sse(out)] == ["Hel", "lo", " world"]


def test_chat_template_kwargs_reach_the_template():
    """Qwen3's `enable_thinking: false` writes the empty think block after the generation prompt."""
    call = adapter(template="qwen3").request(body(chat_template_kwargs={"enable_thinking": False}))
    assert upstream_doc(call)["prompt"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    call = adapter(template="qwen3").request(body())
    assert upstream_doc(call)["prompt"].endswith("<|im_start|>assistant\n")
    assert "chat_template_kwargs" not in upstream_doc(call)
