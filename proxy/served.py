"""`upstream_model: auto`: the model name a route's upstream serves, learnt from its `GET /v1/models`.

vLLM answers 404 "The model `X` does not exist" to a name it does not serve (its
`--served-model-name`, else the model path), so a route must send that exact name. Both
servers list it: vLLM's `OpenAIServingModels.show_available_models`
(`vllm/entrypoints/openai/models/serving.py`) returns one card per served name, plus one per
LoRA adapter; llama.cpp's server (`tools/server/server-context.cpp`, the models handler)
returns `{"models": [...], "object": "list", "data": [{"id": <alias or model path>, ...}]}`,
one entry, several in router mode. `auto` uses the name when the list has exactly one, and
answers a clear 502 otherwise (several: set one of them; none, or no such endpoint: set it).

The list is kept per server for `TTL` seconds (a restarted server may serve another name);
a failed lookup is not kept, so the next request asks again.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec

from .errors import UpstreamBroken, connect_failure
from .upstreams import models_url

if TYPE_CHECKING:
    from .routes import Route

AUTO = "auto"  # the `upstream_model:` value that asks the upstream
TTL = 60.0  # seconds a server's model list is reused
TIMEOUT = 5.0  # seconds to wait for it


class _Card(msgspec.Struct):
    id: Any = None


class _Cards(msgspec.Struct):
    data: list[_Card] = []


_decode_cards = msgspec.json.Decoder(_Cards).decode
_decode_object = msgspec.json.Decoder(dict[str, Any]).decode
_encode = msgspec.json.Encoder().encode
_cache: dict[tuple[str, Any], tuple[float, tuple[str, ...]]] = {}  # (models URL, headers) -> (when, ids)


class UpstreamModelUnknown(UpstreamBroken):
    """`upstream_model: auto` could not tell which model the upstream serves."""

    code = "upstream_model_unknown"
    kind = "non_2xx"


async def listed(session: aiohttp.ClientSession, url: str, route: Route, timeout: float = TIMEOUT) -> tuple[str, ...]:
    """The ids `GET /v1/models` lists on the server of upstream `url`, asked with the route's
    `default_headers` (cached). A connect failure is raised as it is (the forwarder moves on to
    the next upstream); anything else is an `UpstreamModelUnknown` naming the route and the fix."""
    where = models_url(url)
    key = (where, tuple(route.defaults))
    hit = _cache.get(key)
    now = time.monotonic()
    if hit is not None and now - hit[0] < TTL:
        return hit[1]
    hdrs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in route.defaults]
    name = route.name
    try:
        async with session.get(where, headers=hdrs, allow_redirects=False,
                               timeout=aiohttp.ClientTimeout(total=timeout)) as response:  # fmt: skip
            raw = await response.read()
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        if connect_failure(exc) is not None:
            raise
        raise _unknown(name, f"GET {where} failed: {type(exc).__name__}") from None
    if status == 404:
        raise _unknown(name, f"GET {where} answered 404: not an OpenAI-compatible server")
    if status != 200:
        raise _unknown(name, f"GET {where} answered {status}")
    try:
        ids = tuple(c.id for c in _decode_cards(raw).data if isinstance(c.id, str) and c.id)
    except msgspec.DecodeError:
        raise _unknown(name, f"GET {where} did not answer an OpenAI model list") from None
    _cache[key] = (now, ids)
    return ids


async def model(session: aiohttp.ClientSession, url: str, route: Route) -> str:
    """The one model the server of `url` serves."""
    ids = await listed(session, url, route)
    if len(ids) == 1:
        return ids[0]
    if not ids:
        raise _unknown(route.name, f"{models_url(url)} lists no model")
    shown = ", ".join(repr(i) for i in ids[:10]) + (", …" if len(ids) > 10 else "")
    raise _unknown(route.name, f"{models_url(url)} lists {len(ids)} models ({shown}); `auto` needs exactly one")


_HEAD = b'{"model":"'  # how the bodies the proxy builds begin (dialects.build, passthrough: `model` first)


def rename(body: bytes, name: str) -> bytes:
    """The upstream body with its `model` set to `name` (bodies that are not a JSON object, or
    carry no `model`, are sent as they are).

    A body that names its model first, with no escape in the name, has the name spliced in: an
    agent's prompt of 100 KB is copied, not decoded and encoded again (~40 µs) on every attempt.
    The first unescaped `"` after the head ends the name: inside a JSON string every `"` is
    escaped, and an escape is refused to the fast path. Any other body is decoded."""
    if body.startswith(_HEAD):
        end = body.find(b'"', len(_HEAD))
        if end > 0 and b"\\" not in body[len(_HEAD):end]:
            return b'{"model":' + _encode(name) + body[end + 1:]
    try:
        doc = _decode_object(body)
    except msgspec.DecodeError:
        return body
    if "model" not in doc:
        return body
    doc["model"] = name
    return _encode(doc)


def _unknown(route: str, why: str) -> UpstreamModelUnknown:
    return UpstreamModelUnknown(
        f"route {route!r} has `upstream_model: auto` but cannot learn the model its upstream serves ({why}); "
        "set `upstream_model:` to the name the server serves (vLLM's --served-model-name, llama.cpp's --alias)")
