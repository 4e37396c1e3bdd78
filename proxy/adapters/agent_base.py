"""What the agent faces (Anthropic Messages, OpenAI Responses) share beyond the core.

- `left_out`: the tools a local model cannot run (hosted search, code execution,
  computer use, ...) are left out of the prompt, logged and counted, or refused
  with a 400 naming them under `hosted_tools: reject`. Codex sends `web_search`
  by default and Claude Code may send Anthropic's server tools; dropping them
  lets both work unchanged.
- `FaceCall`: the run-by-run walk over the core's events both faces' calls share;
- `TokenCounter`: `POST {path}/count_tokens` (Messages) and
  `{path}/input_tokens` (Responses) render the same prompt the request would
  and ask the upstream's own tokenizer (`POST /tokenize`: vLLM
  `vllm/entrypoints/serve/tokenize` answers `count`, llama.cpp
  `tools/server/server.cpp` `handle_tokenize` answers `tokens`, SGLang both);
  an upstream without one (404/405/501) gets an estimate instead.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec

from .. import observe
from ..errors import BadRequest
from .call import AdapterBase, CallBase
from .core import Core, Event, Finish, Generation, Reasoning, Start, Text, ToolCall, Turn, TurnCall, Usage
from .dialects import server_root
from .logprobs import NULL
from .logprobs import join as join_logprobs

_encode = msgspec.json.Encoder().encode
ESTIMATE_BYTES_PER_TOKEN = 4  # the estimate: UTF-8 bytes of the rendered prompt / 4, rounded up
_NO_TOKENIZER = frozenset({404, 405, 501})


def left_out(route: str, policy: str, kinds: list[str], field: str, hint: str) -> None:
    """Tools the route cannot offer the model: refuse (`hosted_tools: reject`) or count and log them."""
    if not kinds:
        return
    if policy == "reject":
        raise BadRequest(f"this route cannot run the tools {', '.join(sorted(set(kinds)))} (a local model behind a "
                         f"completions upstream; the route has `hosted_tools: reject`){hint}", param=field,
                         code="unsupported_tool")
    observe.left_out_tools(route, kinds)


def json_schema_format(schema: dict[str, Any], name: str | None, strict: bool | None) -> dict[str, Any]:
    """A JSON schema output request in the core's (OpenAI chat) `response_format` form."""
    inner: dict[str, Any] = {"name": name or "output", "schema": schema}
    if strict is not None:
        inner["strict"] = strict
    return {"type": "json_schema", "json_schema": inner}


class _Prompt(msgspec.Struct):
    prompt: str


_decode_prompt = msgspec.json.Decoder(_Prompt).decode


class _Tokenized(msgspec.Struct):
    count: int | None = None
    tokens: list[Any] | None = None


_decode_tokenized = msgspec.json.Decoder(_Tokenized).decode


class TokenCounter(AdapterBase):
    """The adapter of a face's token-count path: same decoding, same prompt, the upstream's tokenizer."""

    def __init__(self, core: Core, face: str, decode: Callable[[bytes], Generation],
                 answer: Callable[[int], bytes], drop_headers: frozenset[bytes] = frozenset()) -> None:
        self.core = core
        self.face = face
        self.drop_headers = drop_headers  # the face's own client headers, not sent upstream
        self.decode = decode  # the face's own request decoder (its validation and errors)
        self.answer = answer  # count -> the face's answer body

    def request(self, body: bytes) -> CountCall:
        gen = self.decode(body)
        gen.stream = False
        prompt = _decode_prompt(self.core.start(gen).body).prompt
        model = self.core.upstream_model or gen.model
        # vLLM reads `prompt`, llama.cpp `content`; each ignores the other's field.
        return CountCall(self, prompt, _encode({"model": model, "prompt": prompt, "content": prompt}))


