"""The shared core of every translating face: one conversation in, neutral events out.

A face (OpenAI chat, Anthropic Messages, OpenAI Responses) decodes its own
request into a `Generation` and encodes the events below into its own JSON
or SSE; everything between is here, once:

- `Core.start(gen)` renders the prompt with the route's template, merges the
  stop strings and builds the upstream completions body;
- the `Turn` it returns turns the upstream's answer (a JSON completion, or
  SSE split anyhow across reads) into events: `Start`, then per choice
  `Text` / `Reasoning` / `ToolCall` in order and one `Finish`, then `Usage`.

`<think>` and `<tool_call>` are parsed only here (reasoning.py, toolcalls.py),
by one incremental parser per choice that serves whole answers and streams
alike, so a face cannot disagree with another about what the model said.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from .. import sse
from ..errors import BadRequest, UpstreamBroken
from . import reasoning as think
from .call import CallBase
from .core_types import Completion, CompletionChoice, FunctionCall, Message
from .core_types import Usage as CompletionUsage
from .core_types import ToolCall as ToolCallMsg
from .dialects import Dialect, Plan
from .logprobs import NULL, UnreadableLogprobs, to_raw
from .logprobs import items as logprob_items
from .logprobs import join as join_logprobs
from .tags import StopFilter
from .templates import load_template, render_prompt
from .toolcalls import ToolCallSplitter

if TYPE_CHECKING:
    from ..config import RouteConfig

_decode_completion = msgspec.json.Decoder(Completion).decode
_encode = msgspec.json.Encoder().encode


class Generation(msgspec.Struct, kw_only=True):
    """What a face asks of the core, in OpenAI chat terms (the lingua franca of templates)."""

    messages: list[Message]
    model: str | None = None  # the client's model name
    stream: bool = False  # the client wants SSE
    tools: list[dict[str, Any]] | None = None  # {"type": "function", "function": {name, description, parameters}}
    tool_choice: str | dict[str, Any] | None = None  # none | auto | required | {"type": "function", "function": {"name"}}
    max_tokens: int | None = None  # None: the client set no limit
    stop: list[str] | None = None  # the client's own stop strings
    sampling: dict[str, Any] = {}  # temperature, top_p, top_k, seed, n, penalties ... as the client gave them
    response_format: dict[str, Any] | None = None  # {"type": "json_object"} | {"type": "json_schema", "json_schema": {...}}
    template_kwargs: dict[str, Any] | None = None  # chat_template_kwargs, e.g. {"enable_thinking": False}
    extras: dict[str, Any] = {}  # fields the face did not consume: forwarded where the dialect allows
    logprobs: int | None = None  # completions-style top-N (0: the sampled token only)
    # False: at most one tool call per choice, the first (chat/Responses `parallel_tool_calls: false`,
    # Messages `disable_parallel_tool_use`), as vLLM's `maybe_filter_parallel_tool_calls` keeps only the
    # first (vllm/entrypoints/openai/utils.py).
    parallel_tool_calls: bool = True
    # vLLM's chat template controls (its `ChatCompletionRequest`): None is "not said" (True, unless the
    # final message is continued); `continue_final_message` ends the prompt inside the last assistant message.
    add_generation_prompt: bool | None = None
    continue_final_message: bool = False


# --- events: small tuples, made per upstream event on the hot path --------------------------------


class Start(NamedTuple):
    """First of all: the upstream answer's id and time, from which faces derive their own ids."""

    id: str | None
    created: int


class Text(NamedTuple):
    """Answer text for one choice. An empty `text` marks a choice's first event (faces may
    open their message there) or carries logprobs whose text is still held back. `logprobs`: a
    JSON list of chat logprob items (logprobs.py), or null."""

    choice: int
    text: str
    logprobs: msgspec.Raw = NULL


class Reasoning(NamedTuple):
    choice: int
    text: str


