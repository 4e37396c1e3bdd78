"""The Anthropic Messages face: `POST /v1/messages` over a legacy completions upstream.

`request()` turns the Messages body into the core's `Generation` (history in
chat form: `tool_use` blocks -> assistant `tool_calls`, `tool_result` ->
`role: tool`, `thinking` -> `reasoning_content`); `MessagesCall` encodes the
core's events as one `message` or as the Messages event stream.

The stream grammar is the one the `anthropic` SDK's accumulator enforces
(`anthropic/lib/streaming/_messages.py` `accumulate_event`, event types in
`anthropic/types/raw_message_stream_event.py`): `message_start`, then per
content block `content_block_start` -> `content_block_delta`* ->
`content_block_stop`, then `message_delta` (stop_reason, usage) and
`message_stop`; every event has an `event:` line equal to its `type` (the SDK
skips events without one, `anthropic/_streaming.py`); `ping` after the first
block start, as the API sends it. A `tool_use` block starts with `input: {}`
and carries its arguments as one `input_json_delta`; a `thinking` block ends
with a `signature_delta` (a local model's thinking is not signed: the
signature is a digest of the text, so clients that require one keep working).
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import msgspec

from .. import sse
from ..errors import BadRequest, bad_body
from .call import AdapterBase
from .core_types import FunctionCall, Message, ToolCall as ChatToolCall
from .core import Core, Finish, Generation, Start, ToolCall, Turn, Usage, id_tail
from .agent_base import FaceCall, TokenCounter, json_schema_format, left_out
from .messages_types import Block, MessagesRequest

if TYPE_CHECKING:
    from ..config import RouteConfig

_decode = msgspec.json.Decoder(MessagesRequest).decode
_encode = msgspec.json.Encoder().encode

# finish reason (core) -> stop_reason (Anthropic, `anthropic/types/stop_reason.py`)
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
# Anthropic's own request headers: meant for the proxy (or Anthropic), not the completions server.
CLIENT_HEADERS = frozenset({b"x-api-key", b"anthropic-version", b"anthropic-beta"})
_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}
_UNSUPPORTED_BLOCKS = {
    "image": "image blocks are not supported by this route (a text completions upstream)",
    "document": "document blocks are not supported by this route (a text completions upstream)",
    "search_result": "search_result blocks are not supported by this route (a text completions upstream)",
}


class MessagesToCompletions(AdapterBase):
    """The adapter of `adapter: messages-to-completions` routes (built once per route)."""

    face = "anthropic"

    def __init__(self, config: RouteConfig) -> None:
        self.core = Core(config)
        self.route = config.name
        self.hosted_tools = config.hosted_tools
        self.model = config.upstream_model or config.name
        self.subpaths = {"/count_tokens": TokenCounter(self.core, self.face, self.generation, _count_answer,
                                                       CLIENT_HEADERS)}

    def request(self, body: bytes) -> MessagesCall:
        gen = self.generation(body)
        if gen.max_tokens is None:
            raise BadRequest("max_tokens: Field required (the Messages API requires it)", param="max_tokens",
                             code="missing_field")
        return MessagesCall(self.core.start(gen), model=gen.model or self.model, stream=gen.stream)

    def generation(self, body: bytes) -> Generation:
        """A Messages body -> the core's `Generation`. Raises `BadRequest` naming the field."""
        try:
            req = _decode(body)
        except msgspec.DecodeError as exc:
            raise bad_body(exc) from None
        if req.logprobs or req.top_logprobs is not None:
            raise BadRequest("the Messages API has no logprobs: ask the chat completions or Responses route",
                             param="logprobs" if req.logprobs else "top_logprobs", code="unsupported_parameter")
        if req.max_tokens is not None and req.max_tokens < 1:
            raise BadRequest("max_tokens: must be at least 1", param="max_tokens", code="invalid_value")
        messages = _history(req)
        tools = self._tools(req)
        sampling = {k: v for k in ("temperature", "top_p", "top_k") if (v := getattr(req, k)) is not None}
        gen = Generation(messages=messages, model=req.model, stream=req.stream, tools=tools,
                         tool_choice=_tool_choice(req, tools), max_tokens=req.max_tokens,
                         stop=req.stop_sequences or None, sampling=sampling,
                         parallel_tool_calls=not (req.tool_choice and req.tool_choice.disable_parallel_tool_use))
        if req.thinking is not None and req.thinking.type in ("enabled", "disabled"):
            gen.template_kwargs = {"enable_thinking": req.thinking.type == "enabled"}
        fmt = (req.output_config.format if req.output_config else None) or req.output_format
        if fmt is not None:
            if fmt.type != "json_schema" or not isinstance(fmt.schema, dict):
                raise BadRequest("output_config.format: only {'type': 'json_schema', 'schema': {...}} is supported",
                                 param="output_config.format", code="invalid_value")
            gen.response_format = json_schema_format(fmt.schema, None, True)
        return gen

    def _tools(self, req: MessagesRequest) -> list[dict[str, Any]] | None:
        if not req.tools:
            return None
        tools, hosted = [], []
        for i, t in enumerate(req.tools):
            if t.type not in (None, "custom"):  # Anthropic's own tools (web_search_*, bash_*, ...)
                hosted.append(t.type)
                continue
            if t.input_schema is None:
                raise BadRequest(f"tools[{i}].input_schema: Field required", param=f"tools[{i}].input_schema",
                                 code="missing_field")
            fn: dict[str, Any] = {"name": t.name}
            if t.description is not None:
                fn["description"] = t.description
            fn["parameters"] = t.input_schema
            tools.append({"type": "function", "function": fn})
        left_out(self.route, self.hosted_tools, hosted, "tools",
                 "; send only client tools (no `type`, or `type: custom`)")
        return tools or None


