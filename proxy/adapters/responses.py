"""The OpenAI Responses face: `POST /v1/responses` over a legacy completions upstream.

`previous_response_id` continues a stored response: the gateway loads it from the
state store (proxy/state.py) and `continued()` puts its items before the new input,
as the OpenAI API does (its `instructions` are not carried over). A finished answer
is kept (`ResponsesCall.kept`) unless the request said `store: false`.

`request()` turns the Responses body into the core's `Generation` (input items
in chat form: `instructions` and `developer`/`system` messages -> system,
`function_call` -> assistant `tool_calls`, `function_call_output` -> `role:
tool`, `reasoning` -> the next assistant turn's `reasoning_content`). Custom
(free-text) tools, such as Codex's `apply_patch` in its freeform form, are
offered to the model as functions of one string argument `input` and come back
as `custom_tool_call` items.
`ResponsesCall` encodes the core's events as one `response` object or as the
Responses event stream.

The stream grammar is the one the `openai` SDK's `ResponseStreamState`
enforces (`openai/lib/streaming/responses/_responses.py`: `response.created`
first, an item's `output_item.added` before its content events, the same item
id on `added` and `done`, `response.completed` for `get_final_response()`),
and what Codex reads (openai/codex `codex-rs/codex-api/src/sse/responses.rs`:
`output_item.done` items, `output_text.delta`, `reasoning_text.delta`, and a
`response.completed` before the stream closes, else "stream closed before
response.completed"). Every event carries a rising `sequence_number`.
A message item: `output_item.added` -> `content_part.added` ->
`output_text.delta`* -> `output_text.done` -> `content_part.done` ->
`output_item.done`; a function call: `output_item.added` ->
`function_call_arguments.delta` -> `.done` -> `output_item.done`; reasoning
(`reasoning: think` routes): like a message, with a `reasoning_text` part and
`reasoning_text.delta`/`.done`. An answer cut by `max_output_tokens` ends with
`response.incomplete` (`incomplete_details.reason: "max_output_tokens"`); a
failure after the stream began with an `error` event and `response.failed`.
"""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any

import msgspec

from .. import sse
from ..errors import BadRequest, ProxyError, ResponseNotFound, bad_body
from .call import AdapterBase
from .core_types import FunctionCall, Message, ToolCall as ChatToolCall
from .core import Core, Finish, Generation, Start, ToolCall, Turn
from .logprobs import NULL
from .agent_base import FaceCall, TokenCounter, json_schema_format, left_out
from .responses_types import Part, ResponsesRequest

if TYPE_CHECKING:
    from ..config import RouteConfig

_decode = msgspec.json.Decoder(ResponsesRequest).decode
_encode = msgspec.json.Encoder().encode

_EMPTY = msgspec.Raw(b"[]")
_TEXT_PARTS = frozenset({"input_text", "output_text", "text", "summary_text", "reasoning_text"})
_THINKING_OFF = frozenset({"none", "minimal"})
_STATEFUL = {
    "conversation": "this route is stateless and keeps no conversations: send the whole conversation in `input`",
    "prompt": "stored prompt templates are not available on this route: send `instructions` and `input`",
}


