"""How each upstream server's legacy `POST /v1/completions` speaks, and the one place its body is built.

A route's `dialect:` names the server behind it. The facts below come from
each server's own source (README "Upstream dialects" has the table):

- vLLM (`vllm/entrypoints/openai/completion/protocol.py`): `max_tokens`
  defaults to 16, and `null` is read as 16 too (`normalize_null_max_tokens`);
  there is no unlimited form, so the context remainder is asked of its
  `POST /tokenize` (`vllm/entrypoints/serve/tokenize/protocol.py`: `count`,
  `max_model_len`). Unknown fields are accepted and ignored
  (`OpenAIBaseModel`, `extra="allow"`). Constraints: `structured_outputs`
  {json, json_object, regex, choice, grammar} or `response_format`. BOS is
  added unless `add_special_tokens: false`.
- llama.cpp (`tools/server/server-schema.cpp`, `tools/server/server-task.cpp`
  `params_from_json_cmpl`; checked against the server itself by `just test-engine`):
  `n_predict`/`max_tokens` default −1, unlimited (`null` counts as absent); every
  other field is copied through (unknown ones ignored; `n` is its `n_cmpl`; `echo`,
  `best_of`, `suffix`, which builds before it refused, change nothing);
  logprobs come in the chat shape (logprobs.py); constraints are `json_schema` (an object) or `grammar`;
  `response_format` is not read on completions; BOS is always added, with a warning
  when the prompt then starts with two (`src/llama-vocab.cpp` `check_double_bos_eos`).
- SGLang (`python/sglang/srt/entrypoints/openai/protocol.py` `CompletionRequest`):
  `max_tokens: int = 16` (`null` is a 400); fields it does not define are
  dropped silently (pydantic's default); `json_schema` is a JSON *string*;
  its `/tokenize` reports the tokenizer's `model_max_length`
  (`serving_tokenize.py`), the served context is `max_model_len` of
  `GET /v1/models`, and prompt + `max_tokens` must stay below it
  (`tokenizer_manager.py`: `>= context_len` is refused). BOS is always added.
- `openai`: a strict legacy completions server: only the fields of OpenAI's
  completions API, `max_tokens` 16 by default, nothing to constrain with.

Where each server reports its load (`balance_load:`, proxy/engine_load.py), as
Prometheus gauges on `GET /metrics` at the server root, summed over their series:
- vLLM: `vllm:num_requests_running` and `vllm:num_requests_waiting`, one series
  per engine (label `engine`) (`vllm/v1/metrics/loggers.py`, `PrometheusStatLogger`);
  always served.
- llama.cpp: `llamacpp:requests_processing` (slots busy) and `llamacpp:requests_deferred`
  (tasks waiting for a slot) (`tools/server/server-task.cpp`,
  `server_task_result_metrics::to_metrics`); only with `--metrics`, else a 501
  (`server-context.cpp`, `get_metrics`). Its `/slots` counts only busy slots, not the queue.
- SGLang: `sglang:num_running_reqs` and `sglang:num_queue_reqs`, one series per
  data-parallel rank (`python/sglang/srt/metrics/collector.py`, `SchedulerMetricsCollector`);
  only with `--enable-metrics`.

A face never builds an upstream body; the core hands a `Generation` and the
rendered prompt to `Dialect.build`, which returns a `Plan`. A plan whose
`max_tokens` is `auto` (or capped by `body.limit.max_tokens: auto`) is
finished by `Dialect.finish` just before sending, with the upstream the
request goes to.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import msgspec

from ..errors import BadRequest, connect_failure, context_unknown
from ..transport import route_timeout, send
from .logprobs import Shape

if TYPE_CHECKING:
    from ..config import Body, RouteConfig

AUTO = "auto"
FILL, CLAMP = "fill", "clamp"  # what `Dialect.finish` does with the context remainder (`Plan.auto`)

# OpenAI's legacy completions request (https://platform.openai.com/docs/api-reference/completions/create).
OPENAI_FIELDS = frozenset({
    "model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n",
    "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix", "temperature", "top_p", "user",
})
# SGLang's `CompletionRequest` fields (python/sglang/srt/entrypoints/openai/protocol.py).
SGLANG_FIELDS = OPENAI_FIELDS | frozenset({
    "return_hidden_states", "return_routed_experts", "routed_experts_start_len", "return_cached_tokens_details",
    "return_token_ids", "top_k", "min_p", "min_tokens", "json_schema", "regex", "ebnf", "repetition_penalty",
    "stop_token_ids", "stop_regex", "no_stop_trim", "ignore_eos", "skip_special_tokens", "lora_path", "session_id",
    "session_params", "response_format", "custom_params", "custom_logit_processor", "images_config",
    "bootstrap_host", "bootstrap_port", "bootstrap_room", "routed_dp_rank", "disagg_prefill_dp_rank",
    "data_parallel_rank", "rid", "extra_key", "cache_salt", "ngram_corpus_id", "priority", "custom_labels",
})
# vLLM removed these (around v0.12) and now ignores them with a 200, unconstrained.
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar",
           "guided_whitespace_pattern": "whitespace_pattern"}
# Completions fields a chat request has no business setting: they would change what the answer is.
_NOT_CHAT = {
    "prompt": "the prompt is rendered from `messages`",
    "echo": "`echo` would return the rendered prompt as the answer",
    "suffix": "`suffix` is for text insertion, not chat",
}
_OBJECT: dict[str, Any] = {"type": "object"}
# At most this many stop strings: OpenAI's completions API takes "up to 4 sequences"
# (`stop`, https://platform.openai.com/docs/api-reference/completions/create).
_MAX_STOPS = {"openai": 4}


class LoadReport(NamedTuple):
    """Where a server reports its queue: `path` on its root answers Prometheus text, in which the
    `gauges` add up to the requests it holds (running and waiting)."""

    path: str
    gauges: frozenset[str]


class Facts(NamedTuple):
    """What one server's completions endpoint does, where it matters to the proxy."""

    name: str
    max_tokens: Literal["auto", "omit", "required"]  # what to do when neither client nor route sets it
    extensions: bool  # fields it does not define are accepted (forwarded as they are)
    fields: frozenset[str]  # the fields it defines (consulted when `extensions` is False)
    constraint: Literal["structured_outputs", "json_schema_object", "json_schema_string"] | None
    bos: Literal["flag", "strip", "keep"]  # prompt starts with BOS: add_special_tokens false / strip it / keep it
    context: Literal["tokenize", "tokenize+models"] | None  # how `auto` learns the context remainder
    logprobs: Shape  # how its completions answer logprobs (logprobs.py)
    load: LoadReport | None = None  # where it reports its queue (`balance_load:`, module docstring)
    # A whole (non-streamed) answer with `n` > 1 counts every choice in its `usage`. llama.cpp's
    # counts the first only (`handle_completions_impl`, tools/server/server-context.cpp, merges the
    # choices into the first result), so such a request is streamed upstream, whose choices each end
    # with their own usage, added up. vLLM's and SGLang's whole answers sum every choice:
    # `request_output_to_completion_response` (vllm/entrypoints/openai/serving_completion.py),
    # `UsageProcessor.calculate_response_usage` (sglang/srt/entrypoints/openai/usage_processor.py).
    whole_usage: bool = True


