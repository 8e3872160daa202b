"""Sizing the image pool: at most 20 GiB, always leaving the host filesystem its reserve."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nspawn_mcp.provision import POOL_MAX_BYTES, POOL_MIN_BYTES, PoolTooSmall, pool_size

GiB = 1 << 30


@pytest.mark.parametrize(
    ("total", "available", "expected"),
    [
        (252 * GiB, 79 * GiB, 20 * GiB),  # this machine: the maximum
        (100 * GiB, 25 * GiB, 15 * GiB),  # a tenth (10 GiB) kept free
        (30 * GiB, 12 * GiB, 7 * GiB),  # 5 GiB kept free: a tenth would be only 3 GiB
        (20 * GiB, 7 * GiB, 2 * GiB),  # just enough
    ],
)
def test_the_pool_takes_what_the_reserve_leaves_up_to_the_maximum(
    total: int, available: int, expected: int
) -> None:
    size = pool_size(total, available)
    assert size.bytes == expected
    assert f"{expected / GiB:.1f} GiB" in size.reason


def test_too_little_room_is_refused_saying_why() -> None:
    message = r"6.5 GiB free; keeping 5.0 GiB.*leaves 1.5 GiB.*at least 2.0 GiB"
    with pytest.raises(PoolTooSmall, match=message):
        pool_size(40 * GiB, 6 * GiB + GiB // 2)


@given(total=st.integers(0, 1 << 50), share=st.floats(0, 1))
def test_the_reserve_always_holds(total: int, share: float) -> None:
    available = int(total * share)
    try:
        size = pool_size(total, available).bytes
    except PoolTooSmall:
        return
    assert POOL_MIN_BYTES <= size <= POOL_MAX_BYTES
    assert size % (1 << 20) == 0
    assert available - size >= max(total // 10, 5 * GiB)
