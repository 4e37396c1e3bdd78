"""The typed edge of the Anthropic Messages face: what `POST /v1/messages` carries.

Shapes from the `anthropic` Python SDK (`types/message_create_params.py`,
`types/*_block_param.py`, `types/tool_param.py`, `types/tool_choice_*_param.py`,
`types/thinking_config_*_param.py`). Unknown fields are ignored, as the SDKs add
fields faster than a local upstream could use them (`context_management`,
`cache_control`, `container`, `mcp_servers`, `service_tier`, ...).

Content blocks are one loose Struct rather than a tagged union so that a block
type the route cannot serve (an image, a document) gets a 400 naming it and the
place it is, instead of msgspec's bare "invalid tag".
"""

from __future__ import annotations

from typing import Any

import msgspec


class Block(msgspec.Struct):
    """One content block of any type; `messages.py` checks which fields its type needs."""

    type: str
    text: str | None = None  # text
    id: str | None = None  # tool_use
    name: str | None = None  # tool_use
    input: Any = None  # tool_use: an object
    tool_use_id: str | None = None  # tool_result
    content: str | list[Block] | None = None  # tool_result: a string or text blocks
    is_error: bool = False  # tool_result
    thinking: str | None = None  # thinking
    signature: str | None = None  # thinking (opaque; a local model's thinking is not signed)


class InMessage(msgspec.Struct):
    role: str
    content: str | list[Block]


class SystemBlock(msgspec.Struct):
    text: str
    type: str = "text"


class Tool(msgspec.Struct):
    """A client tool (`type` absent or "custom") or one of Anthropic's own (`web_search_20250305`, `bash_20250124`...)."""

    name: str
    type: str | None = None
    description: str | None = None
    input_schema: dict[str, Any] | None = None


class ToolChoice(msgspec.Struct):
    type: str  # auto | any | tool | none
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(msgspec.Struct):
    type: str  # enabled | disabled | adaptive
    budget_tokens: int | None = None


class OutputFormat(msgspec.Struct):
    type: str  # json_schema
    schema: dict[str, Any] | None = None


class OutputConfig(msgspec.Struct):
    format: OutputFormat | None = None
    effort: str | None = None


class MessagesRequest(msgspec.Struct):
    """`max_tokens` is required by the API; `count_tokens` takes the same body without it."""

    messages: list[InMessage]
    model: str | None = None
    max_tokens: int | None = None
    system: str | list[SystemBlock] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    output_format: OutputFormat | None = None  # the structured-outputs beta's older spelling
    metadata: dict[str, Any] | None = None  # user_id: not sent upstream (Claude Code's is a JSON blob)
    # Not in the Messages API: read only to refuse them (a client that asks must not get an answer without).
    logprobs: Any = None
    top_logprobs: Any = None
