"""Each upstream dialect over real loopback sockets: the fakes of vLLM, llama.cpp, SGLang and a strict
OpenAI completions server (proxy/mock_upstream.py) behind the proxy, the official `openai` client in front.

What a user would notice: answers not cut at 16 tokens, fields neither dropped nor silently ignored,
structured outputs and forced tool calls that hold, the route's `body:` edits."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import openai
import pydantic
import pytest

from proxy.errors import ConfigError
from proxy.mock_upstream import SGLANG_TOKENIZER_LENGTH, mock_tokens
from proxy.routes import RouteTable
from servers import MockServer, run_mock

LONG = " ".join(f"w{i}" for i in range(40))  # 40 mock tokens: more than the 16 a completions default allows
CONTEXT = 4096
ALL = ["vllm", "llama.cpp", "sglang", "openai"]
CONSTRAINING = ["vllm", "llama.cpp", "sglang"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
USER = [{"role": "user", "content": "Hi there"}]


class Weather(pydantic.BaseModel):
    city: str
    celsius: int


@pytest.fixture
def fake() -> Iterator[Callable[..., MockServer]]:
    """`fake("sglang")` -> a running fake of that server."""
    with ExitStack() as stack:
        yield lambda dialect=None, context=CONTEXT: stack.enter_context(run_mock(dialect, context))


@pytest.fixture
def serve(routes_dir, proxy_for) -> Callable[..., str]:
    """`serve(upstream, dialect, extra_yaml, adapter=...)` -> the proxy's base URL."""

    def start(up: MockServer, dialect: str, extra: str = "", adapter: str = "chat-to-completions",
              path: str = "/v1/chat/completions") -> str:
        route = f"path: {path}\nupstream: {up.url}/v1/completions\nadapter: {adapter}\ndialect: {dialect}\n"
        if dialect == "openai" and adapter != "passthrough" and "max_tokens" not in extra:
            extra += "\nbody: {defaults: {max_tokens: 512}}"
        return proxy_for(routes_dir(route=route + textwrap.dedent(extra)))

    return start


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0, timeout=10)


def last_body(up: MockServer) -> dict[str, Any]:
    return json.loads(up.requests[-1].body)


# --- the fakes themselves: they cut short where the real servers do ------------------------------------

@pytest.mark.parametrize(("dialect", "words"), [("vllm", 16), ("sglang", 16), ("openai", 16), ("llama.cpp", 40)])
def test_fakes_default_max_tokens_as_their_servers_do(fake, dialect, words):
    up = fake(dialect)
    r = httpx.post(f"{up.url}/v1/completions", json={"prompt": "Hi", "model": "m"},
                   headers={"x-mock-text": LONG}).json()
    assert len(r["choices"][0]["text"].split()) == words
    assert r["choices"][0]["finish_reason"] == ("length" if words == 16 else "stop")


def test_fakes_refuse_what_their_servers_refuse(fake):
    vllm, sglang, llama, strict = fake("vllm"), fake("sglang"), fake("llama.cpp"), fake("openai")
    post = lambda up, doc: httpx.post(f"{up.url}/v1/completions", json={"prompt": "Hi", **doc})  # noqa: E731
    assert post(vllm, {"stream_options": {"include_usage": True}}).status_code == 400
    assert post(vllm, {"max_tokens": CONTEXT}).json()["error"]["message"].startswith("This model's maximum")
    assert post(sglang, {"max_tokens": None}).json()["object"] == "error"
    assert post(sglang, {"json_schema": {"type": "object"}}).status_code == 400
    assert post(sglang, {"no_such_field": 1}).status_code == 200  # dropped silently: why the proxy refuses it
    assert post(llama, {"json_schema": '{"type": "object"}'}).status_code == 400  # an object, not a string
    assert post(strict, {"top_k": 5}).json()["error"]["message"] == "Unrecognized request argument supplied: top_k"


# --- 1/2: never cut short at a default the client did not ask for ---------------------------------------

