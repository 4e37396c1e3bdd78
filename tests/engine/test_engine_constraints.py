"""Structured outputs and forced tool calls hold on the real engine: the proxy's `json_schema`
(llama.cpp's completions constraint) really constrains what the random model writes.

Schemas are bounded (enums, integers, booleans): a random model inside a free string never ends.
No parity with the engine's own chat endpoint here: its `response_format` goes through its chat
parser's grammar (common/chat-auto-parser-generator.cpp), whose white space rules differ from the
`json_schema` grammar of `/v1/completions`, so the two greedy answers differ in white space and more."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest

from conftest import Engine

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["color", "count", "ok"],
          "properties": {"color": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer"},
                         "ok": {"type": "boolean"}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"enum": ["Paris", "Tokyo"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a zone",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["utc"],
                   "properties": {"utc": {"type": "boolean"}}}}}
USER = [{"role": "user", "content": "Describe the weather as JSON."}]


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0, timeout=120)


def body(**kw: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": USER, "temperature": 0, "max_tokens": 300, **kw}


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_holds(engine: Engine, through, stream):
    rf = {"type": "json_schema", "json_schema": {"name": "report", "schema": SCHEMA}}
    c = client(through(engine.url))
    if stream:
        chunks = list(c.chat.completions.create(stream=True, **body(response_format=rf)))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    else:
        choice = c.chat.completions.create(**body(response_format=rf)).choices[0]
        text, finish = choice.message.content, [choice.finish_reason]
    assert finish == ["stop"]
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_mode_holds(engine: Engine, through):
    choice = client(through(engine.url)).chat.completions.create(
        **body(response_format={"type": "json_object"})).choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(json.loads(choice.message.content), dict)


def check_call(call: Any, tools: list[dict[str, Any]]) -> None:
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert call.function.name in by_name
    jsonschema.validate(json.loads(call.function.arguments), by_name[call.function.name])


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_tool_choice_forces_that_call(engine: Engine, through, stream):
    kw = body(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    c = client(through(engine.url))
    if stream:
        with c.beta.chat.completions.stream(**kw) as s:
            choice = s.get_final_completion().choices[0]
    else:
        choice = c.chat.completions.create(**kw).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [call.function.name for call in choice.message.tool_calls] == ["get_weather"]
    check_call(choice.message.tool_calls[0], [WEATHER])


def test_required_tool_choice_forces_one_of_the_tools(engine: Engine, through):
    kw = body(tools=[WEATHER, TIME], tool_choice="required")
    choice = client(through(engine.url)).chat.completions.create(**kw).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(choice.message.tool_calls) == 1
    check_call(choice.message.tool_calls[0], [WEATHER, TIME])
