"""What llama.cpp's `/v1/completions` answers differently, through the proxy, against the mock's
llama.cpp dialect (checked against the real llama-server in tests/engine/):

- its completion ids already start with `chatcmpl-` (tools/server/server-common.cpp `gen_chatcmplid`);
- its logprobs come in the chat shape, `{"content": [{id, token, bytes, logprob, top_logprobs}]}`
  (tools/server/server-task.cpp `probs_vector_to_json`), and `logprobs: 0` gives none at all.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest

from servers import MockServer, run_mock

USER = [{"role": "user", "content": "Hi"}]
TEXT = "Paris is the capital."


@pytest.fixture
def llama() -> Iterator[MockServer]:
    with run_mock("llama.cpp") as server:
        yield server


@pytest.fixture
def base(llama, routes_dir, proxy_for) -> str:
    routes = {
        name: f"path: {path}\nupstream: {llama.url}/v1/completions\nadapter: {adapter}\ndialect: llama.cpp\n"
        for name, path, adapter in [("chat", "/v1/chat/completions", "chat-to-completions"),
                                    ("messages", "/v1/messages", "messages-to-completions"),
                                    ("responses", "/v1/responses", "responses-to-completions")]
    }
    return proxy_for(routes_dir(**routes))


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0, timeout=10,
                         default_headers={"x-mock-text": TEXT})


# --- ids -------------------------------------------------------------------------------------------

def test_ids_carry_one_prefix_on_every_face(base):
    c = client(base)
    assert c.chat.completions.create(model="m", messages=USER).id == "chatcmpl-mock"
    assert {chunk.id for chunk in c.chat.completions.create(model="m", messages=USER, stream=True)} == {"chatcmpl-mock"}
    rid = c.responses.create(model="m", input="Hi").id  # its own, unique: it names a stored response
    assert rid.startswith("resp_") and "chatcmpl" not in rid
    a = anthropic.Anthropic(base_url=base, api_key="k", max_retries=0, timeout=10,
                            default_headers={"x-mock-text": TEXT})
    assert a.messages.create(model="m", max_tokens=32, messages=USER).id == "msg_mock"


# --- logprobs --------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_reach_the_chat_client(base, stream):
    kw = {"model": "m", "messages": USER, "logprobs": True, "top_logprobs": 2}
    if stream:
        items = [i for ch in client(base).chat.completions.create(stream=True, **kw)
                 if ch.choices and ch.choices[0].logprobs for i in ch.choices[0].logprobs.content]
    else:
        items = client(base).chat.completions.create(**kw).choices[0].logprobs.content
    assert "".join(i.token for i in items) == TEXT
    assert [len(i.top_logprobs) for i in items] == [2] * 4
    for i in items:
        assert i.logprob < 0 and i.bytes == list(i.token.encode())
        assert i.top_logprobs[0].token == i.token and i.top_logprobs[0].logprob == i.logprob
        assert "id" not in (i.model_extra or {})  # OpenAI's shape, not the engine's


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_without_alternatives_still_give_each_tokens_logprob(base, llama, stream):
    """`logprobs: true` alone: llama.cpp gives nothing for `n_probs` 0, so the proxy asks for one."""
    kw = {"model": "m", "messages": USER, "logprobs": True}
    if stream:
        items = [i for ch in client(base).chat.completions.create(stream=True, **kw)
                 if ch.choices and ch.choices[0].logprobs for i in ch.choices[0].logprobs.content]
    else:
        items = client(base).chat.completions.create(**kw).choices[0].logprobs.content
    assert "".join(i.token for i in items) == TEXT
    assert all(i.logprob < 0 and i.top_logprobs == [] for i in items)
    assert json.loads(llama.requests[-1].body)["logprobs"] == 1


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_reach_the_responses_client(base, stream):
    kw = {"model": "m", "input": "Hi", "include": ["message.output_text.logprobs"], "top_logprobs": 2}
    if stream:
        with client(base).responses.stream(**kw) as s:
            deltas = [lp for e in s if e.type == "response.output_text.delta" for lp in e.logprobs]
            part = s.get_final_response().output[0].content[0]
        assert [i.token for i in deltas] == [i.token for i in part.logprobs]
    else:
        part = client(base).responses.create(**kw).output[0].content[0]
    assert "".join(i.token for i in part.logprobs) == TEXT
    assert [len(i.top_logprobs) for i in part.logprobs] == [2] * 4
    assert all("id" not in (i.model_extra or {}) for i in part.logprobs)  # OpenAI's shape, not the engine's


@pytest.mark.parametrize("field", [{"logprobs": True}, {"top_logprobs": 2}])
def test_the_messages_face_says_it_has_no_logprobs_rather_than_ignoring_them(base, llama, field):
    """The Messages API has no logprobs; a client that asks for them gets a 400, not an answer without.
    (Other fields it does not define are ignored and not sent upstream, as the README says.)"""
    a = anthropic.Anthropic(base_url=base, api_key="k", max_retries=0, timeout=10,
                            default_headers={"x-mock-text": TEXT})
    with pytest.raises(anthropic.BadRequestError) as err:
        a.messages.create(model="m", max_tokens=32, messages=USER, extra_body=field)
    assert "no logprobs" in err.value.message
    assert a.messages.create(model="m", max_tokens=32, messages=USER, extra_body={"logprobs": False, "seed": 7}).content
    assert not {"logprobs", "seed"} & set(json.loads(llama.requests[-1].body))


def test_no_logprobs_unless_asked(base):
    assert client(base).chat.completions.create(model="m", messages=USER).choices[0].logprobs is None


def test_stream_always_route_aggregates_llama_cpp_logprobs(llama, routes_dir, proxy_for):
    folder = routes_dir(chat=f"path: /v1/chat/completions\nupstream: {llama.url}/v1/completions\n"
                             "adapter: chat-to-completions\ndialect: llama.cpp\nstream: always\n")
    r = httpx.post(f"{proxy_for(folder)}/v1/chat/completions", headers={"x-mock-text": TEXT}, timeout=10,
                   json={"model": "m", "messages": USER, "logprobs": True, "top_logprobs": 1}).json()
    assert "".join(i["token"] for i in r["choices"][0]["logprobs"]["content"]) == TEXT


# --- n choices -------------------------------------------------------------------------------------

def test_a_whole_answer_with_n_choices_counts_every_choice(base, llama):
    """llama.cpp's own whole answer with `n` > 1 carries the first choice's usage only (server-context.cpp
    `handle_completions_impl`): the proxy asks for a stream, whose choices each end with their usage,
    and answers the whole with them added up (what quotas and the usage metric count)."""
    c = client(base)
    one = c.chat.completions.create(model="m", messages=USER).usage.completion_tokens
    whole = c.chat.completions.create(model="m", messages=USER, n=2)
    assert [ch.message.content for ch in whole.choices] == [TEXT, TEXT]
    assert whole.usage.completion_tokens == 2 * one
    sent = [json.loads(r.body) for r in llama.requests if r.path == "/v1/completions"]
    assert sent[-1]["stream"] is True and "stream" not in sent[0]