@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("dialect", ALL)
def test_no_16_token_answers_when_the_client_sets_no_limit(fake, serve, dialect, stream):
    up = fake(dialect)
    c = client(serve(up, dialect))
    if stream:
        chunks = list(c.chat.completions.create(model="m", messages=USER, stream=True,
                                                extra_headers={"x-mock-text": LONG}))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    else:
        r = c.chat.completions.create(model="m", messages=USER, extra_headers={"x-mock-text": LONG})
        text, finish = r.choices[0].message.content, [r.choices[0].finish_reason]
    assert text == LONG and finish == ["stop"]
    sent = last_body(up)
    prompt_tokens = mock_tokens(sent["prompt"])
    if dialect == "vllm":  # the context remainder, from the same server's /tokenize
        assert sent["max_tokens"] == CONTEXT - prompt_tokens
        assert json.loads(up.lookups[-1].body)["add_special_tokens"] is True
    elif dialect == "sglang":  # capped by the served context, not the tokenizer's 131072; below it (>= refused)
        assert sent["max_tokens"] == CONTEXT - prompt_tokens - 1 < SGLANG_TOKENIZER_LENGTH
    elif dialect == "llama.cpp":
        assert "max_tokens" not in sent and not up.lookups  # unlimited by default: no lookup at all
    else:
        assert sent["max_tokens"] == 512 and not up.lookups  # the route's number


def test_a_client_limit_is_sent_as_given_without_a_lookup(fake, serve):
    up = fake("vllm")
    c = client(serve(up, "vllm"))
    r = c.chat.completions.create(model="m", messages=USER, max_completion_tokens=5, max_tokens=9,
                                  extra_headers={"x-mock-text": LONG})
    assert r.choices[0].finish_reason == "length" and len(r.choices[0].message.content.split()) == 5
    assert last_body(up)["max_tokens"] == 5 and not up.lookups


def test_context_lookup_failure_is_a_502_naming_the_route_and_the_fix(fake, serve):
    up = fake("openai")  # no /tokenize there, but the route says vllm
    c = client(serve(up, "vllm"))
    with pytest.raises(openai.APIStatusError) as err:
        c.chat.completions.create(model="m", messages=USER)
    assert err.value.status_code == 502
    message = err.value.body["message"]
    assert "'route'" in message and "POST /tokenize answered 404" in message and "body.defaults.max_tokens" in message
    assert "set `dialect: openai`" in message and "`dialect: llama.cpp`" in message  # the dialect that fits
    assert not up.requests  # never a silent 16


def test_a_prompt_that_fills_the_context_is_a_400(fake, serve):
    up = fake("vllm", context=8)
    c = client(serve(up, "vllm"))
    with pytest.raises(openai.BadRequestError, match="leaves no room"):
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "one two three four five"}])


# --- 3: body defaults / set / remove / limit -------------------------------------------------------------

BODY = """
    body:
      defaults: {temperature: 0.3, max_tokens: 100}
      set: {seed: 7}
      remove: [user]
      limit: {max_tokens: 64, top_p: 0.5}
"""


def test_body_edits_the_chat_routes_upstream_body(fake, serve):
    up = fake("vllm")
    c = client(serve(up, "vllm", BODY))
    c.chat.completions.create(model="m", messages=USER, user="u", top_p=0.9, seed=1)
    sent = last_body(up)
    assert (sent["temperature"], sent["max_tokens"], sent["seed"], sent["top_p"]) == (0.3, 64, 7, 0.5)
    assert "user" not in sent and not up.lookups
    c.chat.completions.create(model="m", messages=USER, temperature=1.0, max_tokens=32000)  # an agent's ask
    sent = last_body(up)
    assert (sent["temperature"], sent["max_tokens"]) == (1.0, 64)


