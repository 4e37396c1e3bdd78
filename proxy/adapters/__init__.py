"""Adapters translate bodies between what the client speaks and what the upstream speaks.

An adapter knows nothing about sockets: `request(body)` returns a `Call`
holding the upstream body and the per-request state needed to translate the
answer (`response(body)` whole, or `events(chunks)` event by event). The contract,
every hook with its default, is in call.py; the adapter names a route file may use, in
registry.py. This file stays light (no face is imported): `dialects.FACTS` and the call
types load without the faces, whose metrics need `observe`, which must not be imported
before `serve` chooses prometheus-client's mode.
"""

from __future__ import annotations

from .call import Adapter, AdapterBase, Call, CallBase

__all__ = ["Adapter", "AdapterBase", "Call", "CallBase"]