class ToolCall(NamedTuple):
    """One whole tool call; `arguments` is JSON text, `index` counts the choice's calls from 0."""

    choice: int
    index: int
    id: str
    name: str
    arguments: str


class Finish(NamedTuple):
    """A choice is complete. `reason`: stop | length | tool_calls | what the upstream said."""

    choice: int
    reason: str
    stop_sequence: str | None = None  # which of the client's stop strings ended it, when known


class Usage(NamedTuple):
    prompt_tokens: int
    completion_tokens: int


Event = Start | Text | Reasoning | ToolCall | Finish | Usage


class Core:
    """Built once per route: the template, the stop strings, the reasoning and stream modes."""

    def __init__(self, config: RouteConfig) -> None:
        self.route = config.name
        self.mode = config.stream
        self.upstream_model = config.upstream_model
        self.template = load_template(config.template, config.source, config.name)
        self.stops = list(self.template.stops)
        self.reasoning = config.reasoning == "think"
        self.dialect = Dialect(config, translating=True)
        self.bos_token: str = getattr(self.template, "bos_token", None) or ""
        self.tool_open = tool_call_open(self.template)

    def start(self, gen: Generation) -> Turn:
        """Render the prompt and build the upstream body. Raises `BadRequest` for what cannot be served."""
        if not gen.messages:
            raise BadRequest("the conversation must hold at least one message", param="messages",
                             code="invalid_value")
        tools, parse_tools = _tools(gen)
        forced = self.dialect.forced_call(tools, gen.tool_choice, self.tool_open) if parse_tools else None
        add_generation_prompt = _generation_prompt(gen)
        if forced is not None and not (add_generation_prompt or gen.continue_final_message):
            raise BadRequest(f"`tool_choice` {gen.tool_choice!r} needs the assistant's turn open: it cannot go with "
                             "`add_generation_prompt: false`", param="add_generation_prompt", code="invalid_value")
        prompt = render_prompt(self.template, gen.messages, tools, gen.template_kwargs,
                               add_generation_prompt=add_generation_prompt,
                               continue_final_message=gen.continue_final_message)
        if forced is not None:
            # The answer starts inside the call block; the dialect's constraint holds it to the call object.
            prompt += self.tool_open
        upstream_stream = gen.stream if self.mode == "auto" else self.mode == "always"
        if not upstream_stream and self.mode == "auto" and not self.dialect.facts.whole_usage \
                and (gen.sampling.get("n") or 1) > 1:
            upstream_stream = True  # its whole answer would count the first choice only (Facts.whole_usage)
        stop = self.stops
        if gen.stop:
            stop = gen.stop + [s for s in stop if s not in gen.stop]
        plan = self.dialect.build(gen, prompt, model=self.upstream_model or gen.model, stop=stop or None,
                                  upstream_stream=upstream_stream, bos_token=self.bos_token, forced=forced)
        return Turn(self, gen, plan, upstream_stream=upstream_stream, parse_tools=parse_tools,
                    prefilled=self.reasoning and think.prefills_think(prompt), forced=forced is not None)


def _generation_prompt(gen: Generation) -> bool:
    """Whether the prompt opens a new assistant turn, checked as vLLM checks it: both controls true is
    a 400 (`ChatCompletionRequest.check_generation_prompt`, vllm/entrypoints/openai/chat_completion/
    protocol.py), and transformers refuses the pair too (`apply_chat_template`). Continuing needs an
    assistant message to continue."""
    if not gen.continue_final_message:
        return gen.add_generation_prompt is not False
    if gen.add_generation_prompt:
        raise BadRequest("Cannot set both `continue_final_message` and `add_generation_prompt` to true: continue "
                         "the final message, or open a new assistant turn", param="continue_final_message",
                         code="invalid_value")
    if gen.messages[-1].role != "assistant":
        raise BadRequest("`continue_final_message` needs the last message to be the assistant's (the text to "
                         f"continue); it is a {gen.messages[-1].role} message", param="continue_final_message",
                         code="invalid_value")
    return False


