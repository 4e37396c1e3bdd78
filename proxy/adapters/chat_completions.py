"""Chat -> completions: the OpenAI `chat/completions` face of the core.

`request()` validates the chat body and hands the core a `Generation`; the
`ChatCall` it returns encodes the core's events as one `chat.completion`
(whole) or `chat.completion.chunk` events (stream), for any combination of
what the client asked and what the route's `stream:` mode makes the upstream
do. The forwarder only looks at `call.stream`.

The stream path does the least per event: for plain text one JSON string
encode between pre-encoded byte fragments.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import msgspec

from .. import sse
from ..errors import BadRequest, invalid_field
from .call import AdapterBase
from .core_types import ChatCompletion, ChatRequest, OutChoice, OutFunction, OutMessage, OutToolCall, StrictChatRequest
from .core_types import Usage as ChatUsage
from .core import NULL, Core, Event, Finish, Generation, Reasoning, Start, Text, ToolCall, Turn, TurnCall, Usage, \
    id_tail

if TYPE_CHECKING:
    from ..config import RouteConfig

_decode_strict = msgspec.json.Decoder(StrictChatRequest).decode
_decode_request = msgspec.json.Decoder(ChatRequest).decode
_decode_fields = msgspec.json.Decoder(dict[str, Any]).decode
_FIELDS = frozenset(ChatRequest.__struct_fields__)
_encode = msgspec.json.Encoder().encode

# Pre-encoded pieces of a chunk event: `head` (per request and choice) + delta + tail.
_DELTA_ROLE = b'{"role":"assistant","content":'
_DELTA_CONTENT = b'{"content":'
_DELTA_ROLE_ONLY = b'{"role":"assistant"}'
_DELTA_EMPTY = b"{}"
_TAIL_OPEN = b',"logprobs":null,"finish_reason":null}]}\n\n'
# Sampling fields passed to the core as given.
_SAMPLING = ("temperature", "top_p", "n", "seed", "presence_penalty", "frequency_penalty", "logit_bias", "user",
             "top_k", "min_p", "repetition_penalty")
_REJECTED = {
    "functions": "`functions` is the deprecated form of `tools`: send `tools` instead",
    "function_call": "`function_call` is the deprecated form of `tool_choice`: send `tool_choice` instead",
    "audio": "audio output is not supported by this route (a text completions upstream)",
    "prediction": "predicted outputs are not supported by this route (a text completions upstream)",
    "web_search_options": "web search is not supported by this route (a text completions upstream)",
    "chat_template": "a chat template sent by the client is Jinja code the route's operator did not approve: the "
                     "prompt is rendered with the route's own `template:`",
    "documents": "`documents` (for retrieval templates) is not supported: the route renders its template without "
                 "documents; put them in a message",
}


class ChatToCompletions(AdapterBase):
    """The adapter of `adapter: chat-to-completions` routes (built once per route)."""

    def __init__(self, config: RouteConfig) -> None:
        self.core = Core(config)
        self.route = config.name
        self.upstream_model = config.upstream_model
        self.reasoning = self.core.reasoning

    def request(self, body: bytes) -> ChatCall:
        req, extras = _decode(body)
        _check(req)
        gen = Generation(
            messages=req.messages,
            model=req.model,
            stream=req.stream,
            tools=req.tools,
            tool_choice=req.tool_choice,
            max_tokens=req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens,
            stop=[req.stop] if isinstance(req.stop, str) else req.stop,
            sampling={k: v for k in _SAMPLING if (v := getattr(req, k)) is not None},
            response_format=req.response_format,
            template_kwargs=req.chat_template_kwargs,
            extras=extras,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            parallel_tool_calls=req.parallel_tool_calls is not False,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=bool(req.continue_final_message),
        )
        return ChatCall(
            self,
            self.core.start(gen),
            model=req.model or self.upstream_model or self.route,
            stream=req.stream,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            logprobs=bool(req.logprobs),
        )


def _decode(body: bytes) -> tuple[ChatRequest, dict[str, Any]]:
    """The request, and its top-level fields that `ChatRequest` does not define (the extras)."""
    try:
        return _decode_strict(body), {}
    except msgspec.ValidationError as exc:
        if not str(exc).startswith("Object contains unknown field"):
            raise _bad_field(exc) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    try:
        req = _decode_request(body)
    except msgspec.ValidationError as exc:
        raise _bad_field(exc) from None
    return req, {k: v for k, v in _decode_fields(body).items() if k not in _FIELDS}


def _bad_field(exc: msgspec.ValidationError) -> BadRequest:
    """msgspec says "Expected `str | array | null`, got `int` - at `$.messages[2].content`"."""
    param, reason, _ = invalid_field(exc)
    if ".content[" in param:  # a content part: name the content, say what is supported
        param = param[: param.index(".content[") + len(".content")]
        reason = f"only text content parts ({{'type': 'text', 'text': ...}}) are supported: {reason}"
    if not param:
        return BadRequest(f"the body must be a JSON object with `messages`: {reason}", code="invalid_request")
    return BadRequest(f"invalid `{param}`: {reason}", param=param, code="invalid_value")


def _check(req: ChatRequest) -> None:
    if not req.messages:
        raise BadRequest("`messages` must hold at least one message", param="messages", code="invalid_value")
    for i, m in enumerate(req.messages):
        if m.content is None and m.role != "assistant":
            raise BadRequest(f"a {m.role} message needs `content`", param=f"messages[{i}].content",
                             code="invalid_value")
    for name, why in _REJECTED.items():
        if getattr(req, name) is not None:
            raise BadRequest(why, param=name, code="unsupported_parameter")
    if req.modalities is not None and any(m != "text" for m in req.modalities):
        raise BadRequest("only the text modality is supported by this route", param="modalities",
                         code="unsupported_parameter")
    if req.n is not None and req.n < 1:
        raise BadRequest("`n` must be at least 1", param="n", code="invalid_value")


class _Out:
    """What one choice's stream has shown: the chunk head, whether `role` went out."""

    __slots__ = ("head", "role_sent")

    def __init__(self, head: bytes) -> None:
        self.head = head
        self.role_sent = False


