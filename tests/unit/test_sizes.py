from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nspawn_mcp.policy.sizes import format_iec, parse_iec


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MiB", 512 << 20),
        ("2GiB", 2 << 30),
        ("1KiB", 1024),
        ("17B", 17),
        ("4096", 4096),
        (4096, 4096),
        (" 1 TiB ", 1 << 40),
    ],
)
def test_iec_sizes_parse_to_bytes(text: object, expected: int) -> None:
    assert parse_iec(text) == expected


@pytest.mark.parametrize("text", ["1G", "1GB", "512M", "1.5GiB", "-1", "", "lots", True, 1.5, -3])
def test_ambiguous_or_malformed_sizes_are_refused(text: object) -> None:
    with pytest.raises(ValueError, match=r"size"):
        parse_iec(text)


@given(st.integers(min_value=0, max_value=1 << 50))
def test_formatting_round_trips(value: int) -> None:
    assert parse_iec(format_iec(value)) == value