def test_limit_caps_the_auto_remainder_and_fills_an_unlimited_llama_cpp(fake, serve):
    up = fake("vllm")
    client(serve(up, "vllm", "body: {limit: {max_tokens: 8192}}")).chat.completions.create(model="m", messages=USER)
    assert last_body(up)["max_tokens"] == CONTEXT - mock_tokens(last_body(up)["prompt"])  # under the ceiling
    client(serve(up, "vllm", "body: {limit: {max_tokens: 100}}")).chat.completions.create(model="m", messages=USER)
    assert last_body(up)["max_tokens"] == 100
    llama = fake("llama.cpp")
    client(serve(llama, "llama.cpp", "body: {limit: {max_tokens: 100}}")).chat.completions.create(
        model="m", messages=USER)
    assert last_body(llama)["max_tokens"] == 100


def test_passthrough_without_body_keeps_bytes_and_with_body_edits_them(fake, serve):
    up = fake("vllm")
    raw = b'{"prompt": "Hi",   "max_tokens": 500, "user": "u"}'
    base = serve(up, "vllm", adapter="passthrough", path="/v1/completions")
    assert httpx.post(f"{base}/v1/completions", content=raw).status_code == 200
    assert up.requests[-1].body.encode() == raw
    base = serve(up, "vllm", BODY, adapter="passthrough", path="/v1/completions")
    httpx.post(f"{base}/v1/completions", content=raw)
    assert last_body(up) == {"prompt": "Hi", "max_tokens": 64, "temperature": 0.3, "seed": 7}


def test_passthrough_auto_max_tokens_asks_the_same_server(fake, serve):
    up = fake("sglang")
    base = serve(up, "sglang", "body: {defaults: {max_tokens: auto}}", adapter="passthrough",
                 path="/v1/completions")
    r = httpx.post(f"{base}/v1/completions", json={"prompt": "a b c", "model": "m"}, headers={"x-mock-text": LONG})
    assert r.json()["choices"][0]["text"] == LONG
    assert last_body(up)["max_tokens"] == CONTEXT - mock_tokens("a b c") - 1


# --- 4: no silent drop ---------------------------------------------------------------------------------

EXTRAS = {"min_tokens": 2, "ignore_eos": False, "include_stop_str_in_output": True, "cache_prompt": True,
          "mirostat": 2}


@pytest.mark.parametrize("dialect", ["vllm", "llama.cpp"])
def test_unknown_fields_reach_upstreams_that_take_extensions(fake, serve, dialect):
    up = fake(dialect)
    client(serve(up, dialect)).chat.completions.create(model="m", messages=USER, extra_body=EXTRAS,
                                                       max_tokens=20)
    sent = last_body(up)
    assert {k: sent[k] for k in EXTRAS} == EXTRAS
    assert "messages" not in sent and "chat_template_kwargs" not in sent


@pytest.mark.parametrize("dialect", ["sglang", "openai"])
def test_fields_the_server_does_not_define_are_refused_by_name(fake, serve, dialect):
    up = fake(dialect)
    c = client(serve(up, dialect))
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="m", messages=USER, extra_body={"include_stop_str_in_output": True,
                                                                        "mirostat": 2})
    assert "`include_stop_str_in_output`, `mirostat`" in err.value.message
    assert err.value.body["param"] == "include_stop_str_in_output" and not up.requests
    c.chat.completions.create(model="m", messages=USER, extra_body={"service_tier": None})  # null: not set
    assert "service_tier" not in last_body(up)


def test_sglang_extensions_are_forwarded_and_openai_refuses_sampling_extensions(fake, serve):
    up = fake("sglang")
    client(serve(up, "sglang")).chat.completions.create(model="m", messages=USER,
                                                        extra_body={"top_k": 5, "min_tokens": 2, "regex": "a+"})
    assert {k: last_body(up)[k] for k in ("top_k", "min_tokens", "regex")} == {"top_k": 5, "min_tokens": 2,
                                                                                "regex": "a+"}
    strict = fake("openai")
    with pytest.raises(openai.BadRequestError, match="`top_k`"):
        client(serve(strict, "openai")).chat.completions.create(model="m", messages=USER, extra_body={"top_k": 5})


