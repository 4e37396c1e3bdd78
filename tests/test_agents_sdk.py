"""The OpenAI Agents SDK (`openai-agents`): an agent with a function tool, run through the
Responses face, streamed and not: the SDK's own loop (model → tool → model) over a base model."""

from __future__ import annotations

import asyncio
import json

import pytest

from agents import Agent, Runner, function_tool, set_tracing_disabled
from agents.models.openai_responses import OpenAIResponsesModel
from openai import AsyncOpenAI

from faces_util import said

ROUTE = """
    name: qwen-responses
    path: /v1/responses
    upstream: {upstream}/v1/completions
    adapter: responses-to-completions
"""
TOOL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@function_tool
def get_weather(city: str) -> str:
    """Current weather in a city."""
    return f"18 C and sunny in {city}"


@pytest.mark.parametrize("stream", [False, True])
def test_an_agent_calls_a_tool_and_answers(upstream, routes_dir, proxy_for, stream):
    set_tracing_disabled(True)  # the SDK would export traces to api.openai.com
    base = proxy_for(routes_dir(responses=ROUTE.format(upstream=upstream.url)))
    upstream.mock.script.extend([said(TOOL_TEXT, 4), said("It is 18 C and sunny in Paris.", 4)])

    async def run():
        client = AsyncOpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0, timeout=10)
        agent = Agent(name="weather", instructions="Answer briefly.", tools=[get_weather],
                      model=OpenAIResponsesModel(model="qwen", openai_client=client))
        if not stream:
            return await Runner.run(agent, "Weather in Paris?")
        result = Runner.run_streamed(agent, "Weather in Paris?")
        kinds = [e.type async for e in result.stream_events()]
        assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
        return result

    result = asyncio.run(run())
    assert result.final_output == "It is 18 C and sunny in Paris."
    calls = [i for i in result.new_items if i.type == "tool_call_item"]
    outputs = [i for i in result.new_items if i.type == "tool_call_output_item"]
    assert len(calls) == 1 and json.loads(calls[0].raw_item.arguments) == {"city": "Paris"}
    assert outputs[0].output == "18 C and sunny in Paris"
    # The second turn's prompt carries the call and its result, rendered by the model's template.
    prompt = json.loads(upstream.requests[-1].body)["prompt"]
    assert "<tool_response>\n18 C and sunny in Paris\n</tool_response>" in prompt
    assert prompt.startswith("<|im_start|>system\nAnswer briefly.")
