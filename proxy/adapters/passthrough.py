"""Passthrough: bytes untouched, except `stream` (and `model`) when the route pins them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec

from ..config import RouteConfig
from ..errors import BadRequest

_decode_object = msgspec.json.Decoder(dict[str, Any]).decode
_encode = msgspec.json.Encoder().encode


class _Raw:
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


class Passthrough:
    def __init__(self, config: RouteConfig) -> None:
        self.mode = config.stream
        self.upstream_model = config.upstream_model

    def request(self, body: bytes) -> _Raw:
        if self.mode == "auto" and self.upstream_model is None:
            return _Raw(body)  # the hot path: no JSON work at all
        try:
            doc = _decode_object(body)
        except msgspec.DecodeError:
            raise BadRequest(
                f"this route sets stream: {self.mode}, so the body must be a JSON object",
                code="invalid_json",
            ) from None
        if self.mode != "auto":
            doc["stream"] = self.mode == "always"
        if self.upstream_model is not None and "model" in doc:
            doc["model"] = self.upstream_model
        return _Raw(_encode(doc))
