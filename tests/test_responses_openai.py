"""The official `openai` client's Responses API (and Codex's request shape) against the Responses face,
with the mock legacy-completions upstream behind the proxy."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pydantic
import pytest

from faces_util import said, sse_events, tokenized
from proxy.adapters.registry import make_adapter
from proxy.config import RouteConfig
from servers import run_mock

ROUTE = """
    name: qwen-responses
    path: /v1/responses
    upstream: {upstream}/v1/completions
    adapter: responses-to-completions
    reasoning: {reasoning}
    hosted_tools: {hosted}
    stream: {mode}
    default_headers: {{Authorization: Bearer s3cret}}
"""
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
           "strict": True}
TOOL_TEXT = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture
def responses(upstream, routes_dir, proxy_for):
    """`responses(reasoning=..., hosted=...)` -> (openai client, proxy base URL)."""

    def make(reasoning: str = "none", hosted: str = "ignore", upstream_url: str | None = None, mode: str = "auto"
             ) -> tuple[openai.OpenAI, str]:
        folder = routes_dir(responses=ROUTE.format(upstream=upstream_url or upstream.url, reasoning=reasoning,
                                                   hosted=hosted, mode=mode))
        base = proxy_for(folder)
        return openai.OpenAI(base_url=f"{base}/v1", api_key="client-key", max_retries=0, timeout=10), base

    return make


def test_create_returns_a_response_and_renders_instructions(responses, upstream):
    client, _ = responses()
    r = client.responses.create(model="qwen", instructions="Be brief.", input=[
        {"role": "developer", "content": "Answer in English."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}], extra_headers=said("Hello there!"))
    assert r.object == "response" and r.status == "completed" and r.id.startswith("resp_")
    assert r.output_text == "Hello there!" and r.model == "qwen"
    assert [o.type for o in r.output] == ["message"] and r.output[0].content[0].type == "output_text"
    assert r.usage is not None and r.usage.output_tokens == 2
    assert r.usage.total_tokens == r.usage.input_tokens + 2
    sent = json.loads(upstream.requests[-1].body)
    assert sent["prompt"] == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>system\nAnswer in English."
                              "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    client.responses.create(model="qwen", input="Just a string", max_output_tokens=64)
    sent = json.loads(upstream.requests[-1].body)
    assert sent["prompt"].startswith("<|im_start|>user\nJust a string<|im_end|>") and sent["max_tokens"] == 64


def test_stream_events_and_sequence_numbers(responses):
    client, base = responses()
    with client.responses.stream(model="qwen", input="Count", extra_headers=said("One two three.")) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert final.output_text == "One two three." and final.status == "completed"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas == ["One ", "two ", "three."]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    raw = httpx.post(f"{base}/v1/responses", timeout=10, headers=said("One two."),
                     json={"model": "qwen", "input": "Hi", "stream": True})
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    evs = sse_events(raw.text)
    assert all(name == data["type"] for name, data in evs)
    assert [name for name, _ in evs] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    ids = {d["response"]["id"] for n, d in evs if n.startswith("response.") and "response" in d}
    assert len(ids) == 1
    done = evs[-1][1]["response"]
    assert done["status"] == "completed" and done["output"][0]["content"][0]["text"] == "One two."
    assert done["usage"]["output_tokens"] == 2


@pytest.mark.parametrize("stream", [False, True])
def test_function_call_round_trip(responses, upstream, stream):
    client, _ = responses()
    items: list = [{"role": "user", "content": "Weather in Paris?"}]

    def ask(text: str):
        kw = dict(model="qwen", input=items, tools=[WEATHER], extra_headers=said(text, 6))
        if not stream:
            return client.responses.create(**kw)
        with client.responses.stream(**kw) as s:
            kinds = [e.type for e in s]
            if "<tool_call>" in text:
                assert "response.function_call_arguments.delta" in kinds
                assert "response.function_call_arguments.done" in kinds
            return s.get_final_response()

    first = ask(TOOL_TEXT)
    assert [o.type for o in first.output] == ["message", "function_call"]
    assert first.output_text == "Checking."
    call = first.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("call_") and call.status == "completed"
    items += [o.model_dump(exclude_none=True) for o in first.output]
    items.append({"type": "function_call_output", "call_id": call.call_id, "output": "18 C, sunny"})
    second = ask("It is 18 C and sunny.")
    assert second.output_text == "It is 18 C and sunny."
    prompt = json.loads(upstream.requests[-1].body)["prompt"]
    assert ('<|im_start|>assistant\nChecking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
            '\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response><|im_end|>\n'
            '<|im_start|>assistant\n') in prompt


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_items(responses, stream):
    client, _ = responses(reasoning="think")
    kw = dict(model="qwen", input="2+2?", reasoning={"effort": "high"},
              extra_headers=said("<think>Two and two make four.</think>It is 4.", 5))
    if stream:
        with client.responses.stream(**kw) as s:
            kinds = [e.type for e in s]
            r = s.get_final_response()
        assert "response.reasoning_text.delta" in kinds and "response.reasoning_text.done" in kinds
    else:
        r = client.responses.create(**kw)
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "Two and two make four."
    assert r.output_text == "It is 4."
    again = client.responses.create(model="qwen", input=[
        {"role": "user", "content": "2+2?"}, *[o.model_dump(exclude_none=True) for o in r.output],
        {"role": "user", "content": "And 3+3?"}], extra_headers=said("6"))
    assert again.output_text == "6"


def test_parse_with_a_pydantic_model(responses, upstream):
    class Weather(pydantic.BaseModel):
        city: str
        celsius: int

    client, _ = responses()
    r = client.responses.parse(model="qwen", input="Weather in Paris as JSON", text_format=Weather,
                               extra_headers=said('{"city": "Paris", "celsius": 18}'))
    assert r.output_parsed == Weather(city="Paris", celsius=18)


def test_max_output_tokens_cut_is_incomplete(responses):
    client, base = responses()
    r = client.responses.create(model="qwen", input="Go", max_output_tokens=16,
                                extra_headers=said("a b c", **{"x-mock-finish": "length"}))
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete" and r.output_text == "a b c"
    raw = httpx.post(f"{base}/v1/responses", timeout=10, headers=said("a b", **{"x-mock-finish": "length"}),
                     json={"model": "qwen", "input": "Go", "stream": True, "max_output_tokens": 16})
    evs = sse_events(raw.text)
    assert evs[-1][0] == "response.incomplete"
    assert evs[-1][1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_what_codex_sends_works(responses, upstream):
    """Codex's request: store false, include, prompt_cache_key, client_metadata, reasoning with
    summary, text verbosity, web_search beside function tools, `Accept-Encoding: zstd,gzip`."""
    client, base = responses()
    body = {
        "model": "qwen-coder", "instructions": "You are Codex.", "stream": True, "store": False,
        "input": [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "perm"}]},
                  {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "<env/>"},
                                                                  {"type": "input_text", "text": "list files"}]}],
        "tools": [{"type": "function", "name": "shell", "description": "Runs a command", "strict": False,
                   "parameters": {"type": "object", "properties": {"command": {"type": "array",
                                                                              "items": {"type": "string"}}},
                                  "required": ["command"], "additionalProperties": False}},
                  {"type": "web_search"}],
        "tool_choice": "auto", "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"}, "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "thread-1", "text": {"verbosity": "medium"},
        "client_metadata": {"x-codex-installation-id": "abc"},
    }
    text = '<tool_call>\n{"name": "shell", "arguments": {"command": ["ls"]}}\n</tool_call>'
    r = httpx.post(f"{base}/v1/responses", json=body, timeout=10,
                   headers={"accept-encoding": "zstd,gzip", "session-id": "s1", **said(text)})
    assert r.status_code == 200, r.text
    evs = sse_events(r.text)
    done = [d["item"] for n, d in evs if n == "response.output_item.done"]
    assert done == [{"id": done[0]["id"], "type": "function_call", "status": "completed",
                     "call_id": done[0]["call_id"], "name": "shell", "arguments": '{"command": ["ls"]}'}]
    assert evs[-1][0] == "response.completed"
    seen = upstream.requests[-1]
    assert seen.headers["accept-encoding"] == "identity"
    sent = json.loads(seen.body)
    assert '"name": "shell"' in sent["prompt"] and "web_search" not in sent["prompt"]
    assert "<|im_start|>user\n<env/>\nlist files<|im_end|>" in sent["prompt"]
    metrics = httpx.get(f"{base}/metrics", timeout=10).text
    assert 'llmproxy_tools_left_out_total{route="qwen-responses",tool="web_search"} 1.0' in metrics


def test_refusals_name_the_field(responses):
    client, _ = responses(hosted="reject")
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="q", input="x", tools=[WEATHER, {"type": "web_search"}])
    assert err.value.body["param"] == "tools" and "web_search" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError) as err:  # OpenAI's own answer to an unknown id
        client.responses.create(model="q", input="x", previous_response_id="resp_123")
    assert err.value.body["param"] == "previous_response_id" and err.value.body["code"] == "previous_response_not_found"
    assert err.value.body["message"] == "Previous response with id 'resp_123' not found."
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="q", input=[{"role": "user", "content": [
            {"type": "input_text", "text": "what is this"},
            {"type": "input_image", "image_url": "https://example.invalid/x.png"}]}])
    assert err.value.body["param"] == "input[0].content[1].type"
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="q", input=[{"type": "item_reference", "id": "msg_1"}])
    assert err.value.body["param"] == "input[0].type"
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="q", input="x", temperature="hot")  # type: ignore[arg-type]
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="q", input=[{"role": "user", "content": [{"type": "input_text"}]}])
    assert err.value.body["param"] == "input[0].content[0].text" and "needs `text`" in err.value.body["message"]


def test_failures_in_the_responses_shape(responses):
    client, _ = responses(upstream_url="http://127.0.0.1:9")
    with pytest.raises(openai.APIStatusError) as err:
        client.responses.create(model="q", input="x")
    assert err.value.status_code == 502 and err.value.body["code"] == "upstream_unreachable"
    client, base = responses()
    raw = httpx.post(f"{base}/v1/responses", timeout=10, json={"model": "q", "input": "x", "stream": True},
                     headers=said("a b c d", **{"x-mock-fault": "drop-after:2"}))
    evs = sse_events(raw.text)
    assert [n for n, _ in evs][-2:] == ["error", "response.failed"]
    assert [d["sequence_number"] for _, d in evs] == list(range(len(evs)))
    failed = evs[-1][1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert "mid-response" in failed["error"]["message"]
    with client.responses.stream(model="q", input="x", extra_headers=said("a b", **{"x-mock-fault": "drop-after:1"})
                                 ) as s:
        kinds = [e.type for e in s]
        with pytest.raises(RuntimeError, match="response.completed"):
            s.get_final_response()
    assert kinds[-1] == "response.failed"


def test_input_tokens_count(responses, upstream):
    client, _ = responses()
    counted = client.responses.input_tokens.count(model="qwen", input="one two three", instructions="sys")
    prompt, count = tokenized(upstream)
    assert prompt == "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\none two three<|im_end|>\n<|im_start|>assistant\n"
    assert counted.input_tokens == count


@pytest.mark.parametrize("mode", ["always", "never"])
def test_route_stream_modes(responses, mode):
    """`stream: always` (SSE upstream, whole answer to the client) and `never` (the reverse)."""
    client, _ = responses(mode=mode)
    assert client.responses.create(model="q", input="x", extra_headers=said("a b c")).output_text == "a b c"
    with client.responses.stream(model="q", input="x", extra_headers=said("a b c")) as s:
        assert s.get_final_response().output_text == "a b c"


@pytest.mark.parametrize("stream", [False, True])
def test_custom_tool_round_trip(responses, upstream, stream):
    """A free-text tool (Codex's freeform `apply_patch`): offered as a function of one string, answered
    as a `custom_tool_call` item, sent back as `custom_tool_call` + `custom_tool_call_output`."""
    client, _ = responses()
    tool = {"type": "custom", "name": "apply_patch", "description": "Edit files.",
            "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}}
    patch = "*** Begin Patch\n*** End Patch"
    text = "<tool_call>\n" + json.dumps({"name": "apply_patch", "arguments": {"input": patch}}) + "\n</tool_call>"
    kw = dict(model="q", input="fix it", tools=[tool], extra_headers=said(text, 3))
    if stream:
        with client.responses.stream(**kw) as s:
            kinds = [e.type for e in s]
            r = s.get_final_response()
        assert "response.custom_tool_call_input.done" in kinds
    else:
        r = client.responses.create(**kw)
    call = r.output[0]
    assert call.type == "custom_tool_call" and call.name == "apply_patch" and call.input == patch
    sent = json.loads(upstream.requests[-1].body)["prompt"]
    assert '"parameters": {"type": "object", "properties": {"input": {"type": "string"}}' in sent
    assert "grammar:\\nstart: /.+/" in sent
    client.responses.create(model="q", tools=[tool], input=[
        {"role": "user", "content": "fix it"}, call.model_dump(exclude_none=True),
        {"type": "custom_tool_call_output", "call_id": call.call_id, "output": "Done!"}], extra_headers=said("ok"))
    prompt = json.loads(upstream.requests[-1].body)["prompt"]
    assert '"arguments": {"input": "*** Begin Patch\\n*** End Patch"}}' in prompt
    assert "<tool_response>\nDone!\n</tool_response>" in prompt


def test_reasoning_effort_reaches_the_template(routes_dir, proxy_for, upstream):
    """`reasoning.effort: none|minimal` renders Qwen3's empty think block (`enable_thinking: false`)."""
    folder = routes_dir(responses=ROUTE.format(upstream=upstream.url, reasoning="think", hosted="ignore",
                                               mode="auto") + "    template: qwen3\n")
    client = openai.OpenAI(base_url=f"{proxy_for(folder)}/v1", api_key="k", max_retries=0, timeout=10)
    client.responses.create(model="q", input="x", reasoning={"effort": "minimal"})
    assert json.loads(upstream.requests[-1].body)["prompt"].endswith("<think>\n\n</think>\n\n")
    client.responses.create(model="q", input="x", reasoning={"effort": "high"})
    assert json.loads(upstream.requests[-1].body)["prompt"].endswith("<|im_start|>assistant\n")


def test_stream_and_whole_agree_however_the_upstream_splits(responses):
    """The same completion (reasoning, text, two calls), split into 1..40 upstream events, gives the same
    response streamed (the SDK's stream state) as whole."""
    client, _ = responses(reasoning="think")
    text = ("<think>Look up both.</think>Checking both cities.\n" + TOOL_TEXT.split("\n", 1)[1]
            + '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')

    def shape(r):
        return [(o.type, o.content[0].text if o.type in ("reasoning", "message") else json.loads(o.arguments))
                for o in r.output], r.status

    whole = shape(client.responses.create(model="q", input="x", tools=[WEATHER], extra_headers=said(text)))
    assert whole == ([("reasoning", "Look up both."), ("message", "Checking both cities."),
                      ("function_call", {"city": "Paris"}), ("function_call", {"city": "Oslo"})], "completed")
    for events in (1, 2, 3, 7, 13, 40):
        with client.responses.stream(model="q", input="x", tools=[WEATHER], extra_headers=said(text, events)) as s:
            assert shape(s.get_final_response()) == whole, events


@pytest.mark.parametrize("stream", [False, True])
def test_previous_response_id_continues_a_stored_conversation(responses, upstream, stream):
    """The answer is kept (in memory without --state); a follow-up sends only its new input, and the
    upstream prompt holds the whole conversation. Instructions are not carried over (as OpenAI does)."""
    client, _ = responses()
    first = client.responses.create(model="q", instructions="Be brief.", input="My name is Ada.")
    assert first.store is True
    if stream:
        with client.responses.stream(model="q", input="What is my name?", previous_response_id=first.id) as s:
            second = s.get_final_response()
    else:
        second = client.responses.create(model="q", input="What is my name?", previous_response_id=first.id)
    assert second.previous_response_id == first.id and second.id != first.id
    prompt = json.loads(upstream.requests[-1].body)["prompt"]
    assert "My name is Ada." in prompt and first.output_text in prompt and "What is my name?" in prompt
    assert "Be brief." not in prompt
    third = client.responses.create(model="q", input="And again?", previous_response_id=second.id)
    prompt = json.loads(upstream.requests[-1].body)["prompt"]
    assert prompt.index("My name is Ada.") < prompt.index("What is my name?") < prompt.index("And again?")
    assert third.status == "completed"


def test_store_false_keeps_nothing(responses):
    client, _ = responses()
    r = client.responses.create(model="q", input="hi", store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="q", input="again", previous_response_id=r.id)


# --- logprobs ------------------------------------------------------------------------------------

LP_TEXT = "Paris is the capital."


@pytest.mark.parametrize("dialect", ["llama.cpp", "vllm"])
@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_are_carried_in_the_output_text(routes_dir, proxy_for, dialect, stream):
    """`include: ["message.output_text.logprobs"]` + `top_logprobs`: each token's logprob in the
    `output_text` part, and streamed in each `response.output_text.delta` (the SDK's types)."""
    with run_mock(dialect) as mock:
        folder = routes_dir(responses=f"path: /v1/responses\nupstream: {mock.url}/v1/completions\n"
                                      f"adapter: responses-to-completions\ndialect: {dialect}\n")
        client = openai.OpenAI(base_url=f"{proxy_for(folder)}/v1", api_key="k", max_retries=0, timeout=10)
        kw = {"model": "m", "input": "Hi", "include": ["message.output_text.logprobs"], "top_logprobs": 2,
              "extra_headers": said(LP_TEXT)}
        if stream:
            with client.responses.stream(**kw) as s:
                events = list(s)
                final = s.get_final_response()
            deltas = [e for e in events if e.type == "response.output_text.delta"]
            streamed = [lp for e in deltas for lp in e.logprobs]
            assert "".join(lp.token for lp in streamed) == LP_TEXT
            assert all(len(e.logprobs) == 1 and e.logprobs[0].token == e.delta for e in deltas)
            (done,) = [e for e in events if e.type == "response.output_text.done"]
            assert [lp.token for lp in done.logprobs] == [lp.token for lp in streamed]
        else:
            final = client.responses.create(**kw)
        sent = json.loads(mock.requests[-1].body)
    assert sent["logprobs"] == 2
    part = final.output[0].content[0]
    assert part.text == LP_TEXT and "".join(lp.token for lp in part.logprobs) == LP_TEXT
    for lp in part.logprobs:
        assert lp.logprob < 0 and lp.bytes == list(lp.token.encode())
        assert len(lp.top_logprobs) == 2 and lp.top_logprobs[0].token == lp.token


@pytest.mark.parametrize("ask", [{"include": ["message.output_text.logprobs"]}, {"top_logprobs": 3}, {}])
def test_logprobs_only_when_asked(responses, ask):
    """The `include` entry alone gives the sampled tokens' logprobs; `top_logprobs` alone asks too
    (rather than an empty list); neither: none asked upstream, `logprobs: []` as OpenAI answers."""
    with run_mock("vllm") as mock:
        client, _ = responses(upstream_url=mock.url)
        part = client.responses.create(model="m", input="Hi", extra_headers=said(LP_TEXT), **ask).output[0].content[0]
        sent = json.loads(mock.requests[-1].body)
    if ask:
        assert sent["logprobs"] == ask.get("top_logprobs", 0)
        assert "".join(lp.token for lp in part.logprobs) == LP_TEXT
    else:
        assert "logprobs" not in sent and part.logprobs == []


def test_top_logprobs_out_of_range_is_a_400(responses):
    client, _ = responses()
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="m", input="Hi", top_logprobs=21)
    assert err.value.param == "top_logprobs"


