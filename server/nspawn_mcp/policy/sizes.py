"""IEC byte sizes for policy files.

systemd reads ``1G`` as 2^30 while pydantic's ``ByteSize("1G")`` is 10^9. To keep
operators from guessing, policies accept only explicit IEC units (``512MiB``,
``2GiB``) or a plain integer number of bytes.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer

__all__ = ["ByteCount", "format_iec", "parse_iec"]

_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_PATTERN = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|TiB)?\s*$")


def parse_iec(value: object) -> int:
    """Parse ``"512MiB"`` (or an int of bytes) into bytes; refuse ambiguous units."""
    if isinstance(value, bool):
        raise ValueError("a size must be an IEC string such as '512MiB' or a number of bytes")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError("a size must be an IEC string such as '512MiB' or a number of bytes")
    match = _PATTERN.match(value)
    if match is None:
        raise ValueError(
            f"invalid size {value!r}: use a number of bytes or IEC units B, KiB, MiB, GiB, TiB "
            "(for example '512MiB'); SI units like 'MB' or 'G' are ambiguous and refused"
        )
    number, unit = match.groups()
    return int(number) * _UNITS[unit or "B"]


def format_iec(value: int) -> str:
    """The largest exact IEC rendering of ``value`` (``536870912`` -> ``"512MiB"``)."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        scale = _UNITS[unit]
        if value >= scale and value % scale == 0:
            return f"{value // scale}{unit}"
    return f"{value}B"


ByteCount = Annotated[int, BeforeValidator(parse_iec), PlainSerializer(format_iec, return_type=str)]
"""An int of bytes that policy files spell in IEC units."""
