from __future__ import annotations

import pytest

from nspawn_mcp.errors import QuotaExceeded
from nspawn_mcp.throttle import Throttle


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_bursts_are_admitted_then_calls_are_refused_until_tokens_refill() -> None:
    clock = Clock()
    throttle = Throttle(rate=10, burst=3, clock=clock)
    for _ in range(3):
        throttle.admit("agent")
    with pytest.raises(QuotaExceeded, match=r"at most 10 per second"):
        throttle.admit("agent")
    throttle.admit("another agent")  # each client has its own bucket
    clock.now += 0.1
    throttle.admit("agent")
    with pytest.raises(QuotaExceeded):
        throttle.admit("agent")


def test_a_zero_rate_turns_throttling_off() -> None:
    throttle = Throttle(rate=0, burst=0)
    for _ in range(10_000):
        throttle.admit("agent")
