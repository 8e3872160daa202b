from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    # dbus-fast is asyncio-only, so the whole project runs anyio on asyncio.
    return "asyncio"
