"""The core's conversation and completion types: the chat request a face becomes, the completion that comes back.

msgspec decodes straight into these Structs (no intermediate dicts), which is
most of why the adapter stays within its CPU budget. Top-level fields a
`ChatRequest` does not define are collected by the chat face as the
request's extras (forwarded where the upstream's dialect allows, refused by
name where not); the upstream body itself is built in dialects.py.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

# --- the client's chat request -------------------------------------------------------------


class TextPart(msgspec.Struct):
    """`{"type": "text", "text": ...}`: the only content part a text prompt can carry."""

    type: Literal["text"]
    text: str


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str | dict[str, Any] = "{}"  # OpenAI sends a JSON string; some clients an object


class ToolCall(msgspec.Struct):
    function: FunctionCall
    id: str | None = None
    type: Literal["function"] = "function"


class Message(msgspec.Struct):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # an earlier turn's reasoning (templates such as Qwen3 read it)


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class ChatRequest(msgspec.Struct):
    messages: list[Message]
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    # Sampling extensions that local servers (vLLM, llama.cpp) accept on both endpoints.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    # Kept as plain JSON: the template renders them with `tojson`, key order and all.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # to the template (vLLM's extension), e.g. enable_thinking
    # vLLM's other chat template controls: consumed here, never forwarded (a completions server ignores them).
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    documents: Any = None  # refused: the route's templates are rendered without documents
    chat_template: Any = None  # refused: a client's Jinja template is code the operator did not approve
    # Held to the dialect's constraint (structured outputs), or refused by name where it has none.
    response_format: dict[str, Any] | None = None
    # Refused with a reason (modalities: anything but text).
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None


class StrictChatRequest(ChatRequest, forbid_unknown_fields=True):
    """The same request, decoded first: most clients send no other field, so the extras cost nothing then."""


# --- what comes back from upstream ---------------------------------------------------------


class Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionChoice(msgspec.Struct):
    text: str = ""
    index: int = 0
    finish_reason: str | None = None
    # Left undecoded: only requests that asked for logprobs pay for them.
    logprobs: msgspec.Raw = msgspec.Raw(b"null")
    # The stop string (or token id) that ended the choice: vLLM's `stop_reason`
    # (vllm/entrypoints/openai/protocol.py CompletionResponseChoice), SGLang's `matched_stop`.
    stop_reason: str | int | None = None
    matched_stop: str | int | None = None


class Completion(msgspec.Struct):
    """A `text_completion` body or one stream event of it."""

    choices: list[CompletionChoice] | None = None
    id: str | None = None
    created: int | None = None
    usage: Usage | None = None
    error: msgspec.Raw = msgspec.Raw(b"null")


# --- what the client gets back -------------------------------------------------------------


class OutFunction(msgspec.Struct):
    name: str
    arguments: str


class OutToolCall(msgspec.Struct):
    id: str
    function: OutFunction
    type: str = "function"


class OutMessage(msgspec.Struct):
    content: str | None
    role: str = "assistant"
    tool_calls: list[OutToolCall] | UnsetType = UNSET
    reasoning_content: str | None | UnsetType = UNSET
    reasoning: str | None | UnsetType = UNSET


class OutChoice(msgspec.Struct):
    index: int
    message: OutMessage
    finish_reason: str | None
    logprobs: Any = None


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[OutChoice]
    usage: Usage | UnsetType = UNSET
    object: str = "chat.completion"