class CountCall(CallBase):
    translates = True
    stream = False
    upstream_query = False
    __slots__ = ("counter", "drop_headers", "prompt", "body")

    def __init__(self, counter: TokenCounter, prompt: str, body: bytes) -> None:
        self.counter = counter
        self.drop_headers = counter.drop_headers
        self.prompt = prompt
        self.body = body

    def retarget(self, url: str) -> str:
        """The tokenizer beside the completions endpoint: `http://h/v1/completions` -> `http://h/tokenize`."""
        return server_root(url) + "/tokenize"

    def response(self, body: bytes) -> bytes:
        try:
            doc = _decode_tokenized(body)
        except msgspec.DecodeError:
            doc = _Tokenized()
        count = doc.count if doc.count is not None else len(doc.tokens) if doc.tokens is not None else None
        return self.counter.answer(count if count is not None else self.estimate())

    def recover(self, status: int) -> bytes | None:
        """An upstream without `/tokenize` (an OpenAI-style server): the estimate."""
        return self.counter.answer(self.estimate()) if status in _NO_TOKENIZER else None

    def estimate(self) -> int:
        return math.ceil(len(self.prompt.encode("utf-8")) / ESTIMATE_BYTES_PER_TOKEN)

    async def events(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:  # never streamed
        raise NotImplementedError
        yield b""


class FaceCall(TurnCall):
    """What both agent faces do with the core's events (choice 0; neither API has `n`).

    Text and reasoning arrive as runs that open and close blocks (Messages) or
    items (Responses); tool calls arrive whole. The subclass says what opening,
    growing and closing a run means in its API, and buffers its stream bytes in
    `_out`; the same calls build the whole answer, so the two cannot disagree.

    Logprobs (a face that offers them passes `logprobs=True`): the core's `Text` events carry
    each token's items, also for text it holds back or that became reasoning or a tool call
    (then on an empty `Text`). They go with the next text delta of choice 0, so every token is
    reported once; a text run's closing gets all of its own. Tokens with no text run after
    them (an answer that is only a tool call) have no text to belong to and are not reported.
    """

    translates = True
    upstream_query = False  # a face's query (Claude Code's `?beta=true`) means nothing upstream

    __slots__ = ("turn", "body", "model", "stream", "_open", "_parts", "_usage", "_out", "_lps", "_run_lps")

    def __init__(self, turn: Turn, *, model: str, stream: bool, logprobs: bool = False) -> None:
        self.turn = turn
        self.body = turn.body
        self.model = model
        self.stream = stream  # the client gets SSE
        self._open: str | None = None  # the open run: "text" | "reasoning"
        self._parts: list[str] = []  # its text so far
        self._usage: Usage | None = None
        self._out: list[bytes] = []  # stream bytes not yet yielded
        self._lps: list[msgspec.Raw] | None = [] if logprobs else None  # items not yet given to a delta
        self._run_lps: list[msgspec.Raw] = []  # the open text run's items

    def response(self, body: bytes) -> bytes:
        """The upstream's whole answer -> the face's whole answer."""
        self._feed(self.turn.whole(body))
        self._close()
        return _encode(self._whole())

    def events(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """Upstream bytes -> the face's events; one upstream read's events go out in one write."""
        return self.turn.relay(chunks, self._encode)

    def _encode(self, batch: list[Event], last: bool) -> bytes:
        """One upstream read's events -> the face's bytes; `last` closes the stream."""
        self._feed(batch)
        if last:
            self._close()
            self._end()
        out = b"".join(self._out)
        self._out.clear()
        return out

    def _feed(self, batch: list[Event]) -> None:
        for ev in batch:
            kind = type(ev)
            if kind is Text or kind is Reasoning:
                if ev.choice != 0:
                    continue
                if kind is Text and self._lps is not None and ev.logprobs != NULL:
                    self._lps.append(ev.logprobs)
                if ev.text:
                    run = "text" if kind is Text else "reasoning"
                    if self._open != run:
                        self._close()
                        self._open = run
                        self._opened(run)
                    self._parts.append(ev.text)
                    self._grew(run, ev.text, self._take_logprobs() if run == "text" else NULL)
            elif kind is ToolCall:
                if ev.choice == 0:
                    self._close()
                    self._called(ev)
            elif kind is Finish:
                if ev.choice == 0:
                    self._finished(ev)
                    self._close()
            elif kind is Usage:
                self._usage = ev
            elif kind is Start:
                self._started(ev)

    def _take_logprobs(self) -> msgspec.Raw:
        """The items waiting for a text delta (NULL for none), now the open text run's."""
        lps = self._lps
        if not lps:
            return NULL
        found = lps[0] if len(lps) == 1 else join_logprobs(lps)
        lps.clear()
        self._run_lps.append(found)
        return found

    def _close(self) -> None:
        """End the open run, if any."""
        run = self._open
        if run is None:
            return
        lp = NULL
        if run == "text" and self._lps is not None:
            if self._lps:  # tokens whose text was held back and dropped (a stop string): an empty delta
                self._grew(run, "", self._take_logprobs())
            lp = join_logprobs(self._run_lps)
            self._run_lps.clear()
        self._open = None
        text = "".join(self._parts)
        self._parts.clear()
        self._closed(run, text, lp)

    # What the face does at each step.
    def _started(self, ev: Start) -> None: ...
    def _opened(self, run: str) -> None: ...
    # `lp`: the text's logprob items (a JSON list, or NULL for none or not asked).
    def _grew(self, run: str, text: str, lp: msgspec.Raw) -> None: ...
    def _closed(self, run: str, text: str, lp: msgspec.Raw) -> None: ...
    def _called(self, ev: ToolCall) -> None: ...
    def _finished(self, ev: Finish) -> None: ...
    def _end(self) -> None: ...  # the stream's last events
    def _whole(self) -> dict[str, Any]: ...  # the whole answer
