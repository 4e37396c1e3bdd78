"""A route's `retry:` compiled, and `Retry-After` read (RFC 9110 §10.2.3: seconds or an HTTP date).

The forwarder's `_send` asks `RetryPolicy.decide` after each failed try, while
nothing has gone to the client yet: the answer is how long to wait and
whether to move to the next upstream, or None to give the client this
answer. The wait is never longer than `max_wait`: a longer `Retry-After` means
the upstream asked for more patience than the operator allows, so its answer
goes to the client at once, `Retry-After` included.
"""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime

from .config import Retry

SAME_UPSTREAM_WAIT = 1.0  # seconds before trying the same upstream again when it named no Retry-After


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """`Retry-After` as seconds from now (0 for a date in the past); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; parsedate gives naive for "-0000"
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class RetryPolicy:
    """What `retry:` allows, in the shape the forwarder's loop asks."""

    __slots__ = ("attempts", "statuses", "connect", "timeout", "max_wait")

    def __init__(self, config: Retry) -> None:
        self.attempts = config.attempts
        self.statuses = frozenset(w for w in config.when if isinstance(w, int))
        self.connect = "connect" in config.when
        self.timeout = "timeout" in config.when
        self.max_wait = config.max_wait

    def wait_for(self, retry_after: str | None, same_upstream: bool) -> float | None:
        """Seconds to wait before the next try, or None: do not retry (the wait asked is too long).

        Another upstream is tried at once; the same one after its `Retry-After`, or after
        `SAME_UPSTREAM_WAIT` when it named none (never longer than `max_wait`).
        """
        if not same_upstream:
            return 0.0
        asked = retry_after_seconds(retry_after)
        if asked is None:
            return min(SAME_UPSTREAM_WAIT, self.max_wait)
        return asked if asked <= self.max_wait else None