def test_logprobs_of_held_back_text_are_each_reported_once():
    """Tokens whose text the proxy held (a template stop string begun, then completed and cut) still
    reach the client once: streamed in a last, empty delta, and in the part's list, as the whole answer."""
    config = RouteConfig(name="r", path="/v1/responses", upstream="http://127.0.0.1:9/v1/completions",
                         adapter="responses-to-completions", dialect="llama.cpp")
    adapter = make_adapter(config)
    tokens = ["Paris", " is", "<|im", "_end|>"]

    def event(tok: str | None) -> dict:
        lp = None if tok is None else {"content": [{"id": 1, "token": tok, "bytes": list(tok.encode()),
                                                    "logprob": -0.5, "top_logprobs": []}]}
        return {"id": "chatcmpl-x", "created": 1, "choices": [{"index": 0, "text": tok or "", "logprobs": lp,
                                                               "finish_reason": None if tok else "stop"}]}

    sse = [b"data: " + json.dumps(event(t)).encode() + b"\n\n" for t in [*tokens, None]] + [b"data: [DONE]\n\n"]
    body = {"model": "m", "input": "Hi", "include": ["message.output_text.logprobs"], "stream": True}
    call = adapter.request(json.dumps(body).encode())

    async def relay() -> bytes:
        async def chunks():
            for c in sse:
                yield c
        return b"".join([out async for out in call.events(chunks())])

    events = [json.loads(line[6:]) for line in asyncio.run(relay()).split(b"\n") if line.startswith(b"data: {")]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert "".join(e["delta"] for e in deltas) == "Paris is"
    assert [i["token"] for e in deltas for i in e["logprobs"]] == tokens
    (done,) = [e for e in events if e["type"] == "response.output_text.done"]
    assert [i["token"] for i in done["logprobs"]] == tokens

    whole = adapter.request(json.dumps({**body, "stream": False}).encode())
    items = [event(t)["choices"][0]["logprobs"]["content"][0] for t in tokens]
    doc = {"id": "chatcmpl-x", "created": 1, "choices": [{"index": 0, "text": "Paris is<|im_end|>",
                                                          "finish_reason": "stop", "logprobs": {"content": items}}]}
    part = json.loads(whole.response(json.dumps(doc).encode()))["output"][0]["content"][0]
    assert part["text"] == "Paris is" and [i["token"] for i in part["logprobs"]] == tokens
