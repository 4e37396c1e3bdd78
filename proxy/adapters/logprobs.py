"""Token logprobs from a completions answer, in the one form every face writes: a list of OpenAI chat
logprob items, `[{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]` (the items of chat's
`logprobs.content`, and of a Responses `output_text`'s `logprobs`).

Servers answer `/v1/completions` logprobs in one of two shapes; the route's dialect says which
(`dialects.Facts.logprobs`):
- `completions`: the legacy lists `tokens`, `token_logprobs`, `top_logprobs` ({token: logprob} per
  token), `text_offset` (vLLM `CompletionLogProbs`, vllm/entrypoints/openai/completion/protocol.py;
  SGLang; OpenAI);
- `chat`: llama.cpp's `{"content": [{id, token, bytes, logprob, top_logprobs: [{id, token, bytes,
  logprob}]}]}` (tools/server/server-task.cpp `completion_token_output::probs_vector_to_json`, used by
  `server_task_result_cmpl_final::to_json_oaicompat` and `..._partial::to_json_oaicompat`), with `prob`
  and `top_probs` instead when the client set `post_sampling_probs`. Its `n_probs` (alias `logprobs`)
  of 0 gives no logprobs at all, so the dialect asks for at least one alternative and `top` trims.
"""

from __future__ import annotations

import math
from typing import Literal

import msgspec

Shape = Literal["completions", "chat"]
NULL = msgspec.Raw(b"null")
# A token the server gave no logprob (vLLM's first prompt token under `echo`): OpenAI's floor.
_FLOOR = -9999.0


class Top(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class Item(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[Top]


class _Legacy(msgspec.Struct):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] | None = None


class _LlamaTop(msgspec.Struct):
    token: str = ""
    bytes: list[int] | None = None
    logprob: float | None = None
    prob: float | None = None  # post_sampling_probs


class _LlamaItem(_LlamaTop):
    top_logprobs: list[_LlamaTop] | None = None
    top_probs: list[_LlamaTop] | None = None  # post_sampling_probs


class _Llama(msgspec.Struct):
    content: list[_LlamaItem] = []


_decode_legacy = msgspec.json.Decoder(_Legacy).decode
_decode_llama = msgspec.json.Decoder(_Llama).decode
_encode = msgspec.json.Encoder().encode


class UnreadableLogprobs(ValueError):
    """The upstream's logprobs are not in the shape its dialect answers."""


def items(raw: msgspec.Raw, shape: Shape, top: int) -> list[Item]:
    """One answer's (or stream event's) logprobs -> chat items, at most `top` alternatives each
    (legacy answers keep theirs as given: vLLM adds the sampled token to the top-N)."""
    try:
        if shape == "chat":
            return [_llama_item(i, top) for i in _decode_llama(raw).content]
        lp = _decode_legacy(raw)
    except msgspec.DecodeError as exc:
        raise UnreadableLogprobs(f"{exc}") from None
    tops = lp.top_logprobs or []
    out = []
    for k, (token, logprob) in enumerate(zip(lp.tokens, lp.token_logprobs, strict=False)):
        alts = tops[k] if k < len(tops) and tops[k] else {}
        out.append(Item(token, _FLOOR if logprob is None else logprob, list(token.encode()),
                        [Top(t, v, list(t.encode())) for t, v in alts.items()]))
    return out


def _llama_item(i: _LlamaItem, top: int) -> Item:
    alts = i.top_logprobs if i.top_logprobs is not None else i.top_probs or []
    return Item(i.token, _logprob(i), i.bytes, [Top(t.token, _logprob(t), t.bytes) for t in alts[:top]])


def _logprob(t: _LlamaTop) -> float:
    if t.logprob is not None:
        return t.logprob
    return math.log(t.prob) if t.prob else _FLOOR


def to_raw(found: list[Item]) -> msgspec.Raw:
    """Items as the JSON a face splices in (`NULL` for none)."""
    return msgspec.Raw(_encode(found)) if found else NULL


def join(raws: list[msgspec.Raw]) -> msgspec.Raw:
    """The items of several events (each a non-empty list from `to_raw`, or `NULL`) as one list, spliced
    without decoding: an answer aggregated from a stream, or a Responses text part's tokens."""
    found = [bytes(raw)[1:-1] for raw in raws if raw != NULL]
    return msgspec.Raw(b"[" + b",".join(found) + b"]") if found else NULL
