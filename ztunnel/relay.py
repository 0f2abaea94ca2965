"""Bidirectional byte copying between two asyncio stream pairs, with half-close.

Each direction copies with large reads until EOF, then half-closes the other side
(``write_eof``), so protocols that shut down one direction first keep working.  Returns
the byte counts so the connection's result can record them.
"""

from __future__ import annotations

import asyncio
import contextlib

READ_SIZE = 256 * 1024


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    total = 0
    try:
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                break
            writer.write(data)
            total += len(data)
            if writer.transport.get_write_buffer_size() > READ_SIZE:
                await writer.drain()
        if writer.can_write_eof() and not writer.is_closing():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()
        raise
    return total


async def relay_streams(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
) -> tuple[int, int]:
    """Copy a->b and b->a until both directions end; returns (a_to_b, b_to_a) bytes."""
    counts = [0, 0]

    async def one(i: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        counts[i] = await pipe(r, w)

    tasks = [asyncio.ensure_future(one(0, a[0], b[1])), asyncio.ensure_future(one(1, b[0], a[1]))]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            exc = t.exception()
            if exc is not None:
                raise exc
        await asyncio.gather(*pending)
    finally:
        for t in tasks:
            t.cancel()
        for _, w in (a, b):
            w.close()
        for _, w in (a, b):
            with contextlib.suppress(Exception):
                await w.wait_closed()
    return counts[0], counts[1]