def test_vllm_guided_fields_become_structured_outputs(fake, serve):
    up = fake("vllm")
    client(serve(up, "vllm")).chat.completions.create(
        model="m", messages=USER, extra_body={"guided_choice": ["yes", "no"], "guided_whitespace_pattern": " "})
    sent = last_body(up)
    assert sent["structured_outputs"] == {"choice": ["yes", "no"], "whitespace_pattern": " "}
    assert not any(k.startswith("guided_") for k in sent)


def test_a_completions_field_that_would_change_the_answer_is_refused(fake, serve):
    up = fake("vllm")
    with pytest.raises(openai.BadRequestError) as err:
        client(serve(up, "vllm")).chat.completions.create(model="m", messages=USER, extra_body={"echo": True})
    assert err.value.body["param"] == "echo"


# --- 5: structured outputs -------------------------------------------------------------------------------

ANSWER = '{"city": "Paris", "celsius": 21}'
CONSTRAINT = {
    "vllm": lambda sent: sent["structured_outputs"]["json"]["properties"]["celsius"]["type"] == "integer",
    "llama.cpp": lambda sent: sent["json_schema"]["properties"]["celsius"]["type"] == "integer",
    "sglang": lambda sent: json.loads(sent["json_schema"])["properties"]["celsius"]["type"] == "integer",
}
# Each fake answers prose unless the request carries a constraint in its own server's form.
PROSE = {"x-mock-text": ANSWER, "x-mock-unconstrained": "Sure! It is sunny in Paris."}


@pytest.mark.parametrize("dialect", CONSTRAINING)
def test_parse_with_a_pydantic_model_through_each_dialects_constraint(fake, serve, dialect):
    up = fake(dialect)
    c = client(serve(up, dialect))
    r = c.chat.completions.parse(model="m", messages=USER, response_format=Weather, extra_headers=PROSE)
    assert r.choices[0].message.parsed == Weather(city="Paris", celsius=21)
    assert r.choices[0].message.content == ANSWER
    assert CONSTRAINT[dialect](last_body(up)) and "response_format" not in last_body(up)


@pytest.mark.parametrize("dialect", CONSTRAINING)
def test_the_streaming_helper_parses_too(fake, serve, dialect):
    up = fake(dialect)
    c = client(serve(up, dialect))
    with c.chat.completions.stream(model="m", messages=USER, response_format=Weather,
                                   extra_headers={**PROSE, "x-mock-events": "5"}) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.parsed == Weather(city="Paris", celsius=21)


@pytest.mark.parametrize("dialect", CONSTRAINING)
def test_json_object_mode(fake, serve, dialect):
    up = fake(dialect)
    r = client(serve(up, dialect)).chat.completions.create(
        model="m", messages=USER, response_format={"type": "json_object"}, extra_headers=PROSE)
    assert json.loads(r.choices[0].message.content) == {"city": "Paris", "celsius": 21}


def test_a_dialect_that_cannot_constrain_refuses_response_format(fake, serve):
    up = fake("openai")
    with pytest.raises(openai.BadRequestError) as err:
        client(serve(up, "openai")).chat.completions.parse(model="m", messages=USER, response_format=Weather)
    assert err.value.body["param"] == "response_format" and not up.requests


# --- 6: tool_choice honoured -------------------------------------------------------------------------------

CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
CALL_HEADERS = {"x-mock-text": CALL, "x-mock-unconstrained": "I would rather chat about Paris."}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("dialect", CONSTRAINING)
def test_named_tool_choice_forces_that_call(fake, serve, dialect, stream):
    up = fake(dialect)
    c = client(serve(up, dialect))
    kw: dict[str, Any] = dict(model="m", messages=USER, tools=[WEATHER, TIME], extra_headers=CALL_HEADERS,
                              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    if stream:
        calls: dict[int, dict[str, str]] = {}
        finish = None
        for ch in c.chat.completions.create(stream=True, **kw):
            for d in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
                slot = calls.setdefault(d.index, {"name": "", "arguments": ""})
                slot["name"] += d.function.name or ""
                slot["arguments"] += d.function.arguments or ""
            if ch.choices and ch.choices[0].finish_reason:
                finish = ch.choices[0].finish_reason
        got = [(v["name"], json.loads(v["arguments"])) for v in calls.values()]
    else:
        r = c.chat.completions.create(**kw)
        finish = r.choices[0].finish_reason
        got = [(t.function.name, json.loads(t.function.arguments)) for t in r.choices[0].message.tool_calls]
        assert r.choices[0].message.content is None
    assert got == [("get_weather", {"city": "Paris"})] and finish == "tool_calls"
    sent = last_body(up)
    assert sent["prompt"].endswith("<|im_start|>assistant\n<tool_call>\n")
    schema = {"vllm": lambda: sent["structured_outputs"]["json"], "llama.cpp": lambda: sent["json_schema"],
              "sglang": lambda: json.loads(sent["json_schema"])}[dialect]()
    assert schema["properties"]["name"] == {"enum": ["get_weather"]}
    assert schema["properties"]["arguments"] == WEATHER["function"]["parameters"]


def test_required_tool_choice_allows_any_of_the_tools(fake, serve):
    up = fake("vllm")
    r = client(serve(up, "vllm")).chat.completions.create(model="m", messages=USER, tools=[WEATHER, TIME],
                                                          tool_choice="required", extra_headers=CALL_HEADERS)
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    names = [s["properties"]["name"]["enum"] for s in last_body(up)["structured_outputs"]["json"]["anyOf"]]
    assert names == [["get_weather"], ["get_time"]]


def test_tool_choice_none_keeps_tools_out_of_the_prompt_and_auto_is_not_forced(fake, serve):
    up = fake("vllm")
    c = client(serve(up, "vllm"))
    c.chat.completions.create(model="m", messages=USER, tools=[WEATHER], tool_choice="none")
    assert "<tools>" not in last_body(up)["prompt"]
    c.chat.completions.create(model="m", messages=USER, tools=[WEATHER], tool_choice="auto")
    assert "<tools>" in last_body(up)["prompt"] and "structured_outputs" not in last_body(up)


def test_tool_choice_that_cannot_be_honoured_is_a_400(fake, serve, tmp_path):
    up = fake("openai")
    with pytest.raises(openai.BadRequestError) as err:
        client(serve(up, "openai")).chat.completions.create(model="m", messages=USER, tools=[WEATHER],
                                                            tool_choice="required")
    assert err.value.body["param"] == "tool_choice" and "dialect openai" in err.value.message
    vllm = fake("vllm")
    plain = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] "
    (tmp_path / "plain.jinja").write_text(plain)
    base = serve(vllm, "vllm", f"template: {tmp_path / 'plain.jinja'}")
    with pytest.raises(openai.BadRequestError) as err:
        client(base).chat.completions.create(model="m", messages=USER, tools=[WEATHER], tool_choice="required")
    assert err.value.body["param"] == "tool_choice" and "<tool_call>" in err.value.message


# --- 8: bare-string arguments --------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("arguments", "expected"), [
    ('"hello"', '"hello"'),  # a bare string -> its JSON text, as vLLM answers
    ('"{\\"a\\": 1}"', '{"a": 1}'),  # a string holding JSON object text -> that text, not encoded twice
    ('{"a": 1}', '{"a": 1}'),
])
def test_tool_arguments_are_always_json_text(fake, serve, stream, arguments, expected):
    up = fake("vllm")
    text = '<tool_call>\n{"name": "get_weather", "arguments": ' + arguments + "}\n</tool_call>"
    c = client(serve(up, "vllm"))
    kw: dict[str, Any] = dict(model="m", messages=USER, tools=[WEATHER], extra_headers={"x-mock-text-json":
                                                                                          json.dumps(text)})
    if stream:
        args = "".join(d.function.arguments or "" for ch in c.chat.completions.create(stream=True, **kw)
                       if ch.choices for d in ch.choices[0].delta.tool_calls or [])
    else:
        args = c.chat.completions.create(**kw).choices[0].message.tool_calls[0].function.arguments
    assert args == expected
    json.loads(args)