class ResponsesToCompletions(AdapterBase):
    """The adapter of `adapter: responses-to-completions` routes (built once per route)."""

    face = "openai"  # Responses errors are OpenAI-shaped; mid-stream ones are `ResponsesCall.stream_error`

    def __init__(self, config: RouteConfig) -> None:
        self.core = Core(config)
        self.route = config.name
        self.hosted_tools = config.hosted_tools
        self.model = config.upstream_model or config.name
        counter = TokenCounter(self.core, self.face, lambda b: self.generation(b)[0], _count_answer)
        counter.previous, counter.continued = self.previous, self.continued  # type: ignore[method-assign]
        self.subpaths = {"/input_tokens": counter}

    @staticmethod
    def previous(body: bytes) -> str | None:
        """The `previous_response_id` the body continues, if any (the gateway loads it)."""
        if b'"previous_response_id"' not in body:
            return None
        try:
            rid = _decode_previous(body).previous_response_id
        except msgspec.DecodeError as exc:
            raise bad_body(exc) from None
        return rid or None

    @staticmethod
    def continued(body: bytes, rid: str, stored: bytes | None, owner: str) -> bytes:
        """The body with the stored conversation's items before its own input. A response another
        key made is as unknown as one never made (OpenAI's 404, which names only the id)."""
        record = msgspec.json.decode(stored) if stored is not None else None
        if not isinstance(record, dict) or record.get("owner") != owner:
            raise ResponseNotFound(f"Previous response with id '{rid}' not found.", param="previous_response_id")
        doc = msgspec.json.decode(body)
        new = doc.get("input")
        if isinstance(new, str):
            new = [{"type": "message", "role": "user", "content": new}]
        doc["input"] = [*record["items"], *(new or [])]
        return _encode(doc)

    def request(self, body: bytes) -> ResponsesCall:
        gen, req, tools = self.generation(body)
        custom = frozenset(t["name"] for t in tools if t.get("type") == "custom")
        return ResponsesCall(self.core.start(gen), req, tools, custom, model=gen.model or self.model,
                             logprobs=gen.logprobs is not None)

    def generation(self, body: bytes) -> tuple[Generation, ResponsesRequest, list[dict[str, Any]]]:
        """A Responses body -> the core's `Generation` (and what the answer echoes)."""
        try:
            req = _decode(body)
        except msgspec.DecodeError as exc:
            raise bad_body(exc) from None
        for name, why in _STATEFUL.items():
            if getattr(req, name) is not None:
                raise BadRequest(why, param=name, code="unsupported_parameter")
        if req.background:
            raise BadRequest("background responses need stored state, which this route does not keep",
                             param="background", code="unsupported_parameter")
        if req.input is None or req.input == []:
            raise BadRequest("input: required (a string or a list of items)", param="input", code="missing_field")
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 20:
            raise BadRequest("top_logprobs: must be between 0 and 20", param="top_logprobs", code="invalid_value")
        tools, echoed = self._tools(req)
        gen = Generation(messages=_history(req), model=req.model, stream=req.stream, tools=tools,
                         tool_choice=_tool_choice(req.tool_choice), max_tokens=req.max_output_tokens,
                         sampling={k: v for k in ("temperature", "top_p") if (v := getattr(req, k)) is not None},
                         parallel_tool_calls=req.parallel_tool_calls is not False, logprobs=_logprobs(req))
        fmt = req.text.format if req.text else None
        if fmt is not None and fmt.type != "text":
            if fmt.type == "json_object":
                gen.response_format = {"type": "json_object"}
            elif fmt.type == "json_schema" and isinstance(fmt.schema, dict):
                gen.response_format = json_schema_format(fmt.schema, fmt.name, fmt.strict)
            else:
                raise BadRequest("text.format: must be text, json_object or json_schema with a `schema`",
                                 param="text.format", code="invalid_value")
        effort = req.reasoning.effort if req.reasoning else None
        if effort is not None:
            gen.template_kwargs = {"enable_thinking": effort not in _THINKING_OFF}
        return gen, req, echoed

    def _tools(self, req: ResponsesRequest) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]]]:
        """Function tools in the core's chat form, and as the response echoes them."""
        tools, echoed, hosted = [], [], []
        for i, t in enumerate(req.tools or ()):
            kind = t.get("type")
            if kind not in ("function", "custom"):
                hosted.append(str(kind))
                continue
            name = t.get("name")
            if not isinstance(name, str) or not name:
                raise BadRequest(f"tools[{i}].name: required for a {kind} tool", param=f"tools[{i}].name",
                                 code="missing_field")
            fn = {"name": name}
            if kind == "custom":
                fn["description"] = _custom_description(t)
                fn["parameters"] = _CUSTOM_PARAMETERS
            else:
                if t.get("description") is not None:
                    fn["description"] = t["description"]
                fn["parameters"] = t.get("parameters") or {"type": "object", "properties": {}}
            tools.append({"type": "function", "function": fn})
            echoed.append(t)
        left_out(self.route, self.hosted_tools, hosted, "tools", "; send only function and custom tools")
        return tools or None, echoed


# A custom tool takes free text: the model sees a function of one string.
_CUSTOM_PARAMETERS = {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}


def _custom_description(tool: dict[str, Any]) -> str:
    """A custom tool's description, with its input grammar when it has one (the model must follow it)."""
    text = str(tool.get("description") or "")
    fmt = tool.get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "grammar" and fmt.get("definition"):
        text += f"\n\nThe `input` string must follow this {fmt.get('syntax', '')} grammar:\n{fmt['definition']}"
    return text.strip()


