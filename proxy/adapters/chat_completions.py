"""Chat -> completions: OpenAI `chat/completions` in front of a legacy `completions` upstream.

`request()` validates the chat body, renders the prompt with the route's
template and returns a `ChatCall`, which turns the upstream's answer into
`chat.completion` (whole) or `chat.completion.chunk` events (stream), for any
combination of what the client asked and what the route's `stream:` mode
makes the upstream do. The forwarder only looks at `call.stream`.

The stream path does the least per event: one typed decode, and for plain
text (no tools, no reasoning) one JSON string encode between pre-encoded
byte fragments.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import msgspec

from .. import sse
from ..errors import BadRequest, UpstreamBroken, invalid_field
from . import reasoning as think
from .chat_types import (
    ChatCompletion,
    ChatRequest,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    OutChoice,
    OutFunction,
    OutMessage,
    OutToolCall,
    UpstreamStreamOptions,
    Usage,
)
from .tags import StopFilter
from .templates import load_template
from .toolcalls import ParsedCall, ToolCallSplitter

if TYPE_CHECKING:
    from ..config import RouteConfig

_decode_request = msgspec.json.Decoder(ChatRequest).decode
_decode_completion = msgspec.json.Decoder(Completion).decode
_decode_logprobs = msgspec.json.Decoder(CompletionLogprobs | None).decode
_encode = msgspec.json.Encoder().encode

# Pre-encoded pieces of a chunk event: `head` (per request and choice) + delta + tail.
_DELTA_ROLE = b'{"role":"assistant","content":'
_DELTA_CONTENT = b'{"content":'
_DELTA_ROLE_ONLY = b'{"role":"assistant"}'
_DELTA_EMPTY = b"{}"
_TAIL_OPEN = b',"logprobs":null,"finish_reason":null}]}\n\n'
_NULL = msgspec.Raw(b"null")
_REJECTED = {
    "functions": "`functions` is the deprecated form of `tools`: send `tools` instead",
    "function_call": "`function_call` is the deprecated form of `tool_choice`: send `tool_choice` instead",
    "audio": "audio output is not supported by this route (a text completions upstream)",
    "prediction": "predicted outputs are not supported by this route (a text completions upstream)",
    "web_search_options": "web search is not supported by this route (a text completions upstream)",
}


class ChatToCompletions:
    """The adapter of `adapter: chat-to-completions` routes (built once per route)."""

    def __init__(self, config: RouteConfig) -> None:
        self.route = config.name
        self.mode = config.stream
        self.upstream_model = config.upstream_model
        self.template = load_template(config.template, config.source)
        self.stops = list(self.template.stops)
        self.reasoning = config.reasoning == "think"

    def request(self, body: bytes) -> ChatCall:
        try:
            req = _decode_request(body)
        except msgspec.ValidationError as exc:
            raise _bad_field(exc) from None
        except msgspec.DecodeError as exc:
            raise BadRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from None
        _check(req)
        tools, parse_tools = _tools(req)
        prompt = self.template.render(req.messages, tools)
        upstream_stream = req.stream if self.mode == "auto" else self.mode == "always"
        stop = self.stops
        if req.stop:
            mine = [req.stop] if isinstance(req.stop, str) else req.stop
            stop = mine + [s for s in stop if s not in mine]
        out = CompletionRequest(
            prompt=prompt,
            model=self.upstream_model or req.model,
            stream=upstream_stream,
            # Usage is asked for on every stream (metrics need it); the client sees it only if it asked.
            stream_options=UpstreamStreamOptions() if upstream_stream else None,
            max_tokens=req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            n=req.n,
            stop=stop or None,
            seed=req.seed,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias=req.logit_bias,
            user=req.user,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            top_k=req.top_k,
            min_p=req.min_p,
            repetition_penalty=req.repetition_penalty,
        )
        return ChatCall(
            self,
            _encode(out),
            model=req.model or self.upstream_model or self.route,
            stream=req.stream,
            upstream_stream=upstream_stream,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            tools=parse_tools,
            prefilled=self.reasoning and think.prefills_think(prompt),
            logprobs=bool(req.logprobs),
        )


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
    if req.response_format is not None and req.response_format.get("type", "text") != "text":
        raise BadRequest("only response_format {'type': 'text'} is supported by this route "
                         "(a text completions upstream cannot be held to a JSON schema)",
                         param="response_format", code="unsupported_parameter")
    if req.modalities is not None and any(m != "text" for m in req.modalities):
        raise BadRequest("only the text modality is supported by this route", param="modalities",
                         code="unsupported_parameter")
    if req.n is not None and req.n < 1:
        raise BadRequest("`n` must be at least 1", param="n", code="invalid_value")


def _tools(req: ChatRequest) -> tuple[list[dict[str, Any]] | None, bool]:
    """The tools to render, and whether the answer is parsed for tool calls.

    `tool_choice` over a plain completions upstream can only steer the prompt:
    `none` lists no tools, a named function lists only that one, `auto` and
    `required` list them all.
    """
    tools = req.tools or None
    for i, tool in enumerate(tools or ()):
        fn = tool.get("function")
        if tool.get("type", "function") != "function":
            raise BadRequest("only function tools are supported", param=f"tools[{i}].type", code="invalid_value")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRequest("a tool needs `function.name`", param=f"tools[{i}].function.name", code="invalid_value")
    choice = req.tool_choice
    if choice is None:
        return tools, tools is not None
    if isinstance(choice, str):
        if choice == "none":
            return None, False
        if choice not in ("auto", "required"):
            raise BadRequest("`tool_choice` must be none, auto, required or a named function",
                             param="tool_choice", code="invalid_value")
        if tools is None and choice == "required":
            raise BadRequest("`tool_choice: required` needs `tools`", param="tool_choice", code="invalid_value")
        return tools, tools is not None
    fn = choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    named = [t for t in tools or () if t["function"]["name"] == name]
    if not named:
        raise BadRequest(f"`tool_choice` names function {name!r}, which is not among `tools`",
                         param="tool_choice", code="invalid_value")
    return named, True


class _Choice:
    """One choice of one answer, as its text streams in."""

    __slots__ = ("index", "head", "stop", "think", "tools", "role_sent", "calls", "finished")

    def __init__(self, call: ChatCall, index: int) -> None:
        self.index = index
        self.head = call.prefix + str(index).encode() + b',"delta":'
        self.stop = StopFilter(call.adapter.stops)
        self.think = think.ThinkSplitter(call.prefilled) if call.adapter.reasoning else None
        self.tools = ToolCallSplitter() if call.parse_tools else None
        self.role_sent = False
        self.calls = 0
        self.finished = False

    def split(self, text: str, end: bool) -> tuple[str, str, list[ParsedCall]]:
        """New text -> (reasoning, content, calls) now decided; `end` flushes what was held."""
        text = self.stop.feed(text)
        if end:
            text += self.stop.finish()
        reasoning = ""
        if self.think is not None:
            reasoning, text = self.think.feed(text)
            if end:
                r2, c2 = self.think.finish()
                reasoning, text = reasoning + r2, text + c2
        calls: list[ParsedCall] = []
        if self.tools is not None:
            items = self.tools.feed(text)
            if end:
                items += self.tools.finish()
            parts = []
            for item in items:
                if isinstance(item, str):
                    parts.append(item)
                else:
                    calls.append(item)
            text = "".join(parts)
        return reasoning, text, calls


class _Tally:
    """What a stream has shown so far: events, the last usage, whether `[DONE]` came."""

    __slots__ = ("events", "usage", "done")

    def __init__(self) -> None:
        self.events = 0
        self.usage: Usage | None = None
        self.done = False


class ChatCall:
    """One chat request in flight: the upstream body and how to translate the answer."""

    translates = True
    __slots__ = ("adapter", "body", "model", "stream", "upstream_stream", "include_usage", "parse_tools",
                 "prefilled", "logprobs", "usage", "prefix")

    def __init__(self, adapter: ChatToCompletions, body: bytes, *, model: str, stream: bool, upstream_stream: bool,
                 include_usage: bool, tools: bool, prefilled: bool, logprobs: bool) -> None:
        self.adapter = adapter
        self.body = body
        self.model = model
        self.stream = stream  # the client gets SSE
        self.upstream_stream = upstream_stream
        self.include_usage = include_usage
        self.parse_tools = tools
        self.prefilled = prefilled
        self.logprobs = logprobs
        self.usage: tuple[int, int] | None = None  # (prompt_tokens, completion_tokens), for metrics
        self.prefix = b""

    # --- whole answers --------------------------------------------------------------------

    def response(self, body: bytes) -> bytes:
        """The upstream's whole answer (JSON, or SSE under `stream: always`) -> one `chat.completion`."""
        return _encode(self._chat_completion(self._whole(body)))

    def _whole(self, body: bytes) -> Completion:
        """A whole upstream answer, told by its first byte: a JSON completion, or an SSE stream to join."""
        if body.lstrip()[:1] != b"{":
            return self._aggregate(body)
        doc = self._decode(body, "completion")
        if doc.choices is None:
            raise UpstreamBroken(f"upstream of route {self.adapter.route!r} sent a completion without "
                                 f"`choices`: {_excerpt(body)}")
        return doc

    def _chat_completion(self, doc: Completion) -> ChatCompletion:
        choices = []
        reasoning_on = self.adapter.reasoning
        for c in sorted(doc.choices or (), key=lambda c: c.index):
            state = _Choice(self, c.index)
            reasoning, content, calls = state.split(c.text, True)
            tool_calls = [OutToolCall(_call_id(), OutFunction(p.name, p.arguments)) for p in calls]
            message = OutMessage(content if content or not tool_calls else None)
            if tool_calls:
                message.tool_calls = tool_calls
            if reasoning_on:
                message.reasoning_content = message.reasoning = reasoning or None
            lp = _chat_logprobs(c.logprobs) if self.logprobs else None
            choices.append(OutChoice(c.index, message, _finish(c.finish_reason, bool(calls)), lp))
        if doc.usage is not None:
            self.usage = (doc.usage.prompt_tokens, doc.usage.completion_tokens)
        out = ChatCompletion(_chat_id(doc.id), doc.created or int(time.time()), self.model, choices)
        if doc.usage is not None:
            out.usage = doc.usage
        return out

    def _aggregate(self, body: bytes) -> Completion:
        """SSE events -> one completion: texts joined, last finish_reason, usage."""
        dec = sse.SSEDecoder()
        texts: dict[int, list[str]] = {}
        finish: dict[int, str | None] = {}
        lps: dict[int, list[Any]] = {}
        first: Completion | None = None
        usage = None
        events = dec.feed(body) + dec.close()
        if not events:
            raise UpstreamBroken(f"upstream of route {self.adapter.route!r} sent neither a completion nor "
                                 f"stream events: {_excerpt(body)}")
        for data in events:
            if data == sse.DONE:
                break
            ev = self._event(data)
            first = first or ev
            usage = ev.usage or usage
            for c in ev.choices or ():
                texts.setdefault(c.index, []).append(c.text)
                if c.finish_reason is not None:
                    finish[c.index] = c.finish_reason
                if self.logprobs:
                    lps.setdefault(c.index, []).append(c.logprobs)
        choices = [CompletionChoice("".join(t), i, finish.get(i)) for i, t in texts.items()]
        if self.logprobs:
            for c in choices:
                c.logprobs = msgspec.Raw(_merge_logprobs(lps.get(c.index, [])))
        return Completion(choices, first.id if first else None, first.created if first else None, usage)

    # --- streams -------------------------------------------------------------------------

    async def events(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """Upstream bytes -> `chat.completion.chunk` events, then `[DONE]`.

        Every event is translated as soon as it is complete; the events of one upstream
        read go out in one write (as passthrough relays a read), never held for a later one.
        """
        if not self.upstream_stream:
            yield self._synthesize(self._whole(b"".join([c async for c in chunks])))
            return
        states: dict[int, _Choice] = {}
        tally = _Tally()
        decoder = sse.SSEDecoder()
        async for chunk in chunks:
            out, failure = self._translate(decoder.feed(chunk), states, tally)
            if out:
                yield out
            if failure is not None:
                raise failure
            if tally.done:
                break
        if not tally.done:
            out, failure = self._translate(decoder.close(), states, tally)
            if out:
                yield out
            if failure is not None:
                raise failure
        if not (tally.events or tally.done):
            raise UpstreamBroken(f"upstream of route {self.adapter.route!r} ended the stream without any event")
        yield self._end(states, tally.usage)

    def _translate(self, datas: list[bytes], states: dict[int, _Choice], tally: _Tally) -> tuple[bytes, Exception | None]:
        """The client bytes for some complete upstream events, and the failure that stopped
        them if one did (the events before it still reach the client)."""
        out = b""
        for data in datas:
            if data == sse.DONE:
                tally.done = True
                break
            try:
                translated, usage = self._on_event(data, states)
            except Exception as exc:
                return out, exc
            tally.events += 1
            tally.usage = usage or tally.usage
            out += translated
        return out, None

    def _on_event(self, data: bytes, states: dict[int, _Choice]) -> tuple[bytes, Usage | None]:
        ev = self._event(data)
        if not self.prefix:
            self._set_prefix(ev)
        out = b""
        for c in ev.choices or ():
            state = states.get(c.index)
            if state is None:
                state = states[c.index] = _Choice(self, c.index)
            out += self._delta(state, c.text, c.finish_reason, c.logprobs)
        return out, ev.usage

    def _delta(self, st: _Choice, text: str, finish: str | None, lp: msgspec.Raw) -> bytes:
        """The chunk(s) for one choice's new text. Empty when nothing is decided yet."""
        end = finish is not None
        st.finished = end
        lp_bytes = _encode(_chat_logprobs(lp)) if self.logprobs else b"null"
        if st.think is None and st.tools is None:  # plain text: the fast path
            text = st.stop.feed(text)
            if end:
                text += st.stop.finish()
            if text:
                delta = (_DELTA_CONTENT if st.role_sent else _DELTA_ROLE) + _encode(text) + b"}"
            elif not st.role_sent:
                delta = _DELTA_ROLE_ONLY
            elif end or lp_bytes != b"null":
                delta = _DELTA_EMPTY
            else:
                return b""
            st.role_sent = True
            return st.head + delta + (_tail(lp_bytes, finish) if end or self.logprobs else _TAIL_OPEN)
        reasoning, content, calls = st.split(text, end)
        deltas: list[dict[str, Any]] = []
        first: dict[str, Any] = {}
        if not st.role_sent:
            first["role"] = "assistant"
            st.role_sent = True
        if reasoning:
            first["reasoning_content"] = first["reasoning"] = reasoning
        if content:
            first["content"] = content
        if first:
            deltas.append(first)
        for call in calls:
            k = st.calls
            st.calls += 1
            # OpenAI's order: index, id and name first, then the argument fragments.
            deltas.append({"tool_calls": [{"index": k, "id": _call_id(), "type": "function",
                                           "function": {"name": call.name, "arguments": ""}}]})
            deltas.append({"tool_calls": [{"index": k, "function": {"arguments": call.arguments}}]})
        if not deltas:
            if not end:
                return b""
            deltas.append({})
        reason = _finish(finish, st.calls > 0) if end else None
        out = b"".join(st.head + _encode(d) + _TAIL_OPEN for d in deltas[:-1])
        return out + st.head + _encode(deltas[-1]) + _tail(lp_bytes, reason)

    def _end(self, states: dict[int, _Choice], usage: Usage | None) -> bytes:
        """After the last event: the usage chunk when asked, then exactly one `[DONE]`."""
        out = b""
        for st in states.values():  # a stream that ended without a finish_reason still flushes
            if not st.finished:
                out += self._delta(st, "", "stop", _NULL)
        if usage is not None:
            self.usage = (usage.prompt_tokens, usage.completion_tokens)
            if self.include_usage:
                out += self._usage_chunk(usage)
        return out + sse.DONE_EVENT

    def _synthesize(self, doc: Completion) -> bytes:
        """`stream: never`: a whole answer told as chunk events."""
        self._set_prefix(doc)
        out = b""
        for c in sorted(doc.choices or (), key=lambda c: c.index):
            out += self._delta(_Choice(self, c.index), c.text, c.finish_reason or "stop", c.logprobs)
        usage = doc.usage
        return out + self._end({}, usage)

    def _usage_chunk(self, usage: Usage) -> bytes:
        return self.prefix[: self.prefix.index(b'"choices":')] + b'"choices":[],"usage":' + _encode(usage) + b"}\n\n"

    def _set_prefix(self, ev: Completion) -> None:
        self.prefix = (b'data: {"id":' + _encode(_chat_id(ev.id)) + b',"object":"chat.completion.chunk","created":'
                       + str(ev.created or int(time.time())).encode() + b',"model":' + _encode(self.model)
                       + b',"choices":[{"index":')

    def _event(self, data: bytes) -> Completion:
        ev = self._decode(data, "stream event")
        if ev.choices is None and ev.usage is None:
            if ev.error != b"null":
                raise UpstreamBroken(f"upstream of route {self.adapter.route!r} failed mid-stream: "
                                     f"{_excerpt(bytes(ev.error))}")
            raise UpstreamBroken(f"upstream of route {self.adapter.route!r} sent a stream event without "
                                 f"`choices`: {_excerpt(data)}")
        return ev

    def _decode(self, data: bytes, what: str) -> Completion:
        try:
            return _decode_completion(data)
        except msgspec.DecodeError as exc:  # ValidationError included
            raise UpstreamBroken(f"upstream of route {self.adapter.route!r} sent a malformed {what} "
                                 f"({exc}): {_excerpt(data)}") from None


def _tail(lp: bytes, finish: str | None) -> bytes:
    return b',"logprobs":' + lp + b',"finish_reason":' + (_encode(finish) if finish else b"null") + b"}]}\n\n"


def _finish(reason: str | None, called: bool) -> str | None:
    """`stop` after tool calls is `tool_calls`, as OpenAI reports it."""
    return "tool_calls" if called and reason in ("stop", None) else reason


def _chat_id(upstream_id: str | None) -> str:
    if upstream_id:
        return "chatcmpl-" + upstream_id.removeprefix("cmpl-")
    return "chatcmpl-" + os.urandom(12).hex()


def _call_id() -> str:
    return "call_" + os.urandom(12).hex()


def _excerpt(data: bytes, limit: int = 200) -> str:
    text = data.decode("utf-8", "replace")
    return text if len(text) <= limit else text[:limit] + "…"


def _chat_logprobs(raw: msgspec.Raw) -> dict[str, Any] | None:
    """Completions logprobs (`tokens`, `token_logprobs`, `top_logprobs`) -> chat's `{"content": [...]}`."""
    if raw == b"null":
        return None
    try:
        lp = _decode_logprobs(raw)
    except msgspec.DecodeError:
        return None
    if lp is None:
        return None
    tops = lp.top_logprobs or []
    content = []
    for k, (token, logprob) in enumerate(zip(lp.tokens, lp.token_logprobs, strict=False)):
        top = tops[k] if k < len(tops) and tops[k] else {}
        content.append({
            "token": token, "logprob": logprob if logprob is not None else -9999.0,
            "bytes": list(token.encode("utf-8")),
            "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))} for t, v in top.items()],
        })
    return {"content": content}


def _merge_logprobs(raws: list[msgspec.Raw]) -> bytes:
    """The logprobs of one choice's stream events joined into one completions logprobs object."""
    merged = CompletionLogprobs([], [], [])
    for raw in raws:
        lp = _decode_logprobs(raw) if raw != b"null" else None
        if lp is None:
            continue
        merged.tokens += lp.tokens
        merged.token_logprobs += lp.token_logprobs
        merged.top_logprobs += lp.top_logprobs or [None] * len(lp.tokens)  # type: ignore[operator]
    return _encode(merged) if merged.tokens else b"null"
