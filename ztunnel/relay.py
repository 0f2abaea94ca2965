"""Bidirectional byte copying between two asyncio stream pairs, with half-close.

Each direction copies with large reads until EOF, then half-closes the other side
(``write_eof``), so protocols that shut down one direction first keep working.  Byte counts
are kept as they flow, so a connection that fails midway still records what it carried.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

READ_SIZE = 256 * 1024
Pair = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass
class Copied:
    a_to_b: int = 0
    b_to_a: int = 0
    error: BaseException | None = None


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                out: Copied, forward: bool) -> None:
    while True:
        data = await reader.read(READ_SIZE)
        if not data:
            break
        writer.write(data)
        if forward:
            out.a_to_b += len(data)
        else:
            out.b_to_a += len(data)
        if writer.transport.get_write_buffer_size() > READ_SIZE:
            await writer.drain()
    await writer.drain()
    if writer.can_write_eof() and not writer.is_closing():
        writer.write_eof()


async def relay_streams(a: Pair, b: Pair) -> Copied:
    """Copy a->b and b->a until both directions end or one fails; then close both."""
    out = Copied()
    tasks = [asyncio.ensure_future(_pipe(a[0], b[1], out, True)),
             asyncio.ensure_future(_pipe(b[0], a[1], out, False))]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                out.error = t.exception()
                for _, w in (a, b):
                    w.transport.abort()
                break
        else:
            await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _, w in (a, b):
            w.close()
        for _, w in (a, b):
            with contextlib.suppress(Exception):
                await w.wait_closed()
    return out
