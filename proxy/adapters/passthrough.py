"""Passthrough: bytes untouched, except `stream` (and `model`) when the route pins them, and `body:`.

With `upstream_model`, the upstream answers with its own model name; the client
gets back the name it asked for, in the JSON body or in every SSE event. A
route's `body:` (defaults, set, remove, limit) edits the JSON that goes
upstream, as on translating routes (`max_tokens: auto` included, finished by
`ready` with the upstream the request goes to). Routes with none of these
never decode a byte.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import msgspec

from ..errors import BadRequest
from ..sse import DONE, DONE_EVENT, SSEDecoder, event
from .call import AdapterBase, CallBase
from .dialects import Dialect, Plan

if TYPE_CHECKING:
    from ..config import RouteConfig

_decode_object = msgspec.json.Decoder(dict[str, Any]).decode
_encode = msgspec.json.Encoder().encode


class _Raw(CallBase):
    """The untouched call: relayed byte for byte."""

    __slots__ = ("body",)
    translates = False
    stream = False

    def __init__(self, body: bytes) -> None:
        self.body = body

    def response(self, body: bytes) -> bytes:
        return body

    def events(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        return chunks


class _Renamed(CallBase):
    """A call whose model was renamed for the upstream: rename it back in the answer."""

    __slots__ = ("body", "stream", "model")
    translates = True

    def __init__(self, body: bytes, stream: bool, model: str) -> None:
        self.body = body
        self.stream = stream
        self.model = model  # the client's name

    def response(self, body: bytes) -> bytes:
        try:
            doc = _decode_object(body)
        except msgspec.DecodeError:
            return body  # not the JSON object we expected: the client gets it as it came
        if "model" not in doc:
            return body
        doc["model"] = self.model
        return _encode(doc)

    async def events(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        decoder = SSEDecoder()
        async for chunk in chunks:
            data = decoder.feed(chunk)
            if data:
                yield b"".join(map(self._event, data))
        data = decoder.close()
        if data:
            yield b"".join(map(self._event, data))

    def _event(self, data: bytes) -> bytes:
        if data == DONE:
            return DONE_EVENT
        try:
            doc = _decode_object(data)
        except msgspec.DecodeError:
            # Not JSON: relay as it came (each line its own `data:` field, as SSE joins them).
            return b"".join(b"data: " + line + b"\n" for line in data.split(b"\n")) + b"\n"
        if "model" in doc:
            doc["model"] = self.model
        return event(doc)


class _Planned:
    """A call whose `max_tokens` is still to be the context remainder (`body.defaults.max_tokens: auto`)."""

    __slots__ = ()
    body: bytes
    plan: Plan
    dialect: Dialect

    async def ready(self, session: Any, url: str, headers: list[tuple[str, str]] | None = None) -> None:
        self.body = await self.dialect.finish(self.plan, session, url, headers)


class _RawPlanned(_Planned, _Raw):
    __slots__ = ("plan", "dialect")

    def __init__(self, plan: Plan, dialect: Dialect) -> None:
        super().__init__(_encode(plan.doc))
        self.plan = plan
        self.dialect = dialect


class _RenamedPlanned(_Planned, _Renamed):
    __slots__ = ("plan", "dialect")

    def __init__(self, plan: Plan, dialect: Dialect, stream: bool, model: str) -> None:
        super().__init__(_encode(plan.doc), stream, model)
        self.plan = plan
        self.dialect = dialect


class Passthrough(AdapterBase):
    def __init__(self, config: RouteConfig) -> None:
        self.mode = config.stream
        self.upstream_model = config.upstream_model
        self.dialect = Dialect(config, translating=False) if config.body is not None else None

    def request(self, body: bytes) -> _Raw | _Renamed:
        if self.mode == "auto" and self.upstream_model is None and (self.dialect is None or not body):
            return _Raw(body)  # the hot path: no JSON work at all (a GET's empty body has nothing to edit)
        try:
            doc = _decode_object(body)
        except msgspec.DecodeError:
            pinned = f"stream: {self.mode}" if self.mode != "auto" else (
                "upstream_model" if self.upstream_model is not None else "body")
            raise BadRequest(
                f"this route sets {pinned}, so the body must be a JSON object",
                code="invalid_json",
            ) from None
        if self.mode != "auto":
            doc["stream"] = self.mode == "always"
        asked = doc.get("model")
        renamed = self.upstream_model is not None and asked is not None
        if renamed:  # named first, so `served.rename` (upstream_model: auto) splices instead of decoding
            del doc["model"]
            doc = {"model": self.upstream_model, **doc}
        renamed = renamed and isinstance(asked, str) and asked != self.upstream_model
        plan = None
        if self.dialect is not None:
            plan = Plan(doc, self.dialect.policy.apply(doc), doc.get("add_special_tokens", True) is not False)
        if plan is not None and plan.auto:
            if renamed:
                return _RenamedPlanned(plan, self.dialect, doc.get("stream") is True, asked)  # type: ignore[arg-type]
            return _RawPlanned(plan, self.dialect)  # type: ignore[arg-type]
        if renamed:
            return _Renamed(_encode(doc), doc.get("stream") is True, asked)  # type: ignore[arg-type]
        return _Raw(_encode(doc))
