"""Talking to a web server through an exposed port, as a user on the host would."""

from __future__ import annotations

import contextlib

import anyio


async def http_get(host: str, port: int) -> bytes:
    """``GET /hello.txt`` over HTTP/1.0; everything the server sends until it closes."""
    async with await anyio.connect_tcp(host, port) as stream:
        await stream.send(b"GET /hello.txt HTTP/1.0\r\nHost: sandbox\r\n\r\n")
        reply = b""
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
            while True:
                reply += await stream.receive()
    return reply


async def answered(host: str, port: int, timeout: float = 30) -> bytes:
    """The web server's reply once it answers 200 (it may not listen yet; bounded wait)."""
    with anyio.fail_after(timeout):
        while True:
            with contextlib.suppress(OSError):
                reply = await http_get(host, port)
                if reply.startswith(b"HTTP/1.0 200"):
                    return reply
            await anyio.sleep(0.05)


async def refused(host: str, port: int) -> bool:
    """Whether nothing accepts a TCP connection there."""
    try:
        stream = await anyio.connect_tcp(host, port)
    except OSError:
        return True
    await stream.aclose()
    return False