class ChatCall(TurnCall):
    """One chat request in flight: core events -> `chat.completion` or `chat.completion.chunk` bytes."""

    translates = True
    __slots__ = ("adapter", "turn", "body", "model", "stream", "include_usage", "logprobs", "prefix", "_outs")

    def __init__(self, adapter: ChatToCompletions, turn: Turn, *, model: str, stream: bool, include_usage: bool,
                 logprobs: bool) -> None:
        self.adapter = adapter
        self.turn = turn
        self.body = turn.body
        self.model = model
        self.stream = stream  # the client gets SSE
        self.include_usage = include_usage
        self.logprobs = logprobs
        self.prefix = b""
        self._outs: dict[int, _Out] = {}

    # --- whole answers --------------------------------------------------------------------

    def response(self, body: bytes) -> bytes:
        """The upstream's whole answer (JSON, or SSE under `stream: always`) -> one `chat.completion`."""
        events = self.turn.whole(body)
        start = events[0]
        assert isinstance(start, Start)
        parts: dict[int, tuple[list[str], list[str], list[OutToolCall]]] = {}
        finish: dict[int, str] = {}
        lps: dict[int, msgspec.Raw] = {}
        usage = None
        for ev in events:
            if isinstance(ev, Usage):
                usage = ev
                continue
            if isinstance(ev, Start):
                continue
            content, thought, calls = parts.setdefault(ev.choice, ([], [], []))
            if isinstance(ev, Text):
                content.append(ev.text)
                if ev.logprobs != NULL:
                    lps[ev.choice] = ev.logprobs
            elif isinstance(ev, Reasoning):
                thought.append(ev.text)
            elif isinstance(ev, ToolCall):
                calls.append(OutToolCall(ev.id, OutFunction(ev.name, ev.arguments)))
            else:
                finish[ev.choice] = ev.reason
        choices = []
        for index, (content, thought, calls) in parts.items():
            text = "".join(content)
            message = OutMessage(text if text or not calls else None)
            if calls:
                message.tool_calls = calls
            if self.adapter.reasoning:
                message.reasoning_content = message.reasoning = "".join(thought) or None
            lp = msgspec.Raw(_chat_logprobs(lps.get(index, NULL))) if self.logprobs else None
            choices.append(OutChoice(index, message, finish.get(index), lp))
        out = ChatCompletion(_chat_id(start.id), start.created, self.model, choices)
        if usage is not None:
            out.usage = ChatUsage(usage.prompt_tokens, usage.completion_tokens,
                                  usage.prompt_tokens + usage.completion_tokens)
        return _encode(out)

    # --- streams -------------------------------------------------------------------------

    def events(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """Upstream bytes -> `chat.completion.chunk` events, then `[DONE]`."""
        return self.turn.relay(chunks, self._chunks)

    def _chunks(self, batch: list[Event], last: bool) -> bytes:
        """One upstream read's events -> chunk events (and `[DONE]` after the last). A choice's
        text and its `Finish` (and reasoning and text decided together) share one chunk."""
        out = self._encode_batch(batch)
        return out + sse.DONE_EVENT if last else out

    def _encode_batch(self, batch: list[Event]) -> bytes:
        """One read's events -> chunk bytes: one chunk per lone event, a run's chunks per run."""
        if len(batch) == 1 and type(batch[0]) is Text:  # the usual read: one text delta
            return self._text_chunk(batch[0])  # type: ignore[arg-type]
        out = []
        for item in _runs(batch):
            if type(item) is list:
                out.append(self._run_chunks(item))
            elif type(item) is Text:
                out.append(self._text_chunk(item))
            elif type(item) is Start:
                self._set_prefix(item)
            elif self.include_usage:  # Usage
                out.append(self._usage_chunk(item))
        return b"".join(out)

    def _text_chunk(self, ev: Text) -> bytes:
        """The hot path: a text delta on its own (no finish in the same read)."""
        st = self._out(ev.choice)
        lp = _chat_logprobs(ev.logprobs) if self.logprobs else b"null"
        if ev.text:
            delta = (_DELTA_CONTENT if st.role_sent else _DELTA_ROLE) + _encode(ev.text) + b"}"
        elif not st.role_sent:
            delta = _DELTA_ROLE_ONLY
        elif lp != b"null":
            delta = _DELTA_EMPTY
        else:
            return b""
        st.role_sent = True
        return st.head + delta + (_tail(lp, None) if self.logprobs else _TAIL_OPEN)

    def _run_chunks(self, run: list[Event]) -> bytes:
        """One choice's run (reasoning, text, tool calls, up to its finish) -> its chunks: a new
        delta where the kind changes back or a tool call starts, the finish reason on the last."""
        st = self._out(run[0].choice)  # type: ignore[union-attr]
        delta: dict[str, Any] = {}
        lp_raw: msgspec.Raw = NULL
        deltas: list[dict[str, Any]] = []
        reason: str | None = None
        for ev in run:
            kind = type(ev)
            if kind is Reasoning:
                if "content" in delta or "tool_calls" in delta:
                    deltas.append(delta)
                    delta = {}
                delta["reasoning_content"] = delta["reasoning"] = delta.get("reasoning", "") + ev.text
            elif kind is Text:
                if "tool_calls" in delta:
                    deltas.append(delta)
                    delta = {}
                if ev.text:
                    delta["content"] = delta.get("content", "") + ev.text
                if ev.logprobs != NULL:
                    lp_raw = ev.logprobs
            elif kind is ToolCall:
                if delta:
                    deltas.append(delta)
                # OpenAI's order: index, id and name first, then the argument fragments.
                deltas.append({"tool_calls": [{"index": ev.index, "id": ev.id, "type": "function",
                                               "function": {"name": ev.name, "arguments": ""}}]})
                delta = {"tool_calls": [{"index": ev.index, "function": {"arguments": ev.arguments}}]}
            else:  # Finish: always the run's last event
                reason = ev.reason
        if delta or not deltas:
            deltas.append(delta)
        if not st.role_sent:
            deltas[0] = {"role": "assistant", **deltas[0]}
            st.role_sent = True
        lp = _chat_logprobs(lp_raw) if self.logprobs else b"null"
        return b"".join(st.head + _encode(d) + _TAIL_OPEN for d in deltas[:-1]) + st.head + _encode(deltas[-1]) \
            + _tail(lp, reason)

    def _out(self, choice: int) -> _Out:
        st = self._outs.get(choice)
        if st is None:
            st = self._outs[choice] = _Out(self.prefix + str(choice).encode() + b',"delta":')
        return st

    def _usage_chunk(self, usage: Usage) -> bytes:
        doc = ChatUsage(usage.prompt_tokens, usage.completion_tokens, usage.prompt_tokens + usage.completion_tokens)
        return self.prefix[: self.prefix.index(b'"choices":')] + b'"choices":[],"usage":' + _encode(doc) + b"}\n\n"

    def _set_prefix(self, start: Start) -> None:
        self.prefix = (b'data: {"id":' + _encode(_chat_id(start.id)) + b',"object":"chat.completion.chunk","created":'
                       + str(start.created).encode() + b',"model":' + _encode(self.model)
                       + b',"choices":[{"index":')


def _runs(batch: list[Event]) -> Iterator[Event | list[Event]]:
    """Split one read's events into what becomes chunks: a lone event (Start, Usage, or a text
    delta not followed by a Finish: the hot path), or, as a list, a run of one choice's events
    that share chunks: from a reasoning, text or tool-call event up to its Finish, a change of
    choice or a Usage."""
    i, n = 0, len(batch)
    while i < n:
        ev = batch[i]
        i += 1
        kind = type(ev)
        if kind is Start or kind is Usage or (kind is Text and (i == n or type(batch[i]) is not Finish)):
            yield ev
            continue
        run = [ev]
        choice = ev.choice  # type: ignore[union-attr]
        while kind is not Finish and i < n and getattr(batch[i], "choice", None) == choice and type(batch[i]) is not Usage:
            ev = batch[i]
            kind = type(ev)
            i += 1
            run.append(ev)
        yield run


def _tail(lp: bytes, finish: str | None) -> bytes:
    return b',"logprobs":' + lp + b',"finish_reason":' + (_encode(finish) if finish else b"null") + b"}]}\n\n"


def _chat_id(upstream_id: str | None) -> str:
    return "chatcmpl-" + id_tail(upstream_id)


def _chat_logprobs(items: msgspec.Raw) -> bytes:
    """The core's logprob items (already chat's) -> chat's `{"content": [...]}`, or `null`."""
    return b"null" if items == NULL else b'{"content":' + items + b"}"