# The one list of dialect names (the first is the default): route-file validation
# (config.RouteConfig.dialect), `mock-upstream --dialect` and the README's dialect table
# (tests/test_architecture.py) read it; `context` says which can size `max_tokens: auto`.
FACTS = {
    "vllm": Facts("vllm", "auto", True, frozenset(), "structured_outputs", "flag", "tokenize", "completions",
                  LoadReport("/metrics", frozenset({"vllm:num_requests_running", "vllm:num_requests_waiting"}))),
    "llama.cpp": Facts("llama.cpp", "omit", True, frozenset(), "json_schema_object", "strip", None, "chat",
                       LoadReport("/metrics", frozenset({"llamacpp:requests_processing",
                                                         "llamacpp:requests_deferred"})), whole_usage=False),
    "sglang": Facts("sglang", "auto", False, SGLANG_FIELDS, "json_schema_string", "strip", "tokenize+models",
                    "completions", LoadReport("/metrics", frozenset({"sglang:num_running_reqs",
                                                                     "sglang:num_queue_reqs"}))),
    "openai": Facts("openai", "required", False, OPENAI_FIELDS, None, "keep", None, "completions"),
}
# llama.cpp names vLLM's `repetition_penalty` `repeat_penalty` (server-task.cpp).
_RENAMED = {"llama.cpp": {"repetition_penalty": "repeat_penalty"}}