def tool_call_open(template: Any) -> str | None:
    """How the template opens a tool call, when it is the Hermes form the parser reads (`<tool_call>`
    then a newline, as Qwen2.5/Qwen3 write it), else None. Found by rendering one sample call
    (once per route), so it holds for any template, built-in or file."""
    sample = [Message(role="user", content="x"),
              Message(role="assistant", content=None, tool_calls=[ToolCallMsg(FunctionCall("probe_fn", "{}"))])]
    tools = [{"type": "function", "function": {"name": "probe_fn", "parameters": {"type": "object"}}}]
    try:
        rendered = template.render(sample, tools)
    except Exception:  # a template that refuses the sample: tool calls cannot be forced through it
        return None
    return "<tool_call>\n" if "<tool_call>\n" in rendered else None


def _tools(gen: Generation) -> tuple[list[dict[str, Any]] | None, bool]:
    """The tools to render, and whether the answer is parsed for tool calls.

    `none` lists no tools, a named function lists only that one, `auto` and
    `required` list them all.
    """
    tools = gen.tools or None
    for i, tool in enumerate(tools or ()):
        fn = tool.get("function")
        if tool.get("type", "function") != "function":
            raise BadRequest("only function tools are supported", param=f"tools[{i}].type", code="invalid_value")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRequest("a tool needs `function.name`", param=f"tools[{i}].function.name", code="invalid_value")
    choice = gen.tool_choice
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
    """One choice's text as it streams in, split into reasoning, content and calls."""

    __slots__ = ("index", "stop", "think", "tools", "calls", "seen", "finished", "client_stops", "max_calls")

    def __init__(self, turn: Turn, index: int) -> None:
        self.index = index
        self.client_stops = turn.gen.stop
        self.stop = StopFilter(turn.core.stops)
        self.think = think.ThinkSplitter(turn.prefilled) if turn.core.reasoning else None
        self.tools = ToolCallSplitter(inside=turn.forced) if turn.parse_tools else None
        self.calls = 0
        self.max_calls = None if turn.gen.parallel_tool_calls else 1
        self.seen = False
        self.finished = False

    def events(self, text: str, finish: str | None, lp: msgspec.Raw, out: list[Event],
               matched: str | int | None = None) -> None:
        """Append the events that `text` (and the end, when `finish` is set) decide. `matched` is the
        upstream's report of the stop string that ended it (vLLM `stop_reason`, SGLang `matched_stop`)."""
        end = finish is not None
        if self.seen and not end and self.think is None and self.tools is None:  # the hot path: plain text
            text = self.stop.feed(text)
            if text or lp != NULL:
                out.append(Text(self.index, text, lp))
            return
        first = not self.seen
        self.seen = True
        text = self.stop.feed(text)
        if end:
            text += self.stop.finish()
            self.finished = True
        if self.think is None and self.tools is None:
            if text or first or lp != NULL:
                out.append(Text(self.index, text, lp))
        else:
            self._split(text, end, first, lp, out)
        if end:
            reason = "tool_calls" if self.calls and finish in ("stop", None) else finish
            if reason == "length" and self.stop.done:
                # The proxy cut at a template stop the upstream was not sent (a dialect that takes
                # few stop strings), and the server ran on: the turn itself ended at the stop.
                reason = "stop"
            stop = matched if isinstance(matched, str) and self.client_stops and matched in self.client_stops else None
            out.append(Finish(self.index, reason or "stop", stop))

    def _split(self, text: str, end: bool, first: bool, lp: msgspec.Raw, out: list[Event]) -> None:
        reasoning = ""
        if self.think is not None:
            reasoning, text = self.think.feed(text)
            if end:
                r2, c2 = self.think.finish()
                reasoning, text = reasoning + r2, text + c2
        if reasoning:
            out.append(Reasoning(self.index, reasoning))
        if self.tools is None:
            if text or (first and not reasoning) or lp != NULL:
                out.append(Text(self.index, text, lp))
            return
        items = self.tools.feed(text)
        if end:
            items += self.tools.finish()
        wrote = bool(reasoning)
        for item in items:
            if isinstance(item, str):
                out.append(Text(self.index, item, lp))
                lp = NULL
            elif self.max_calls is not None and self.calls >= self.max_calls:
                continue  # the client asked for one call: later ones are dropped
            else:
                out.append(ToolCall(self.index, self.calls, call_id(), item.name, item.arguments))
                self.calls += 1
            wrote = True
        if (first and not wrote) or lp != NULL:
            out.append(Text(self.index, "", lp))


