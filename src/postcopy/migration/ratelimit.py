"""A token bucket for bandwidth limits (``--max-bandwidth`` for precopy,
``--max-postcopy-bandwidth`` for the pusher; demand pages are never throttled)."""
from __future__ import annotations

import threading
import time


class RateLimiter:
    """At most ``rate`` bytes/s on average, bursts up to ``burst`` bytes. A rate of 0
    means no limit. ``consume(n)`` blocks until ``n`` bytes may go."""

    def __init__(self, rate: float, burst: int = 1 << 20) -> None:
        if rate < 0:
            raise ValueError("a bandwidth limit must be >= 0")
        self.rate = float(rate)
        self.burst = max(burst, 1)
        self._tokens = float(self.burst)
        self._stamp = time.monotonic()
        self._lock = threading.Lock()
        self.waited_s = 0.0  # total time spent held back

    def consume(self, nbytes: int) -> None:
        if self.rate <= 0 or nbytes <= 0:
            return
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= nbytes
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
            self.waited_s += wait
        if wait > 0:
            time.sleep(wait)
