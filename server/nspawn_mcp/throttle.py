"""Per-client rate limiting of tool calls: a token bucket per MCP client name (pure)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import QuotaExceeded

__all__ = ["Throttle"]


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class Throttle:
    """``rate`` calls per second on average, bursts of up to ``burst``; ``rate <= 0`` disables it."""

    rate: float
    burst: float
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def admit(self, client: str) -> None:
        """Take one call's token for ``client`` or refuse the call."""
        if self.rate <= 0:
            return
        now = self.clock()
        bucket = self._buckets.setdefault(client, _Bucket(tokens=self.burst, updated=now))
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens < 1:
            raise QuotaExceeded(
                f"too many calls: at most {self.rate:g} per second (bursts of {self.burst:g}); "
                "slow down and retry"
            )

        bucket.tokens -= 1
