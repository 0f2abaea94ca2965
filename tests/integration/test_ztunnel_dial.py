"""``ztunnel.sockets.connect``: the dial ztunnel uses instead of ``loop.sock_connect`` (no
resolver, no thread pool), on loopback, under uvloop (as ztunnel runs) and asyncio's own
loop: it connects, reports a refusal and a timeout with the right exception, and leaves the
loop's watchers clean."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import uvloop

from ztunnel.sockets import connect

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_factory(request: pytest.FixtureRequest) -> LoopFactory:
    return uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop


def _run(factory: LoopFactory, coro_fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(asyncio.wait_for(coro_fn(), 20))


def _client() -> socket.socket:
    s = socket.socket()
    s.setblocking(False)
    return s


async def _dial_again(loop: asyncio.AbstractEventLoop) -> None:
    """A new dial (its socket likely gets the closed one's fd number) still completes: the
    failed dial left no watcher behind."""
    other = socket.create_server(("127.0.0.1", 0))
    other.setblocking(False)
    t = _client()
    try:
        await connect(t, other.getsockname(), 5.0)
        conn, _ = await loop.sock_accept(other)
        conn.close()
    finally:
        t.close()
        other.close()


@contextlib.contextmanager
def _silent_listener() -> Iterator[tuple[str, int]]:
    """An address whose SYNs go unanswered: a listener never accepting, its queue filled."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    fillers = [_client() for _ in range(3)]
    try:
        for f in fillers:
            f.connect_ex(srv.getsockname())
        yield srv.getsockname()
    finally:
        for f in fillers:
            f.close()
        srv.close()


def test_connects_and_the_socket_carries_bytes(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        srv = socket.create_server(("127.0.0.1", 0))
        srv.setblocking(False)
        s = _client()
        try:
            await connect(s, srv.getsockname(), 5.0)
            conn, _ = await asyncio.get_running_loop().sock_accept(srv)
            with conn:
                await asyncio.get_running_loop().sock_sendall(s, b"ping")
                assert await asyncio.get_running_loop().sock_recv(conn, 4) == b"ping"
        finally:
            s.close()
            srv.close()

    _run(loop_factory, main)


def test_refused_raises_connection_refused(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        addr = probe.getsockname()
        probe.close()  # nothing listens there now
        s = _client()
        try:
            with pytest.raises(ConnectionRefusedError) as info:
                await connect(s, addr, 5.0)
            assert info.value.errno == errno.ECONNREFUSED
            assert f"{addr[0]}:{addr[1]}" in str(info.value)
        finally:
            s.close()

    _run(loop_factory, main)


def test_no_answer_raises_timeout_and_the_fd_is_reusable(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        s = _client()
        try:
            with _silent_listener() as addr, pytest.raises(TimeoutError):
                await connect(s, addr, 0.3)
            s.close()
            await _dial_again(asyncio.get_running_loop())
        finally:
            s.close()

    _run(loop_factory, main)


def test_cancelled_dial_removes_its_watch(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        s = _client()
        try:
            with _silent_listener() as addr:
                task = asyncio.ensure_future(connect(s, addr, 30.0))
                await asyncio.sleep(0.05)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            s.close()
            await _dial_again(asyncio.get_running_loop())
        finally:
            s.close()

    _run(loop_factory, main)
