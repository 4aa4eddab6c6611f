"""A token bucket: how hostile traffic is kept from turning into as much work or traffic of ours.

The classic token bucket (as in traffic shaping, RFC 2697's committed burst): ``rate`` tokens a
second refill a bucket of ``burst``; each event takes one token or is refused. The clock is
injectable so tests need no sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """At most ``burst`` events at once and ``rate`` a second on average."""

    def __init__(
        self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"token bucket: rate must be > 0 and burst ≥ 1, got {rate}, {burst}")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._at = clock()
        self.refused = 0
        """Events refused since the bucket was made."""

    def take(self) -> bool:
        """Take a token: True when the event may go ahead."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        self.refused += 1
        return False