class Turn:
    """One request in flight: the upstream body, and the answer turned into events."""

    __slots__ = ("core", "gen", "plan", "body", "upstream_stream", "parse_tools", "prefilled", "forced", "usage",
                 "_states", "_decoder", "_started", "_events", "done", "_top", "_choice_usage")

    def __init__(self, core: Core, gen: Generation, plan: Plan, *, upstream_stream: bool, parse_tools: bool,
                 prefilled: bool, forced: bool = False) -> None:
        self.core = core
        self.gen = gen
        self.plan = plan
        # Final now, unless `max_tokens: auto` waits for the upstream's tokenizer: then `ready`
        # adds it (a call that does not forward `ready` would send the server's default).
        self.body = _encode(plan.doc)
        self.upstream_stream = upstream_stream
        self.parse_tools = parse_tools
        self.prefilled = prefilled
        self.forced = forced  # the prompt ends inside a `<tool_call>` block
        self.usage: tuple[int, int] | None = None  # (prompt, completion) once known, for metrics
        self._states: dict[int, _Choice] = {}
        self._decoder = sse.SSEDecoder()
        self._started = False
        self._events = 0  # upstream events seen
        self.done = False  # `[DONE]` came
        self._top = gen.logprobs  # None: the client asked for no logprobs (upstream ones are dropped)
        self._choice_usage: dict[int, Usage] | None = None  # per choice, when the upstream counts so

    async def ready(self, session: Any, url: str, headers: list[tuple[str, str]] | None = None) -> None:
        """Just before sending to `url`: finish a body that waits for the context remainder."""
        if self.plan.auto:
            self.body = await self.core.dialect.finish(self.plan, session, url, headers)

    # --- streams ------------------------------------------------------------------------------

    async def relay(self, chunks: AsyncIterator[bytes], encode: Callable[[list[Event], bool], bytes]
                    ) -> AsyncIterator[bytes]:
        """Upstream bytes -> a face's bytes: `encode(events, last)` per upstream read, its
        output written at once (never held for a later read); `last` marks the final batch,
        where the face closes its stream.

        A failure (a malformed event, an error event) is raised after the events before
        it went out, so the client gets everything that was good. One generator for the
        whole path: faces hand over their encoder instead of wrapping another generator.
        """
        if not self.upstream_stream:  # the route forces a whole answer upstream
            out = encode(self.whole(b"".join([c async for c in chunks])), True)
            if out:
                yield out
            return
        decoder = self._decoder
        for_read = self._feed
        async for chunk in chunks:
            events, failure = for_read(decoder.feed(chunk))
            if events:
                out = encode(events, False)
                if out:
                    yield out
            if failure is not None:
                raise failure
            if self.done:
                break
        events: list[Event] = []
        if not self.done:
            events, failure = for_read(decoder.close())
            if failure is not None:
                out = encode(events, False)
                if out:
                    yield out
                raise failure
        if not (self._events or self.done):
            raise UpstreamBroken(f"upstream of route {self.core.route!r} ended the stream without any event")
        out = encode(self._end(events), True)
        if out:
            yield out

    def _feed(self, datas: list[bytes]) -> tuple[list[Event], Exception | None]:
        """Complete upstream events -> neutral events, and the failure that stopped them if one did."""
        out: list[Event] = []
        states = self._states
        for data in datas:
            if data == sse.DONE:
                self.done = True
                break
            try:
                ev = self._event(data)
            except Exception as exc:
                return out, exc
            self._events += 1
            if not self._started:
                self._started = True
                out.append(Start(ev.id, ev.created or int(time.time())))
            for c in ev.choices or ():
                state = states.get(c.index)
                if state is None:
                    state = states[c.index] = _Choice(self, c.index)
                try:
                    lp = NULL if self._top is None else self._logprobs(c.logprobs)
                except UpstreamBroken as exc:
                    return out, exc
                state.events(c.text, c.finish_reason, lp, out, c.stop_reason or c.matched_stop)
            if ev.usage is not None:
                self.usage = self._count(ev)
        return out, None

    def _end(self, out: list[Event]) -> list[Event]:
        """After the last event: unfinished choices are flushed and finished, then usage."""
        for st in self._states.values():
            if not st.finished:
                st.events("", "stop", NULL, out)
        if self.usage is not None:
            out.append(Usage(*self.usage))
        return out

    # --- whole answers ------------------------------------------------------------------------

    def whole(self, body: bytes) -> list[Event]:
        """A whole upstream answer (JSON, or SSE under `stream: always`) -> every event, choices in order."""
        streamed = body.lstrip()[:1] != b"{"
        doc = self._aggregate(body) if streamed else self._decode(body, "completion")
        if doc.choices is None:
            raise UpstreamBroken(f"upstream of route {self.core.route!r} sent a completion without "
                                 f"`choices`: {excerpt(body)}")
        out: list[Event] = [Start(doc.id, doc.created or int(time.time()))]
        self._started = True
        for c in sorted(doc.choices, key=lambda c: c.index):
            lp = c.logprobs if streamed or self._top is None else self._logprobs(c.logprobs)  # aggregated: read
            _Choice(self, c.index).events(c.text, c.finish_reason or "stop", lp, out, c.stop_reason or c.matched_stop)
        if doc.usage is not None:
            self.usage = (doc.usage.prompt_tokens, doc.usage.completion_tokens)
            out.append(Usage(*self.usage))
        return out

    def _aggregate(self, body: bytes) -> Completion:
        """SSE events -> one completion: texts joined, last finish_reason, usage, logprobs read and joined."""
        dec = sse.SSEDecoder()
        texts: dict[int, list[str]] = {}
        finish: dict[int, str | None] = {}
        matched: dict[int, str | int | None] = {}
        lps: dict[int, list[Any]] = {}
        first: Completion | None = None
        usage = None
        events = dec.feed(body) + dec.close()
        if not events:
            raise UpstreamBroken(f"upstream of route {self.core.route!r} sent neither a completion nor "
                                 f"stream events: {excerpt(body)}")
        logprobs = self._top is not None
        for data in events:
            if data == sse.DONE:
                break
            ev = self._event(data)
            first = first or ev
            if ev.usage is not None:
                counted = self._count(ev)
                usage = CompletionUsage(counted[0], counted[1], sum(counted))
            for c in ev.choices or ():
                texts.setdefault(c.index, []).append(c.text)
                if c.finish_reason is not None:
                    finish[c.index] = c.finish_reason
                    matched[c.index] = c.stop_reason or c.matched_stop
                if logprobs:
                    lps.setdefault(c.index, []).append(self._logprobs(c.logprobs))
        choices = [CompletionChoice("".join(t), i, finish.get(i), stop_reason=matched.get(i)) for i, t in texts.items()]
        if logprobs:
            for c in choices:
                c.logprobs = join_logprobs(lps.get(c.index, []))
        return Completion(choices, first.id if first else None, first.created if first else None, usage)

    def _count(self, ev: Completion) -> tuple[int, int]:
        """(prompt, completion) tokens so far. An event that carries choices and usage counts that
        choice alone: llama.cpp ends each of `n` streamed choices with its own usage
        (tools/server/server-task.cpp, one child task per choice); they add up."""
        u = ev.usage
        assert u is not None
        if not ev.choices:
            return u.prompt_tokens, u.completion_tokens
        per = self._choice_usage = self._choice_usage or {}
        per[ev.choices[0].index] = Usage(u.prompt_tokens, u.completion_tokens)
        return max(c.prompt_tokens for c in per.values()), sum(c.completion_tokens for c in per.values())

    def _logprobs(self, raw: msgspec.Raw) -> msgspec.Raw:
        """An upstream choice's logprobs -> the faces' items (logprobs.py), read in the dialect's shape."""
        if raw == NULL:
            return NULL
        dialect = self.core.dialect.facts
        try:
            return to_raw(logprob_items(raw, dialect.logprobs, self._top or 0))
        except UnreadableLogprobs as exc:
            raise UpstreamBroken(f"upstream of route {self.core.route!r} sent logprobs not in the {dialect.logprobs} "
                                 f"shape its dialect ({dialect.name}) answers ({exc}): {excerpt(bytes(raw))}") from None

    def _event(self, data: bytes) -> Completion:
        ev = self._decode(data, "stream event")
        if ev.choices is None and ev.usage is None:
            if ev.error != NULL:
                raise UpstreamBroken(f"upstream of route {self.core.route!r} failed mid-stream: "
                                     f"{excerpt(bytes(ev.error))}")
            raise UpstreamBroken(f"upstream of route {self.core.route!r} sent a stream event without "
                                 f"`choices`: {excerpt(data)}")
        return ev

    def _decode(self, data: bytes, what: str) -> Completion:
        try:
            return _decode_completion(data)
        except msgspec.DecodeError as exc:  # ValidationError included
            raise UpstreamBroken(f"upstream of route {self.core.route!r} sent a malformed {what} "
                                 f"({exc}): {excerpt(data)}") from None