def _history(req: ResponsesRequest) -> list[Message]:
    out: list[Message] = []
    if req.instructions:
        out.append(Message(role="system", content=req.instructions))
    if isinstance(req.input, str):
        out.append(Message(role="user", content=req.input))
        return out
    thought: list[str] = []  # a reasoning item's text, for the assistant turn after it
    for i, item in enumerate(req.input or ()):
        at = f"input[{i}]"
        kind = item.type
        if kind == "message":
            role = {"developer": "system"}.get(item.role or "", item.role)
            if role not in ("user", "assistant", "system"):
                raise BadRequest(f"{at}.role: must be user, assistant, system or developer", param=f"{at}.role",
                                 code="invalid_value")
            text = _text(item.content, f"{at}.content")
            if role == "assistant":
                last = _assistant(out, thought)
                last.content = (_text_of(last.content) + text) or None
            else:
                out.append(Message(role=role, content=text))
        elif kind in ("function_call", "custom_tool_call"):
            if not item.name or item.call_id is None:
                raise BadRequest(f"{at}: a {kind} needs `name` and `call_id`", param=at, code="missing_field")
            last = _assistant(out, thought)
            args = (item.arguments or "{}") if kind == "function_call" else {"input": item.input or ""}
            call = ChatToolCall(FunctionCall(item.name, args), id=item.call_id)
            last.tool_calls = (last.tool_calls or []) + [call]
        elif kind in ("function_call_output", "custom_tool_call_output"):
            if item.call_id is None:
                raise BadRequest(f"{at}.call_id: required", param=f"{at}.call_id", code="missing_field")
            out.append(Message(role="tool", content=_text(item.output, f"{at}.output"), tool_call_id=item.call_id))
        elif kind == "reasoning":
            parts = item.content or item.summary or []
            thought.append("\n".join(p.text or "" for p in parts))
        elif kind == "item_reference":
            raise BadRequest(f"{at}: item references need stored items, which this stateless route does not keep; "
                             "send the items themselves", param=f"{at}.type", code="unsupported_parameter")
        else:
            raise BadRequest(f"{at}: input items of type {kind!r} are not supported by this route (it serves "
                             "message, function_call, function_call_output and reasoning)", param=f"{at}.type",
                             code="unsupported_parameter")
    if not any(m.role != "system" for m in out):
        raise BadRequest("input: holds no message to answer", param="input", code="invalid_value")
    return out


def _assistant(out: list[Message], thought: list[str]) -> Message:
    """The assistant turn an output item belongs to: the one just before it, unless a tool answer or
    another role came between (then a new one). A pending reasoning item's text goes with it."""
    last = out[-1] if out else None
    if last is None or last.role != "assistant" or (thought and last.reasoning_content is not None):
        last = Message(role="assistant", content=None)
        out.append(last)
    if thought:
        last.reasoning_content = "\n".join(thought)
        thought.clear()
    return last


def _text_of(content: Any) -> str:
    return content if isinstance(content, str) else ""


def _text(content: str | list[Part] | None, at: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for k, p in enumerate(content):
        if p.type == "refusal" and p.refusal is not None:
            parts.append(p.refusal)
        elif p.type in _TEXT_PARTS and p.text is not None:
            parts.append(p.text)
        else:
            if p.type in _TEXT_PARTS:
                raise BadRequest(f"{at}[{k}]: a {p.type} part needs `text`", param=f"{at}[{k}].text",
                                 code="missing_field")
            raise BadRequest(f"{at}[{k}]: {p.type} parts are not supported by this route (a text completions "
                             "upstream); send input_text", param=f"{at}[{k}].type", code="unsupported_content")
    return "\n".join(parts)  # several parts: one per line, as vLLM joins chat text parts


def _logprobs(req: ResponsesRequest) -> int | None:
    """The top-N the request asks for, or None. `include: ["message.output_text.logprobs"]` asks, as
    vLLM reads it (`ResponsesRequest.is_include_output_logprobs`, vllm/entrypoints/openai/responses/
    protocol.py); a `top_logprobs` above 0 asks too, rather than being answered with empty lists."""
    if "message.output_text.logprobs" in (req.include or ()) or req.top_logprobs:
        return req.top_logprobs or 0
    return None


def _tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") in ("function", "custom") and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise BadRequest("tool_choice: must be none, auto, required or {'type': 'function' | 'custom', 'name': ...} "
                     "on this route",
                     param="tool_choice", code="invalid_value")