def test_chat_template_kwargs_reach_the_template_not_the_upstream(fake, serve):
    up = fake("vllm")
    c = client(serve(up, "vllm", "template: qwen3"))
    c.chat.completions.create(model="m", messages=USER, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    sent = last_body(up)
    assert sent["prompt"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "chat_template_kwargs" not in sent and "enable_thinking" not in sent


@pytest.mark.parametrize("dialect", ["vllm", "sglang"])
def test_the_responses_face_is_not_cut_short_either(fake, serve, dialect):
    up = fake(dialect)
    base = serve(up, dialect, adapter="responses-to-completions", path="/v1/responses")
    r = client(base).responses.create(model="m", input="Hi there", extra_headers={"x-mock-text": LONG})
    assert r.output_text == LONG and r.status == "completed"
    assert last_body(up)["max_tokens"] == CONTEXT - mock_tokens(last_body(up)["prompt"]) - (dialect == "sglang")


def test_the_messages_face_takes_the_dialects_limit(fake, serve):
    import anthropic

    up = fake("vllm")
    base = serve(up, "vllm", "body: {limit: {max_tokens: 1000}}", adapter="messages-to-completions",
                 path="/v1/messages")
    c = anthropic.Anthropic(base_url=base, api_key="k", max_retries=0)
    with c.messages.stream(model="m", max_tokens=32000, messages=USER, extra_headers={"x-mock-text": LONG}) as s:
        assert s.get_final_text() == LONG
    assert last_body(up)["max_tokens"] == 1000  # Claude Code's 32 000 capped by the route


@pytest.mark.parametrize("dialect", ["vllm", "sglang"])
def test_limit_auto_lowers_claude_codes_ask_to_what_the_context_leaves(fake, serve, dialect):
    """`body.limit.max_tokens: auto` (the shipped Messages route): a max_tokens the context cannot hold
    is lowered to the remainder instead of the server refusing the request; a smaller one is kept."""
    import anthropic

    up = fake(dialect)
    base = serve(up, dialect, "body: {limit: {max_tokens: auto}}", adapter="messages-to-completions",
                 path="/v1/messages")
    c = anthropic.Anthropic(base_url=base, api_key="k", max_retries=0)
    with c.messages.stream(model="m", max_tokens=32000, messages=USER, extra_headers={"x-mock-text": LONG}) as s:
        assert s.get_final_text() == LONG  # the fake refuses prompt + max_tokens over its context
    room = CONTEXT - mock_tokens(last_body(up)["prompt"]) - (dialect == "sglang")
    assert last_body(up)["max_tokens"] == room < 32000
    c.messages.create(model="m", max_tokens=50, messages=USER)
    assert last_body(up)["max_tokens"] == 50


def test_limit_auto_needs_a_tokenizer_endpoint(routes_dir):
    folder = routes_dir(r="path: /v1/messages\nupstream: http://127.0.0.1:9/v1/completions\n"
                          "adapter: messages-to-completions\ndialect: llama.cpp\nbody: {limit: {max_tokens: auto}}\n")
    with pytest.raises(ConfigError, match=r"body.limit.max_tokens: auto needs a tokenizer endpoint"):
        RouteTable.from_dir(folder)


def test_the_responses_face_forces_a_required_tool_call(fake, serve):
    up = fake("vllm")
    base = serve(up, "vllm", adapter="responses-to-completions", path="/v1/responses")
    fn = WEATHER["function"]
    r = client(base).responses.create(model="m", input="Weather in Paris?", tool_choice="required",
                                      tools=[{"type": "function", "name": fn["name"], "parameters": fn["parameters"]}],
                                      extra_headers=CALL_HEADERS)
    calls = [item for item in r.output if item.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert last_body(up)["prompt"].endswith("<tool_call>\n") and "json" in last_body(up)["structured_outputs"]
