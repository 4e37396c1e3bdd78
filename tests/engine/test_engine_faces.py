"""The three faces on the real engine, through the official SDKs: the same greedy answer as the
engine's own chat endpoint, ids with one prefix, logprobs carried (chat and Responses), and a `reasoning: think` route
that streams an answer without a thought as it comes."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import openai
import pytest

from conftest import Engine

SYSTEM = "You are a terse assistant."
QUESTION = "Name three rivers in Europe."
MAX = 40


def engines_own(engine: Engine, **kw: Any) -> dict[str, Any]:
    body = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
            "temperature": 0, "max_tokens": MAX, **kw}
    return httpx.post(f"{engine.url}/v1/chat/completions", json=body, timeout=60).json()


def chat_client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0, timeout=60)


def chat_kw(**kw: Any) -> dict[str, Any]:
    return {"model": "tiny", "temperature": 0, "max_tokens": MAX,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}], **kw}


def test_messages_face_answers_as_the_engine(engine: Engine, through):
    theirs = engines_own(engine)["choices"][0]
    a = anthropic.Anthropic(base_url=through(engine.url), api_key="k", max_retries=0, timeout=60)
    kw = {"model": "tiny", "max_tokens": MAX, "extra_body": {"temperature": 0}, "system": SYSTEM,
          "messages": [{"role": "user", "content": QUESTION}]}
    whole = a.messages.create(**kw)
    with a.messages.stream(**kw) as s:
        streamed = s.get_final_message()
    for msg in (whole, streamed):
        assert "".join(b.text for b in msg.content if b.type == "text") == theirs["message"]["content"]
        assert msg.stop_reason == {"stop": "end_turn", "length": "max_tokens"}[theirs["finish_reason"]]
        assert msg.id.startswith("msg_") and "chatcmpl" not in msg.id


def test_responses_face_answers_as_the_engine(engine: Engine, through):
    theirs = engines_own(engine)["choices"][0]
    c = chat_client(through(engine.url))
    kw = {"model": "tiny", "instructions": SYSTEM, "input": QUESTION, "temperature": 0, "max_output_tokens": MAX}
    whole = c.responses.create(**kw)
    with c.responses.stream(**kw) as s:
        streamed = s.get_final_response()
    for r in (whole, streamed):
        assert r.output_text == theirs["message"]["content"]
        assert r.id.startswith("resp_") and "chatcmpl" not in r.id


def test_chat_ids_carry_one_prefix(engine: Engine, through):
    c = chat_client(through(engine.url))
    assert c.chat.completions.create(**chat_kw()).id.startswith("chatcmpl-")
    assert not c.chat.completions.create(**chat_kw()).id.startswith("chatcmpl-chatcmpl-")
    ids = {ch.id for ch in c.chat.completions.create(stream=True, **chat_kw())}
    assert len(ids) == 1 and not ids.pop().startswith("chatcmpl-chatcmpl-")


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_are_the_engines_own(engine: Engine, through, stream):
    theirs = engines_own(engine, logprobs=True, top_logprobs=2)["choices"][0]["logprobs"]["content"]
    c = chat_client(through(engine.url))
    if stream:
        ours = [i for ch in c.chat.completions.create(stream=True, **chat_kw(logprobs=True, top_logprobs=2))
                if ch.choices and ch.choices[0].logprobs for i in ch.choices[0].logprobs.content]
    else:
        ours = c.chat.completions.create(**chat_kw(logprobs=True, top_logprobs=2)).choices[0].logprobs.content
    assert ours, "no logprobs"
    assert [(i.token, i.bytes) for i in ours] == [(i["token"], i["bytes"]) for i in theirs]
    assert [i.logprob for i in ours] == pytest.approx([i["logprob"] for i in theirs], abs=1e-3)
    assert [[t.token for t in i.top_logprobs] for i in ours] == [[t["token"] for t in i["top_logprobs"]]
                                                                  for i in theirs]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("reasoning", ["", "reasoning: think\n"])
def test_responses_logprobs_are_the_engines_own(engine: Engine, through, stream, reasoning):
    """The Responses face carries them in `output_text` and in each text delta, also on a thinking route
    (whose text is held until the answer's start cannot be `<think>`)."""
    theirs = engines_own(engine, logprobs=True, top_logprobs=2)["choices"][0]["logprobs"]["content"]
    c = chat_client(through(engine.url, reasoning))
    kw = {"model": "tiny", "instructions": SYSTEM, "input": QUESTION, "temperature": 0, "max_output_tokens": MAX,
          "include": ["message.output_text.logprobs"], "top_logprobs": 2}
    if stream:
        with c.responses.stream(**kw) as s:
            deltas = [lp for e in s if e.type == "response.output_text.delta" for lp in e.logprobs]
            final = s.get_final_response()
    else:
        final = c.responses.create(**kw)
    ours = final.output[0].content[0].logprobs
    if stream:
        assert [i.token for i in deltas] == [i.token for i in ours]
    assert [(i.token, i.bytes) for i in ours] == [(i["token"], i["bytes"]) for i in theirs]
    assert [i.logprob for i in ours] == pytest.approx([i["logprob"] for i in theirs], abs=1e-3)
    assert [[t.token for t in i.top_logprobs] for i in ours] == [[t["token"] for t in i["top_logprobs"]]
                                                                  for i in theirs]


def test_logprobs_without_alternatives(engine: Engine, through):
    choice = chat_client(through(engine.url)).chat.completions.create(**chat_kw(logprobs=True)).choices[0]
    assert "".join(i.token for i in choice.logprobs.content) == choice.message.content
    assert all(i.top_logprobs == [] and i.logprob <= 0 for i in choice.logprobs.content)


def test_a_thinking_route_streams_an_answer_without_a_thought(engine: Engine, through):
    """The model never writes <think>: every face streams the answer in many deltas, not one at the end."""
    base = through(engine.url, "reasoning: think\n")
    c = chat_client(base)
    whole = c.chat.completions.create(**chat_kw()).choices[0].message.content
    deltas = [ch.choices[0].delta.content for ch in c.chat.completions.create(stream=True, **chat_kw())
              if ch.choices and ch.choices[0].delta.content]
    assert len(deltas) > 1 and "".join(deltas) == whole

    a = anthropic.Anthropic(base_url=base, api_key="k", max_retries=0, timeout=60)
    with a.messages.stream(model="tiny", max_tokens=MAX, extra_body={"temperature": 0}, system=SYSTEM,
                           messages=[{"role": "user", "content": QUESTION}]) as s:
        texts = [e.delta.text for e in s if e.type == "content_block_delta" and e.delta.type == "text_delta"]
    assert len(texts) > 1 and "".join(texts) == whole

    with c.responses.stream(model="tiny", instructions=SYSTEM, input=QUESTION, temperature=0,
                            max_output_tokens=MAX) as s:
        texts = [e.delta for e in s if e.type == "response.output_text.delta"]
    assert len(texts) > 1 and "".join(texts) == whole


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices(engine: Engine, through, stream):
    """llama-server answers `n` choices (its `n_cmpl`); streamed, each ends with its own usage, added up."""
    c = chat_client(through(engine.url))
    # `ignore_eos` (llama.cpp: EOG tokens get a -inf bias): at temperature 1 the random model may
    # otherwise sample `<|im_end|>` first and answer a choice with no text at all, which is right but
    # says nothing here (it failed CI once that way).
    kw = chat_kw(temperature=1.0, max_tokens=5, extra_body={"ignore_eos": True})
    if stream:
        chunks = list(c.chat.completions.create(stream=True, n=2, stream_options={"include_usage": True}, **kw))
        texts = {0: "", 1: ""}
        for ch in chunks:
            for choice in ch.choices:
                texts[choice.index] += choice.delta.content or ""
        assert chunks[-1].usage.completion_tokens == 10  # both choices counted, 5 each
    else:
        # llama-server's own whole answer would count the first choice only (`handle_completions_impl`,
        # tools/server/server-context.cpp): the proxy streams it upstream and adds the choices up.
        whole = c.chat.completions.create(n=2, **kw)
        assert whole.usage.completion_tokens == 10
        choices = whole.choices
        texts = {choice.index: choice.message.content for choice in choices}
    assert sorted(texts) == [0, 1] and all(texts.values())
