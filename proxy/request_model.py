"""The body's `model`, read without decoding the rest: for routing, metrics and traces.

One reader below the route table, the metrics and the tracer, so none of them imports
another to get it. msgspec decodes only `model` and skips the rest (messages, prompt)
without building objects.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .errors import bad_body


class _Model(msgspec.Struct):
    model: str | None = None


_decode = msgspec.json.Decoder(_Model).decode


class Unread:
    """The type of `UNREAD`: routing did not need the body's `model`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNREAD"


UNREAD = Unread()


def model_of(body: bytes) -> str | None:
    """The body's `model`; None when the body is not JSON (the fallback route, or 404, decides).
    JSON whose `model` is not a string is the client's mistake: 400 naming the field."""
    try:
        return _decode(body).model
    except msgspec.ValidationError as exc:
        raise bad_body(exc) from None
    except msgspec.DecodeError:
        return None


def model_or_none(body: bytes | None) -> str | None:
    """The body's `model` when it is a string, else None, never an error: for labels and
    span names of a request already answered (a bad `model` was refused for it)."""
    if not body:
        return None
    try:
        return _decode(body).model
    except msgspec.DecodeError:  # ValidationError is a DecodeError
        return None


def read_once(meter: Any) -> str | None:
    """`meter.model` as routing read it, else read from `meter.body` now and kept there, so the
    access line, the metric label and the span decode a body at most once between them."""
    model = meter.model
    if model is UNREAD:
        model = meter.model = model_or_none(meter.body)
    return model