class TurnCall(CallBase):
    """Base of a face's `Call`: forwards the forwarder's `ready` step to its turn, so a body that
    waits for `max_tokens: auto` is finished with the upstream the request goes to."""

    __slots__ = ()
    turn: Turn
    body: bytes

    @property
    def usage(self) -> tuple[int, int] | None:  # type: ignore[override]
        """(prompt_tokens, completion_tokens) the upstream reported, for metrics."""
        return self.turn.usage

    async def ready(self, session: Any, url: str, headers: list[tuple[str, str]] | None = None) -> None:
        turn = self.turn
        if turn.plan.auto:
            await turn.ready(session, url, headers)
            self.body = turn.body

    @property
    def prompt(self) -> str:
        """The rendered prompt as sent: what the engine caches (`balance: prefix` keys on it)."""
        return self.turn.plan.doc["prompt"]  # type: ignore[no-any-return]


def call_id() -> str:
    return "call_" + os.urandom(12).hex()


def excerpt(data: bytes, limit: int = 200) -> str:
    text = data.decode("utf-8", "replace")
    return text if len(text) <= limit else text[:limit] + "…"


def id_tail(upstream_id: str | None) -> str:
    """The upstream completion id without its kind prefix, for a face to put its own in front
    (`chatcmpl-`, `msg_`, `resp_`): vLLM and SGLang answer `cmpl-…`, llama.cpp `chatcmpl-…` on
    completions too (tools/server/server-common.cpp `gen_chatcmplid`). Random when there is none."""
    if not upstream_id:
        return os.urandom(12).hex()
    for prefix in ("chatcmpl-", "cmpl-"):
        if upstream_id.startswith(prefix):
            return upstream_id[len(prefix):]
    return upstream_id