class Plan:
    """An upstream body in the making: `doc` is final unless `auto` still needs the context remainder."""

    __slots__ = ("doc", "auto", "add_special")

    def __init__(self, doc: dict[str, Any], auto: str | None, add_special: bool) -> None:
        self.doc = doc
        # FILL: `max_tokens` is to be the context remainder; CLAMP: the client's `max_tokens`, at most
        # the remainder; None: `doc` is final (Dialect.finish).
        self.auto = auto
        self.add_special = add_special  # what the server does with BOS for this body (tokenize the same way)


class BodyPolicy:
    """A route's `body:` (defaults, set, remove, limit), applied to the JSON that goes upstream."""

    __slots__ = ("defaults", "auto", "set", "remove", "limit", "clamp", "unlimited", "idle")

    def __init__(self, body: Body | None, facts: Facts, *, translating: bool) -> None:
        defaults = dict(body.defaults) if body is not None else {}
        # A translating route that says nothing about max_tokens gets the dialect's way of
        # "up to the context", as chat endpoints do; passthrough bodies are the client's own.
        if translating and "max_tokens" not in defaults and facts.max_tokens == "auto":
            defaults["max_tokens"] = AUTO
        self.auto = defaults.get("max_tokens") == AUTO
        if self.auto:
            del defaults["max_tokens"]
        self.defaults = defaults
        self.set = dict(body.set) if body is not None else {}
        self.remove = tuple(body.remove) if body is not None else ()
        self.limit = dict(body.limit) if body is not None else {}
        # `limit: {max_tokens: auto}`: a client's max_tokens larger than what the prompt leaves of the
        # context is lowered to fit, instead of the server refusing the request (Claude Code asks for
        # 32 000 whatever the model). vLLM refuses prompt + max_tokens > max_model_len ("This model's
        # maximum context length is ...": `serving_engine._validate_input`; the bound itself in
        # vllm/tests/v1/e2e/test_context_length.py), SGLang refuses >= (see `finish`). Costs the same
        # lookup as `auto`, only for requests with a limit.
        self.clamp = self.limit.get("max_tokens") == AUTO
        if self.clamp:
            del self.limit["max_tokens"]
        self.unlimited = facts.max_tokens == "omit"  # an absent max_tokens means "no limit" (llama.cpp)
        self.idle = not (self.defaults or self.set or self.remove or self.limit)  # the common case

    def apply(self, doc: dict[str, Any]) -> str | None:
        """Fill, force, drop, cap. FILL or CLAMP when `max_tokens` still waits for the context remainder."""
        if self.idle:
            return self._pending(doc, self.auto and doc.get("max_tokens") is None)
        for key, value in self.defaults.items():
            if doc.get(key) is None:
                doc[key] = value
        auto = self.auto and doc.get("max_tokens") is None
        if self.set:
            doc.update(self.set)
        for key in self.remove:
            doc.pop(key, None)
        if auto and ("max_tokens" in self.set or "max_tokens" in self.remove):
            auto = False
        self.cap(doc, auto)
        return self._pending(doc, auto)

    def _pending(self, doc: dict[str, Any], fill: bool) -> str | None:
        if fill:
            return FILL
        if self.clamp:
            value = doc.get("max_tokens")
            if isinstance(value, int) and not isinstance(value, bool):
                return CLAMP
        return None

    def cap(self, doc: dict[str, Any], pending: bool = False) -> None:
        for key, ceiling in self.limit.items():
            value = doc.get(key)
            if value is None:
                # No limit at all on a server where absent means unlimited: the ceiling is the limit.
                if key == "max_tokens" and self.unlimited and not pending:
                    doc[key] = ceiling
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > ceiling:
                doc[key] = ceiling