def _count_answer(count: int) -> bytes:
    return b'{"object":"response.input_tokens","input_tokens":' + str(count).encode() + b"}"


# --- the answer ---------------------------------------------------------------------------------


class _Previous(msgspec.Struct):
    previous_response_id: str | None = None


_decode_previous = msgspec.json.Decoder(_Previous).decode


def _input_items(given: str | list[Any] | None) -> list[Any]:
    """The request's input as items, for the stored conversation (fields left unset are left out)."""
    if isinstance(given, str):
        return [{"type": "message", "role": "user", "content": given}]
    return [_lean(msgspec.to_builtins(item)) for item in given or ()]


def _lean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _lean(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_lean(v) for v in value]
    return value


def _rid(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


class ResponsesCall(FaceCall):
    """One Responses request in flight: core events -> a `response`, or its event stream.

    Text runs are `message` items, reasoning runs `reasoning` items, each tool call a `function_call` item.
    """

    __slots__ = ("req", "tools", "custom", "_id", "_created", "_seq", "_items", "_incomplete", "_begun", "_head",
                 "_lp_head", "_done")

    def __init__(self, turn: Turn, req: ResponsesRequest, tools: list[dict[str, Any]], custom: frozenset[str], *,
                 model: str, logprobs: bool = False) -> None:
        super().__init__(turn, model=model, stream=req.stream, logprobs=logprobs)
        self.req = req
        self.tools = tools  # the function and custom tools, echoed in the response
        self.custom = custom  # the names of the custom (free-text) tools
        self._id = ""
        self._created = 0
        self._seq = 0
        self._items: list[dict[str, Any]] = []
        self._incomplete = False
        self._begun = False
        self._head = b""  # the open item's delta event up to its text: one string encode per delta
        self._lp_head = b""  # the open text item's delta event up to its logprobs
        self._done = False  # the whole answer was made: it can be kept

    def kept(self, owner: str) -> tuple[str, bytes] | None:
        """(id, record) to store once the answer is complete and the request did not say `store: false`;
        the record holds the conversation so far (input and output items) and the key that made it."""
        if not self._done or self.req.store is False:
            return None
        return self._id, _encode({"owner": owner, "items": _input_items(self.req.input) + self._items})

    def stream_error(self, exc: ProxyError) -> bytes:
        """A failure after the stream began: an `error` event, then `response.failed` (which Codex reads)."""
        self._out.clear()
        if not self._begun:
            self._started(Start(None, int(time.time())))
        code = "server_error" if exc.status >= 500 else str(exc.code or exc.type)
        self._emit("error", {"code": code, "message": exc.message, "param": exc.param})
        failed = self._response("failed")
        failed["error"] = {"code": code, "message": exc.message}
        self._emit("response.failed", {"response": failed})
        return b"".join(self._out)

    def _emit(self, kind: str, fields: dict[str, Any]) -> None:
        if self.stream:
            fields["type"] = kind
            fields["sequence_number"] = self._seq
            self._seq += 1
            self._out.append(sse.named(kind.encode(), _encode(fields)))

    def _status(self) -> str:
        return "incomplete" if self._incomplete else "completed"

    def _whole(self) -> dict[str, Any]:
        self._done = True
        return self._response(self._status())

    def _end(self) -> None:
        self._done = True
        status = self._status()
        self._emit("response." + status, {"response": self._response(status)})

    def _response(self, status: str) -> dict[str, Any]:
        req = self.req
        u = self._usage
        fmt = req.text.format if req.text and req.text.format else None
        return {
            "id": self._id, "object": "response", "created_at": self._created, "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": self.model,
            "output": list(self._items) if status != "in_progress" else [],
            "parallel_tool_calls": req.parallel_tool_calls if req.parallel_tool_calls is not None else True,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": req.reasoning.effort if req.reasoning else None, "summary": None},
            "store": req.store is not False, "temperature": req.temperature, "top_p": req.top_p,
            "text": {"format": msgspec.to_builtins(fmt) if fmt else {"type": "text"}},
            "tool_choice": req.tool_choice if req.tool_choice is not None else "auto", "tools": self.tools,
            "truncation": "disabled", "metadata": req.metadata or {},
            "usage": None if u is None else {
                "input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u.prompt_tokens + u.completion_tokens},
        }

    def _started(self, ev: Start) -> None:
        self._begun = True
        self._id = _rid("resp_")  # never the upstream's id: it names a stored response, so it must be unique
        self._created = ev.created
        self._emit("response.created", {"response": self._response("in_progress")})
        self._emit("response.in_progress", {"response": self._response("in_progress")})

    def _item(self, item: dict[str, Any]) -> int:
        self._items.append(item)
        index = len(self._items) - 1
        self._emit("response.output_item.added", {"output_index": index, "item": dict(item)})
        return index

    def _opened(self, run: str) -> None:
        if run == "text":
            item = {"id": _rid("msg_"), "type": "message", "status": "in_progress", "role": "assistant",
                    "content": []}
            part: dict[str, Any] = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        else:
            item = {"id": _rid("rs_"), "type": "reasoning", "status": "in_progress", "summary": [], "content": []}
            part = {"type": "reasoning_text", "text": ""}
        index = self._item(item)
        self._emit("response.content_part.added", {"item_id": item["id"], "output_index": index,
                                                   "content_index": 0, "part": part})
        kind = b"response.output_text.delta" if run == "text" else b"response.reasoning_text.delta"
        self._lp_head = (b"event: " + kind + b'\ndata: {"type":"' + kind + b'","item_id":' + _encode(item["id"])
                         + b',"output_index":' + str(index).encode() + b',"content_index":0'
                         + (b',"logprobs":' if run == "text" else b""))
        self._head = self._lp_head + (b'[],"delta":' if run == "text" else b',"delta":')

    def _grew(self, run: str, text: str, lp: msgspec.Raw) -> None:
        if self.stream:
            head = self._head if lp == NULL else self._lp_head + lp + b',"delta":'
            self._out.append(head + _encode(text) + b',"sequence_number":' + str(self._seq).encode() + b"}\n\n")
            self._seq += 1

    def _closed(self, run: str, text: str, lp: msgspec.Raw) -> None:
        index = len(self._items) - 1
        item = self._items[index]
        ids = {"item_id": item["id"], "output_index": index, "content_index": 0}
        if run == "text":
            lps = _EMPTY if lp == NULL else lp
            part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": [], "logprobs": lps}
            self._emit("response.output_text.done", {**ids, "text": text, "logprobs": lps})
        else:
            part = {"type": "reasoning_text", "text": text}
            self._emit("response.reasoning_text.done", {**ids, "text": text})
        self._emit("response.content_part.done", {**ids, "part": part})
        item["content"] = [part]
        item["status"] = self._status()
        self._emit("response.output_item.done", {"output_index": index, "item": item})

    def _called(self, call: ToolCall) -> None:
        if call.name in self.custom:
            self._custom(call)
            return
        item = {"id": "fc_" + call.id.removeprefix("call_"), "type": "function_call", "status": "in_progress",
                "call_id": call.id, "name": call.name, "arguments": ""}
        index = self._item(item)
        ids = {"item_id": item["id"], "output_index": index}
        self._emit("response.function_call_arguments.delta", {**ids, "delta": call.arguments})
        self._emit("response.function_call_arguments.done", {**ids, "name": call.name, "arguments": call.arguments})
        item["arguments"] = call.arguments
        item["status"] = "completed"
        self._emit("response.output_item.done", {"output_index": index, "item": item})

    def _custom(self, call: ToolCall) -> None:
        """A call of a custom tool: its `input` argument is the free text the client gets."""
        try:
            args = json.loads(call.arguments)
        except ValueError:
            args = None
        text = args.get("input") if isinstance(args, dict) else None
        text = text if isinstance(text, str) else call.arguments
        item = {"id": "ctc_" + call.id.removeprefix("call_"), "type": "custom_tool_call", "status": "in_progress",
                "call_id": call.id, "name": call.name, "input": ""}
        index = self._item(item)
        ids = {"item_id": item["id"], "output_index": index}
        self._emit("response.custom_tool_call_input.delta", {**ids, "delta": text})
        self._emit("response.custom_tool_call_input.done", {**ids, "input": text})
        item["input"] = text
        item["status"] = "completed"
        self._emit("response.output_item.done", {"output_index": index, "item": item})

    def _finished(self, ev: Finish) -> None:
        self._incomplete = ev.reason == "length"