def _history(req: MessagesRequest) -> list[Message]:
    """System and messages in chat form, the form the template renders."""
    out: list[Message] = []
    if req.system:
        system = req.system if isinstance(req.system, str) else "\n\n".join(b.text for b in req.system)
        out.append(Message(role="system", content=system))
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        if m.role not in ("user", "assistant"):
            raise BadRequest(f"{where}.role: must be user or assistant (the system prompt goes in `system`)",
                             param=f"{where}.role", code="invalid_value")
        if isinstance(m.content, str):
            out.append(Message(role=m.role, content=m.content))
        else:
            _turn(m.role, m.content, where, out)
    if not req.messages:
        raise BadRequest("messages: at least one message is required", param="messages", code="invalid_value")
    return out


def _turn(role: str, blocks: list[Block], where: str, out: list[Message]) -> None:
    """One turn's blocks in chat form. A user turn's tool results go first (templates put them right
    after the calls), then its text; an assistant turn is one message with text, reasoning and calls."""
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list[ChatToolCall] = []
    for j, b in enumerate(blocks):
        at = f"{where}.content[{j}]"
        kind = b.type
        if kind == "text":
            texts.append(_need(b.text, at, "text"))
        elif kind == "tool_result" and role == "user":
            result = _result_text(b.content, at)
            out.append(Message(role="tool", content=f"Error: {result}" if b.is_error else result,
                               tool_call_id=_need(b.tool_use_id, at, "tool_use_id")))
        elif kind == "thinking" and role == "assistant":
            thoughts.append(_need(b.thinking, at, "thinking"))
        elif kind == "redacted_thinking" and role == "assistant":
            continue  # encrypted by Anthropic: nothing a local model can read
        elif kind == "tool_use" and role == "assistant":
            args = b.input if isinstance(b.input, dict) else {}
            calls.append(ChatToolCall(FunctionCall(_need(b.name, at, "name"), args), id=b.id))
        else:
            _unsupported(b, at)
    if role == "assistant":
        out.append(Message(role="assistant", content="".join(texts) or None, tool_calls=calls or None,
                           reasoning_content="".join(thoughts) or None))
    elif texts:
        out.append(Message(role="user", content="\n".join(texts)))


