"""What issue 13's audit found left over: fields consumed by the translation that reached the upstream
raw (or not at all), and fakes that accepted what the real servers refuse. Over loopback fakes
(proxy/mock_upstream.py), the official `openai` client in front."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from test_dialects import TIME, USER, WEATHER, client, fake, last_body, serve  # noqa: F401 (fixtures)

# --- llama.cpp: `n` choices; `n_predict` does not escape the route's limit --------------------------------


def test_llama_cpp_fake_answers_n_choices_like_the_real_server(fake):
    """The pinned llama-server reads `n` as `n_cmpl` (tools/server/server-schema.cpp); older builds refused
    it. tests/engine checks the real one."""
    up = fake("llama.cpp")
    r = httpx.post(f"{up.url}/v1/completions", json={"prompt": "Hi", "n": 2})
    assert r.status_code == 200 and [c["index"] for c in r.json()["choices"]] == [0, 1]


@pytest.mark.parametrize("stream", [False, True])
def test_llama_cpp_route_forwards_n(fake, serve, stream):
    up = fake("llama.cpp")
    c = client(serve(up, "llama.cpp"))
    if stream:
        chunks = list(c.chat.completions.create(model="m", messages=USER, n=2, stream=True,
                                                stream_options={"include_usage": True}))
        indexes = {ch.choices[0].index for ch in chunks if ch.choices}
        # each choice's last event carries its own usage: they add up
        assert chunks[-1].usage.completion_tokens == 2 * len("Hello from the mock upstream.".split())
    else:
        indexes = {ch.index for ch in c.chat.completions.create(model="m", messages=USER, n=2).choices}
    assert indexes == {0, 1}
    assert last_body(up)["n"] == 2


@pytest.mark.parametrize(("n_predict", "max_tokens", "sent"), [(5000, None, 100), (50, None, 50), (50, 30, 30),
                                                               (30, 50, 30), (-1, None, 100), (-1, 20, 20)])
def test_llama_cpp_n_predict_is_folded_into_max_tokens_and_capped(fake, serve, n_predict, max_tokens, sent):
    up = fake("llama.cpp")
    c = client(serve(up, "llama.cpp", "body: {limit: {max_tokens: 100}}"))
    kw: dict[str, Any] = {"max_tokens": max_tokens} if max_tokens is not None else {}
    r = c.chat.completions.create(model="m", messages=USER, extra_body={"n_predict": n_predict},
                                  extra_headers={"x-mock-text": " ".join(f"w{i}" for i in range(150))}, **kw)
    body = last_body(up)
    assert "n_predict" not in body and body["max_tokens"] == sent
    assert len(r.choices[0].message.content.split()) == sent and r.choices[0].finish_reason == "length"


# --- parallel_tool_calls: false gives one call, on every face ------------------------------------------------

TWO_CALLS = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
TWO = {"x-mock-text-json": json.dumps(TWO_CALLS)}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("parallel", "names"), [(False, ["get_weather"]), (None, ["get_weather", "get_time"]),
                                                 (True, ["get_weather", "get_time"])])
def test_chat_parallel_tool_calls_false_gives_one_call(fake, serve, stream, parallel, names):
    up = fake("vllm")
    c = client(serve(up, "vllm"))
    kw: dict[str, Any] = dict(model="m", messages=USER, tools=[WEATHER, TIME], extra_headers=TWO)
    if parallel is not None:
        kw["parallel_tool_calls"] = parallel
    if stream:
        got: dict[int, str] = {}
        finish = None
        for ch in c.chat.completions.create(stream=True, **kw):
            for d in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
                got[d.index] = got.get(d.index, "") + (d.function.name or "")
            if ch.choices and ch.choices[0].finish_reason:
                finish = ch.choices[0].finish_reason
        assert [got[i] for i in sorted(got)] == names
    else:
        r = c.chat.completions.create(**kw)
        finish = r.choices[0].finish_reason
        assert [t.function.name for t in r.choices[0].message.tool_calls] == names
    assert finish == "tool_calls"
    assert "parallel_tool_calls" not in last_body(up)


def test_responses_and_messages_faces_honour_one_call_too(fake, serve):
    import anthropic

    up = fake("vllm")
    base = serve(up, "vllm", adapter="responses-to-completions", path="/v1/responses")
    tools = [{"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]}
             for t in (WEATHER, TIME)]
    r = client(base).responses.create(model="m", input="Hi", tools=tools, parallel_tool_calls=False,
                                      extra_headers=TWO)
    assert [i.name for i in r.output if i.type == "function_call"] == ["get_weather"]
    assert r.parallel_tool_calls is False
    base = serve(up, "vllm", adapter="messages-to-completions", path="/v1/messages")
    c = anthropic.Anthropic(base_url=base, api_key="k", max_retries=0)
    atools = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in (WEATHER, TIME)]
    for disable, names in ((True, ["get_weather"]), (False, ["get_weather", "get_time"])):
        m = c.messages.create(model="m", max_tokens=100, messages=USER, tools=atools,
                              tool_choice={"type": "auto", "disable_parallel_tool_use": disable},
                              extra_headers=TWO)
        assert [b.name for b in m.content if b.type == "tool_use"] == names


# --- openai: at most 4 stop strings upstream; the template's left out are still cut by the proxy ------------

def test_openai_fake_refuses_more_than_four_stops(fake):
    up = fake("openai")
    post = lambda stop: httpx.post(f"{up.url}/v1/completions", json={"prompt": "Hi", "stop": stop})  # noqa: E731
    assert post(list("abcde")).status_code == 400 and post(list("abcd")).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_openai_dialect_sends_at_most_four_stops_and_still_cuts_at_the_templates(fake, serve, stream):
    up = fake("openai")
    c = client(serve(up, "openai"))
    kw: dict[str, Any] = dict(model="m", messages=USER, stop=["s1", "s2", "s3"],
                              extra_headers={"x-mock-text": "Hello there<|endoftext|>junk after the turn"})
    if stream:
        chunks = list(c.chat.completions.create(stream=True, **kw))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert finish == ["stop"]
    else:
        r = c.chat.completions.create(**kw)
        text = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop"
    assert last_body(up)["stop"] == ["s1", "s2", "s3", "<|im_end|>"]  # <|endoftext|> did not fit
    assert text == "Hello there"


def test_openai_dialect_refuses_more_than_four_client_stops_by_name(fake, serve):
    up = fake("openai")
    c = client(serve(up, "openai"))
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="m", messages=USER, stop=["1", "2", "3", "4", "5"])
    assert err.value.body["param"] == "stop" and "at most 4" in err.value.message and not up.requests
    # Four client stops leave no room for the template's: the server runs on past the end of the turn
    # (to its limit), the proxy cuts there, and the answer is a finished turn, not a cut one.
    r = c.chat.completions.create(model="m", messages=USER, stop=["1", "2", "3", "4"],
                                  extra_headers={"x-mock-text": "Done.<|im_end|>runaway", "x-mock-finish": "length"})
    assert last_body(up)["stop"] == ["1", "2", "3", "4"]
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("Done.", "stop")