class _Tokenized(msgspec.Struct):
    count: int
    max_model_len: int


class _Card(msgspec.Struct):
    id: str = ""
    max_model_len: int | None = None


class _Cards(msgspec.Struct):
    data: list[_Card] = []


_decode_tokenized = msgspec.json.Decoder(_Tokenized).decode
_decode_cards = msgspec.json.Decoder(_Cards).decode
_encode = msgspec.json.Encoder().encode
# Headers of the client's request that must not ride along on the proxy's own lookups.
_LOOKUP_DROPS = frozenset({"content-type", "content-length", "transfer-encoding", "host"})


class Dialect:
    """A route's upstream dialect and `body:` policy, built once per route."""

    def __init__(self, config: RouteConfig, *, translating: bool) -> None:
        self.facts = FACTS[config.dialect]
        self.route = config.name
        self.policy = BodyPolicy(config.body, self.facts, translating=translating)
        t = config.timeout
        self.timeout = route_timeout(t.connect, t.read, t.pool)  # the lookups wait as the request would
        self._served: dict[str, int] = {}  # SGLang: server root -> max_model_len of GET /v1/models

    # --- building -------------------------------------------------------------------------------

    def build(self, gen: Any, prompt: str, *, model: str | None, stop: list[str] | None, upstream_stream: bool,
              bos_token: str = "", forced: dict[str, Any] | None = None) -> Plan:
        """The completions body for a `Generation` whose prompt is rendered. Raises `BadRequest`
        for what this server cannot do (naming the field), never drops it silently."""
        facts = self.facts
        # `model` first: `served.rename` splices the learnt name in without decoding the prompt.
        doc: dict[str, Any] = {"model": model, "prompt": prompt} if model else {"prompt": prompt}
        if upstream_stream:
            doc["stream"] = True
            # Usage is asked for on every stream (metrics need it). Only with `stream: true`:
            # vLLM answers `stream_options` without it with a 400.
            doc["stream_options"] = {"include_usage": True}
        if gen.max_tokens is not None:
            doc["max_tokens"] = gen.max_tokens
        if stop:
            doc["stop"] = self._stops(stop, gen.stop)
        refused: list[str] = []
        renamed = _RENAMED.get(facts.name, {})
        for key, value in gen.sampling.items():
            key = renamed.get(key, key)
            if not facts.extensions and key not in facts.fields:
                refused.append(key)
            doc[key] = value
        if gen.logprobs is not None:
            # llama.cpp reads `logprobs` as `n_probs`, and 0 gives no logprobs at all (not even the
            # sampled token's): ask for one alternative; the turn trims to what the client asked.
            doc["logprobs"] = max(gen.logprobs, 1) if facts.logprobs == "chat" else gen.logprobs
        add_special = True
        if bos_token and prompt.startswith(bos_token):
            # The template wrote BOS, and the server adds its own: one must go.
            if facts.bos == "flag":
                doc["add_special_tokens"] = False
                add_special = False
            elif facts.bos == "strip":
                doc["prompt"] = prompt[len(bos_token):]
        self._extras(doc, gen.extras, refused)
        if facts.name == "llama.cpp":
            _llama_cpp(doc)
        if refused:
            names = ", ".join(f"`{k}`" for k in refused)
            raise BadRequest(f"this route's upstream (dialect {facts.name}) does not define {names} on its "
                             "completions endpoint and would ignore or refuse it", param=refused[0],
                             code="unsupported_parameter")
        if forced is not None:
            self._constrain(doc, forced, "tool_choice")
        elif gen.response_format is not None:
            self._response_format(doc, gen.response_format)
        auto = self.policy.apply(doc)
        return Plan(doc, auto, add_special)

    def _stops(self, stop: list[str], client: list[str] | None) -> list[str]:
        """The stop strings the server takes: the client's first (`Core.start` puts them first), then
        the template's that fit. A template stop left out is still cut by the proxy (`StopFilter`)."""
        most = _MAX_STOPS.get(self.facts.name)
        if most is None or len(stop) <= most:
            return stop
        if client and len(client) > most:
            raise BadRequest(f"`stop` holds {len(client)} strings: this route's upstream (dialect {self.facts.name}) "
                             f"takes at most {most}", param="stop", code="invalid_value")
        return stop[:most]

    def _extras(self, doc: dict[str, Any], extras: dict[str, Any], refused: list[str]) -> None:
        """Fields the face did not consume: forwarded where the server takes them, refused by name where not."""
        facts = self.facts
        for key, value in extras.items():
            if value is None:  # OpenAI's "not set" (servers with typed fields would refuse a null)
                continue
            if key in _NOT_CHAT:
                raise BadRequest(f"`{key}` cannot be sent through this route: {_NOT_CHAT[key]}", param=key,
                                 code="unsupported_parameter")
            if facts.name == "vllm" and key in _GUIDED:
                # Removed from vLLM, which now answers them unconstrained: say it the current way.
                so = doc.setdefault("structured_outputs", {})
                so[_GUIDED[key]] = value
                continue
            if key in doc and key != "structured_outputs":
                raise BadRequest(f"`{key}` is set by the proxy from the request's own fields", param=key,
                                 code="invalid_value")
            if not facts.extensions and key not in facts.fields:
                refused.append(key)
                continue
            if key == "structured_outputs" and isinstance(value, dict):
                doc["structured_outputs"] = {**value, **doc.get("structured_outputs", {})}
                continue
            doc[key] = value

    def _response_format(self, doc: dict[str, Any], rf: dict[str, Any]) -> None:
        kind = rf.get("type", "text")
        if kind == "text":
            return
        if kind == "json_object":
            self._constrain(doc, None, "response_format")
            return
        if kind == "json_schema":
            # OpenAI's form: {"name", "schema"?, "strict"?, "description"?}; no schema means any JSON object.
            spec = rf.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or (
                    schema is not None and not isinstance(schema, dict)):
                raise BadRequest("`response_format.json_schema` must be an object with a `name` and a JSON schema "
                                 "object as `schema`", param="response_format", code="invalid_value")
            self._constrain(doc, schema, "response_format")
            return
        if kind == "structural_tag" and self.facts.constraint == "structured_outputs":
            doc["response_format"] = rf  # vLLM takes it on completions as it is
            return
        raise BadRequest(f"`response_format` type {kind!r} is not supported: use text, json_object or json_schema",
                         param="response_format", code="invalid_value")

    def _constrain(self, doc: dict[str, Any], schema: dict[str, Any] | None, param: str) -> None:
        """Hold the completion to a JSON schema (None: any JSON object), in the server's own form."""
        how = self.facts.constraint
        if how == "structured_outputs":
            so = {k: v for k, v in doc.get("structured_outputs", {}).items()
                  if k not in ("json", "json_object", "regex", "choice", "grammar")}
            if schema is None:
                so["json_object"] = True
            else:
                so["json"] = schema
            doc["structured_outputs"] = so
        elif how == "json_schema_object":
            doc.pop("grammar", None)  # llama.cpp lets `grammar` win over `json_schema`
            doc["json_schema"] = _OBJECT if schema is None else schema
        elif how == "json_schema_string":
            doc.pop("regex", None)
            doc.pop("ebnf", None)
            doc["json_schema"] = json.dumps(_OBJECT if schema is None else schema, ensure_ascii=False)
        else:
            raise BadRequest(f"`{param}` cannot be honoured: this route's upstream (dialect {self.facts.name}) "
                             "has no way to constrain a completion", param=param, code="unsupported_parameter")

    def forced_call(self, tools: list[dict[str, Any]] | None, choice: Any, tool_open: str | None
                    ) -> dict[str, Any] | None:
        """`tool_choice` `required` or a named function: the JSON schema the call object must match
        (`tools` are those left after the choice), or None when the model may answer in prose."""
        if not tools or choice is None or choice in ("auto", "none"):
            return None
        if self.facts.constraint is None:
            raise BadRequest(f"`tool_choice` {_choice_name(choice)} cannot be honoured: this route's upstream "
                             f"(dialect {self.facts.name}) has no way to constrain a completion",
                             param="tool_choice", code="unsupported_parameter")
        if tool_open is None:
            raise BadRequest(f"`tool_choice` {_choice_name(choice)} cannot be honoured: the route's chat template "
                             "writes tool calls in a form the proxy does not know (it knows <tool_call>)",
                             param="tool_choice", code="unsupported_parameter")
        calls = [_call_schema(t["function"]) for t in tools]
        return calls[0] if len(calls) == 1 else {"anyOf": calls}

    # --- the context remainder --------------------------------------------------------------------

    async def finish(self, plan: Plan, session: aiohttp.ClientSession, url: str,
                     headers: list[tuple[str, str]] | None = None) -> bytes:
        """The body to send: `max_tokens` set to what is left of the context after the prompt,
        learnt from `url`'s server (the one this request goes to). A connect failure is
        raised as it is (the forwarder moves on to the next upstream); anything else is a
        `ContextUnknown` 502 that names the fix."""
        doc = plan.doc
        if plan.auto:
            prompt = doc.get("prompt")
            if not isinstance(prompt, str):
                if plan.auto == CLAMP:  # a token-id or batch prompt (passthrough): sent as the client asked
                    return _encode(doc)
                raise BadRequest("`max_tokens: auto` (the route's body.defaults) needs the prompt as one string",
                                 param="prompt", code="invalid_value")
            count, context = await self._context(session, url, headers or [], prompt, plan.add_special,
                                                 doc.get("model"))
            room = context - count
            if self.facts.context == "tokenize+models":
                room -= 1  # SGLang refuses prompt + max_tokens >= context
            if room < 1:
                raise BadRequest(f"the prompt ({count} tokens) leaves no room in the model's context "
                                 f"({context} tokens)", param="messages", code="context_length_exceeded")
            doc["max_tokens"] = room if plan.auto == FILL else min(doc["max_tokens"], room)
            self.policy.cap(doc)
        return _encode(doc)

    async def _context(self, session: aiohttp.ClientSession, url: str, headers: list[tuple[str, str]], prompt: str,
                       add_special: bool, model: Any) -> tuple[int, int]:
        root = server_root(url)
        hdrs = [(k, v) for k, v in headers if k.lower() not in _LOOKUP_DROPS]
        # No `model`: both servers then tokenize for the model they serve, and a model name only the
        # completions endpoint would refuse is reported by it, not as a failed lookup.
        body = {"prompt": prompt, "add_special_tokens": add_special}
        if self.facts.context is None:
            raise context_unknown(self.route, "the dialect has no tokenizer endpoint")
        try:
            tokenized = await self._get(session, "POST", root, "/tokenize", hdrs, _encode(body), _decode_tokenized)
            context = tokenized.max_model_len
            if self.facts.context == "tokenize+models":
                served = self._served.get(root)
                if served is None:
                    cards = await self._get(session, "GET", root, "/v1/models", hdrs, None, _decode_cards)
                    lens = [c.max_model_len for c in cards.data if c.max_model_len and (c.id == model or not model)]
                    lens = lens or [c.max_model_len for c in cards.data if c.max_model_len]
                    if not lens:
                        raise context_unknown(self.route, "GET /v1/models names no max_model_len")
                    served = self._served[root] = lens[0]
                # The tokenizer's declared length can exceed the context the server runs with.
                context = min(context, served) if context > 0 else served
        except (aiohttp.ClientError, TimeoutError) as exc:
            if connect_failure(exc) is not None:
                raise
            raise context_unknown(self.route, exc) from None
        return tokenized.count, context

    async def _get(self, session: aiohttp.ClientSession, method: str, root: str, path: str,
                   headers: list[tuple[str, str]], data: bytes | None, decode: Any) -> Any:
        hdrs = headers + [("content-type", "application/json")] if data is not None else headers
        response = await send(session, method, root + path, data=data, headers=hdrs, timeout=self.timeout,
                              allow_redirects=False)
        async with response:
            raw = await response.read()
            if response.status != 200:
                hint = ""
                if path == "/tokenize" and response.status == 404:
                    # vLLM and SGLang serve POST /tokenize at the root, llama.cpp too (its own shape):
                    # a server without one speaks some other completions API.
                    hint = (f"; this server has no tokenizer endpoint, so it is not what `dialect: {self.facts.name}` "
                            "says: for a strict OpenAI-compatible server set `dialect: openai` (with "
                            "`body.defaults.max_tokens`), for llama.cpp `dialect: llama.cpp`")
                raise context_unknown(self.route, f"{method} {path} answered {response.status}{hint}")
            try:
                return decode(raw)
            except msgspec.DecodeError as exc:
                raise context_unknown(self.route, f"{method} {path} answered something unexpected: {exc}") from None