def _result_text(content: str | list[Block] | None, at: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for k, b in enumerate(content):
        if b.type != "text":
            _unsupported(b, f"{at}.content[{k}]")
        parts.append(_need(b.text, f"{at}.content[{k}]", "text"))
    return "\n".join(parts)


def _need(value: str | None, at: str, field: str) -> str:
    if value is None:
        raise BadRequest(f"{at}.{field}: Field required", param=f"{at}.{field}", code="missing_field")
    return value


def _unsupported(b: Block, at: str) -> None:
    why = _UNSUPPORTED_BLOCKS.get(b.type, f"a {b.type!r} block is not supported in this position")
    raise BadRequest(f"{at}: {why}", param=f"{at}.type", code="unsupported_content")


def _tool_choice(req: MessagesRequest, tools: list[dict[str, Any]] | None) -> str | dict[str, Any] | None:
    tc = req.tool_choice
    if tc is None or tools is None:
        return "none" if tc is not None and tc.type == "none" else None
    if tc.type == "tool":
        if not tc.name:
            raise BadRequest("tool_choice.name: Field required for type tool", param="tool_choice.name",
                             code="missing_field")
        return {"type": "function", "function": {"name": tc.name}}
    choice = _TOOL_CHOICES.get(tc.type)
    if choice is None:
        raise BadRequest("tool_choice.type: must be auto, any, tool or none", param="tool_choice.type",
                         code="invalid_value")
    return choice


def _count_answer(count: int) -> bytes:
    return b'{"input_tokens":' + str(count).encode() + b"}"


# --- the answer ---------------------------------------------------------------------------------


def _message_id(upstream_id: str | None) -> str:
    return "msg_" + id_tail(upstream_id)


def _tool_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _input(arguments: str) -> dict[str, Any]:
    """Tool arguments (JSON text) as the object `tool_use.input` must be."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"arguments": value}


def _signature(thinking: str) -> str:
    return "llmproxy-" + hashlib.sha256(thinking.encode("utf-8")).hexdigest()[:32]


class MessagesCall(FaceCall):
    """One Messages request in flight: core events -> a `message`, or its event stream.

    Text and reasoning runs are `text` and `thinking` blocks; each tool call is a `tool_use` block.
    """

    drop_headers = CLIENT_HEADERS

    __slots__ = ("_id", "_index", "_content", "_reason", "_stop_sequence", "_pinged", "_head")

    def __init__(self, turn: Turn, *, model: str, stream: bool) -> None:
        super().__init__(turn, model=model, stream=stream)
        self._id = ""
        self._index = -1  # the current block
        self._content: list[dict[str, Any]] = []
        self._reason: str | None = None
        self._stop_sequence: str | None = None
        self._pinged = False
        self._head = b""  # the open block's delta event up to its text: one string encode per delta

    def _message(self, content: list[dict[str, Any]], reason: str | None, stop: str | None, usage: Usage | None
                 ) -> dict[str, Any]:
        u = usage or Usage(0, 0)
        return {"id": self._id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": reason, "stop_sequence": stop,
                "usage": {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens}}

    def _whole(self) -> dict[str, Any]:
        return self._message(self._content, self._reason or "end_turn", self._stop_sequence, self._usage)

    def _emit(self, kind: bytes, data: dict[str, Any]) -> None:
        if self.stream:
            self._out.append(sse.named(kind, _encode(data)))

    def _started(self, ev: Start) -> None:
        self._id = _message_id(ev.id)
        self._emit(b"message_start", {"type": "message_start", "message": self._message([], None, None, None)})

    def _opened(self, run: str) -> None:
        self._start({"type": "text", "text": ""} if run == "text" else
                    {"type": "thinking", "thinking": "", "signature": ""})
        kind = b'"text_delta","text":' if run == "text" else b'"thinking_delta","thinking":'
        self._head = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
                      + str(self._index).encode() + b',"delta":{"type":' + kind)

    def _grew(self, run: str, text: str, lp: msgspec.Raw) -> None:  # no logprobs in this API
        if self.stream:
            self._out.append(self._head + _encode(text) + b"}}\n\n")

    def _closed(self, run: str, text: str, lp: msgspec.Raw) -> None:
        block = self._content[-1]
        if run == "text":
            block["text"] = text
        else:
            block["thinking"] = text
            block["signature"] = _signature(text)
            self._emit(b"content_block_delta", {"type": "content_block_delta", "index": self._index,
                                                "delta": {"type": "signature_delta", "signature": block["signature"]}})
        self._stop()

    def _called(self, call: ToolCall) -> None:
        block = {"type": "tool_use", "id": _tool_id(call.id), "name": call.name, "input": {}}
        self._start(block)
        block["input"] = value = _input(call.arguments)
        # The object the whole answer carries, not the model's text: the two agree even when the
        # model wrote a bare value. The SDK builds `input` by parsing the concatenated deltas
        # (anthropic `lib/streaming/_messages.py`, `accumulate_event`: `json_buf += partial_json`,
        # `content.input = from_json(json_buf, partial_mode=True)`).
        partial = json.dumps(value, ensure_ascii=False)
        self._emit(b"content_block_delta", {"type": "content_block_delta", "index": self._index,
                                            "delta": {"type": "input_json_delta", "partial_json": partial}})
        self._stop()

    def _finished(self, ev: Finish) -> None:
        stop = ev.stop_sequence
        self._reason = "stop_sequence" if stop else _STOP_REASONS.get(ev.reason, "end_turn")
        self._stop_sequence = stop

    def _start(self, block: dict[str, Any]) -> None:
        self._index += 1
        self._content.append(block)
        if self.stream:
            self._emit(b"content_block_start", {"type": "content_block_start", "index": self._index,
                                                "content_block": block})
            if not self._pinged:
                self._pinged = True
                self._out.append(sse.named(b"ping", b'{"type":"ping"}'))

    def _stop(self) -> None:
        if self.stream:
            self._out.append(sse.named(b"content_block_stop", b'{"type":"content_block_stop","index":'
                                       + str(self._index).encode() + b"}"))

    def _end(self) -> None:
        """`message_delta` with the stop reason and usage, then `message_stop`."""
        u = self._usage or Usage(0, 0)
        self._emit(b"message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": self._reason or "end_turn", "stop_sequence": self._stop_sequence},
            # input_tokens too: the upstream reports usage only at the end, after message_start
            # (the SDK's accumulator takes both from here, `_messages.py` `message_delta`).
            "usage": {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens}})
        self._out.append(sse.named(b"message_stop", b'{"type":"message_stop"}'))
