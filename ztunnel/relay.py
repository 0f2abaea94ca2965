"""Bidirectional byte copying between two TCP stream pairs, with half-close.

Role: the plain TCP legs of ztunnel (passthrough, inbound plaintext). The copying itself is
``ambient.hbone.tcpleg.splice_tcp``: it takes over both transports and writes each chunk the
event loop reads straight into the other transport (no StreamReader copies, no task per
direction), pausing a source while its sink is above the high-water mark.  Each direction
half-closes the other side at EOF (``write_eof``), so protocols that shut down one direction
first keep working.  Byte counts are kept as they flow, so a connection that fails midway
still records what it carried.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

from ambient.hbone.tcpleg import splice_tcp

Pair = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass
class Copied:
    a_to_b: int = 0
    b_to_a: int = 0
    error: BaseException | None = None


async def relay_streams(a: Pair, b: Pair | socket.socket) -> Copied:
    """Copy a->b and b->a until both directions end or one fails; then close both.

    ``b`` may be a connected socket (the dial to the destination): it is wrapped in a
    transport driven by the relay directly, without a StreamReader/StreamWriter pair."""
    a_to_b, b_to_a, error = await splice_tcp(a, b)
    return Copied(a_to_b, b_to_a, error)