def _llama_cpp(doc: dict[str, Any]) -> None:
    """What llama.cpp would refuse or let escape the route's limits, settled before the body policy.

    - `n` is forwarded: llama-server reads it as `n_cmpl` (tools/server/server-schema.cpp, alias `n`)
      and answers that many choices (older builds refused it, "Only one completion choice is
      allowed", a 400 that reaches the client as it is).
    - `n_predict`: `params_from_json_cmpl` (tools/server/server-task.cpp) reads `n_predict` before
      `max_tokens`, so a client's `n_predict` would escape `body.limit.max_tokens`. It is folded into
      `max_tokens` (the smaller positive of the two; a negative `n_predict` is llama.cpp's "unlimited"
      and adds no limit), which the policy then caps.
    """
    if "n_predict" not in doc:
        return
    n_predict = doc.pop("n_predict")
    if n_predict is None:
        return
    if not isinstance(n_predict, int) or isinstance(n_predict, bool):
        raise BadRequest("`n_predict` must be an integer", param="n_predict", code="invalid_value")
    if n_predict > 0:
        current = doc.get("max_tokens")
        doc["max_tokens"] = n_predict if not isinstance(current, int) or current <= 0 else min(current, n_predict)


def server_root(url: str) -> str:
    """`http://h:8000/v1/completions?x` -> `http://h:8000`: where vLLM and SGLang serve `/tokenize`
    (a path prefix before `/v1/completions` is kept; any other path is not the server's)."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    for tail in ("/v1/completions", "/completions"):
        if path.endswith(tail):
            path = path[: -len(tail)]
            break
    else:
        path = ""
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _call_schema(fn: dict[str, Any]) -> dict[str, Any]:
    """The `<tool_call>` body for one function: `{"name": NAME, "arguments": <its parameters>}`."""
    params = fn.get("parameters")
    return {
        "type": "object",
        "properties": {"name": {"enum": [fn["name"]]}, "arguments": params if isinstance(params, dict) else _OBJECT},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _choice_name(choice: Any) -> str:
    if isinstance(choice, dict):
        fn = choice.get("function")
        return f"naming {fn.get('name')!r}" if isinstance(fn, dict) else "(a named function)"
    return repr(choice)
