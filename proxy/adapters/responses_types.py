"""The typed edge of the OpenAI Responses face: what `POST /v1/responses` carries.

Shapes from the `openai` Python SDK (`types/responses/response_create_params.py`,
`response_input_item_param.py`, `function_tool_param.py`) and what Codex sends
(openai/codex `codex-rs/codex-api/src/common.rs` `ResponsesApiRequest`: model,
instructions, input, tools, tool_choice, parallel_tool_calls, reasoning, store,
stream, include, service_tier, prompt_cache_key, text, client_metadata).
Fields without meaning for a stateless local upstream (`include`,
`prompt_cache_key`, `client_metadata`, `service_tier`, `truncation`, `user`,
`safety_identifier`, `max_tool_calls`, ...) are accepted and ignored.

Input items are one loose Struct so that an item type the route cannot serve
gets a 400 naming it and its place rather than msgspec's bare "invalid tag".
"""

from __future__ import annotations

from typing import Any

import msgspec


class Part(msgspec.Struct):
    """A content part: input_text, output_text, refusal, summary_text, reasoning_text, input_image, ..."""

    type: str
    text: str | None = None
    refusal: str | None = None


class Item(msgspec.Struct):
    """An input item of any type; `responses.py` checks which fields its type needs."""

    type: str = "message"  # the "easy input message" {role, content} has no type
    role: str | None = None  # message
    content: str | list[Part] | None = None  # message; reasoning (reasoning_text parts)
    call_id: str | None = None  # function_call, function_call_output
    name: str | None = None  # function_call
    arguments: str | None = None  # function_call: JSON text
    input: str | None = None  # custom_tool_call: free text
    output: str | list[Part] | None = None  # function_call_output, custom_tool_call_output
    summary: list[Part] | None = None  # reasoning
    id: str | None = None


class TextFormat(msgspec.Struct):
    type: str  # text | json_object | json_schema
    name: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


class TextConfig(msgspec.Struct):
    format: TextFormat | None = None
    verbosity: str | None = None


class ReasoningConfig(msgspec.Struct):
    effort: str | None = None  # none | minimal | low | medium | high | xhigh
    summary: str | None = None


class ResponsesRequest(msgspec.Struct):
    model: str | None = None
    input: str | list[Item] | None = None
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    stream: bool = False
    store: bool | None = None
    metadata: dict[str, str] | None = None
    include: list[str] | None = None  # what else to return; only the logprobs one is refused
    top_logprobs: int | None = None
    previous_response_id: str | None = None  # resolved by the gateway from the state store (proxy/state.py)
    # Need state this route does not keep: refused with a reason.
    conversation: Any = None
    background: bool | None = None
    prompt: Any = None
