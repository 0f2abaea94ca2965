"""Callback relays (``ambient.hbone.tcpleg``) over real loopback sockets and real mTLS:
large transfers both ways with half-close, exact byte counts, bytes the StreamReader had
buffered before the takeover, and a reset in the middle. Both event loops."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import socket
import struct
from collections.abc import Awaitable, Callable

import pytest
import uvloop
from test_hbone_helpers import (
    CLIENT_ID,
    SERVER_ID,
    TD,
    client_ctx,
    dial,
    server_ctx,
    start_echo,
    transfer,
)

from ambient.hbone.aio import Incoming, RelayResult, start_hbone_server
from ambient.hbone.pool import HbonePool, PoolKey
from ambient.hbone.protocol import ConnectRequest
from ambient.hbone.tcpleg import Accepted, splice_hbone, splice_hbone_socket, splice_tcp
from ambient.identity import SpiffeId

LOOPS = pytest.mark.parametrize("use_uvloop", [False, True], ids=["asyncio", "uvloop"])


def run(coro, *, use_uvloop: bool):
    if use_uvloop:
        return uvloop.run(asyncio.wait_for(coro, 120))
    return asyncio.run(asyncio.wait_for(coro, 120))


async def tcp_relay(upstream_port: int, results: list, *, preamble: bool = False,
                    sock: bool = False):
    """A TCP relay server in front of 127.0.0.1:upstream_port using splice_tcp (the
    upstream as a connected socket with ``sock``, else as a stream pair)."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if preamble:  # consume one line, leaving what followed it in the reader's buffer
            await r.readline()
        if sock:
            up: object = await dial(("127.0.0.1", upstream_port))
        else:
            up = await asyncio.open_connection("127.0.0.1", upstream_port)
        results.append(await splice_tcp((r, w), up))  # type: ignore[arg-type]

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


async def echo_through(port: int, payload: bytes, first: bytes = b"") -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        w.write(first + payload[: 1 << 16])
        for i in range(1 << 16, len(payload), 1 << 20):
            w.write(payload[i: i + (1 << 20)])
            await w.drain()
        w.write_eof()

    t = asyncio.ensure_future(send())
    back = bytearray()
    while data := await r.read(1 << 20):
        back += data
    await t
    w.close()
    return bytes(back)


async def hbone_server_and_pool(handler: Callable[..., Awaitable[None]]):
    """An mTLS HBONE server on loopback running ``handler``, and a client pool with the key
    that reaches it."""
    srv = await start_hbone_server(handler, server_ctx(), trust_domain=TD, host="127.0.0.1")
    hport = srv.sockets[0].getsockname()[1]

    async def ctx_for(_ident: SpiffeId):
        return client_ctx(CLIENT_ID)

    pool = HbonePool(dial, ctx_for, trust_domain=TD)
    key = PoolKey(CLIENT_ID, frozenset({SERVER_ID}), None,
                  (ipaddress.IPv4Address("127.0.0.1"), hport))
    return srv, pool, key


async def wait_for_results(results: list) -> None:
    for _ in range(500):
        if results:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the relay never finished")


@LOOPS
def test_splice_tcp_large_transfer_half_close_and_counts(use_uvloop: bool) -> None:
    async def main() -> None:
        echo, echo_port = await start_echo()
        results: list = []
        srv, port = await tcp_relay(echo_port, results)
        try:
            payload = os.urandom(12 * 1024 * 1024)
            back = await echo_through(port, payload)
            assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
            await wait_for_results(results)
            a_to_b, b_to_a, err = results[0]
            assert err is None and a_to_b == len(payload) and b_to_a == len(payload)
        finally:
            srv.close()
            echo.close()

    run(main(), use_uvloop=use_uvloop)


@LOOPS
def test_splice_tcp_relays_bytes_buffered_before_takeover(use_uvloop: bool) -> None:
    async def main() -> None:
        echo, echo_port = await start_echo()
        results: list = []
        srv, port = await tcp_relay(echo_port, results, preamble=True)
        try:
            payload = b"early bytes" * 1000
            back = await echo_through(port, payload, first=b"hello\n")
            assert back == payload
            await wait_for_results(results)
            assert results[0][0] == len(payload) and results[0][2] is None
        finally:
            srv.close()
            echo.close()

    run(main(), use_uvloop=use_uvloop)


@LOOPS
def test_splice_tcp_upstream_reset_is_an_error_and_closes_both(use_uvloop: bool) -> None:
    async def main() -> None:
        got = asyncio.get_running_loop().create_future()

        async def resetting(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            data = await r.read(1000)
            sock = w.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()  # RST
            got.set_result(len(data))

        up = await asyncio.start_server(resetting, "127.0.0.1", 0)
        results: list = []
        srv, port = await tcp_relay(up.sockets[0].getsockname()[1], results)
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"x" * 100)
            await got
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(r.readexactly(1), 10)  # EOF or reset, never data
            await wait_for_results(results)
            a_to_b, b_to_a, err = results[0]
            assert err is not None and a_to_b == 100 and b_to_a == 0
            w.close()
        finally:
            srv.close()
            up.close()

    run(main(), use_uvloop=use_uvloop)


@LOOPS
def test_splice_hbone_large_transfer_over_mtls(use_uvloop: bool) -> None:
    async def main() -> None:
        echo, echo_port = await start_echo()
        results: list[RelayResult] = []

        async def handler(req: ConnectRequest, peer: SpiffeId, incoming: Incoming) -> None:
            r, w = await asyncio.open_connection("127.0.0.1", req.port)
            results.append(await splice_hbone(incoming.accept(), (r, w)))

        srv, pool, key = await hbone_server_and_pool(handler)
        try:
            stream = await pool.connect(key, f"127.0.0.1:{echo_port}")
            payload = os.urandom(24 * 1024 * 1024)
            back = await transfer(stream, payload)
            assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
            await wait_for_results(results)
            res = results[0]
            assert res.error is None
            assert res.to_stream == len(payload) and res.from_stream == len(payload)
        finally:
            await pool.close()
            srv.close()
            echo.close()

    run(main(), use_uvloop=use_uvloop)


SOCK = pytest.mark.parametrize("as_socket", [False, True], ids=["pair", "socket"])


@LOOPS
@SOCK
def test_splice_tcp_to_a_socket_large_transfer(use_uvloop: bool, as_socket: bool) -> None:
    async def main() -> None:
        echo, echo_port = await start_echo()
        results: list = []
        srv, port = await tcp_relay(echo_port, results, preamble=True, sock=as_socket)
        try:
            payload = os.urandom(6 * 1024 * 1024)
            back = await echo_through(port, payload, first=b"hi\n")
            assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
            await wait_for_results(results)
            assert results[0] == (len(payload), len(payload), None)
        finally:
            srv.close()
            echo.close()

    run(main(), use_uvloop=use_uvloop)


async def start_banner(banner: bytes) -> tuple[asyncio.Server, int]:
    """A server that speaks first (a banner at once), then echoes and half-closes."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(banner)
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.write_eof()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


@LOOPS
def test_splice_tcp_socket_keeps_a_banner_and_early_client_bytes(use_uvloop: bool) -> None:
    async def main() -> None:
        banner = b"220 ready " * 5000
        up, up_port = await start_banner(banner)
        results: list = []
        srv, port = await tcp_relay(up_port, results, sock=True)
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"early" * 1000)  # before the relay has even dialled upstream
            w.write_eof()
            got = bytearray()
            while data := await asyncio.wait_for(r.read(65536), 30):
                got += data
            assert bytes(got) == banner + b"early" * 1000
            await wait_for_results(results)
            assert results[0] == (5000, len(banner) + 5000, None)
            w.close()
        finally:
            srv.close()
            up.close()

    run(main(), use_uvloop=use_uvloop)


@LOOPS
def test_splice_hbone_socket_over_mtls_with_a_server_first_app(use_uvloop: bool) -> None:
    async def main() -> None:
        banner = b"* OK hello\r\n" * 3000
        app, app_port = await start_banner(banner)
        results: list[RelayResult] = []

        async def handler(req: ConnectRequest, peer: SpiffeId, incoming: Incoming) -> None:
            sock = await dial(("127.0.0.1", req.port))
            await asyncio.sleep(0.05)  # the banner is waiting in the socket before the relay
            results.append(await splice_hbone_socket(incoming.accept(), sock))

        srv, pool, key = await hbone_server_and_pool(handler)
        try:
            stream = await pool.connect(key, f"127.0.0.1:{app_port}")
            payload = os.urandom(8 * 1024 * 1024)
            back = await transfer(stream, payload)
            assert back[:len(banner)] == banner
            assert hashlib.sha256(back[len(banner):]).digest() == hashlib.sha256(payload).digest()
            await wait_for_results(results)
            res = results[0]
            assert res.error is None
            assert res.to_stream == len(banner) + len(payload) and res.from_stream == len(payload)
        finally:
            await pool.close()
            srv.close()
            app.close()

    run(main(), use_uvloop=use_uvloop)


@LOOPS
def test_accepted_leaves_bytes_in_the_kernel_until_a_relay_takes_over(use_uvloop: bool) -> None:
    # Both loops start reading after connection_made and ignore a pause made inside it;
    # Accepted must still hold later bytes in the kernel (a kernel splice relies on it) and
    # hand everything, early bytes included, to the relay that takes over.
    async def main() -> None:
        loop = asyncio.get_running_loop()
        conns: list[Accepted] = []

        class Conn(Accepted):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                conns.append(self)

        srv = await loop.create_server(Conn, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        up_srv, up_port = await start_echo()
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"early ")
            for _ in range(100):
                if conns:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            w.write(b"late\n")
            await w.drain()
            await asyncio.sleep(0.2)
            conn = conns[0]
            fd = conn.transport.get_extra_info("socket").fileno()
            with socket.socket(fileno=os.dup(fd)) as peek:
                queued = len(peek.recv(100, socket.MSG_PEEK | socket.MSG_DONTWAIT))
            assert queued >= len(b"late\n"), (queued, bytes(conn.pending))
            assert b"late" not in conn.pending
            up = socket.create_connection(("127.0.0.1", up_port))
            up.setblocking(False)
            relay = asyncio.create_task(splice_tcp(conn, up))
            assert await r.readline() == b"early late\n"
            w.close()
            await relay
        finally:
            srv.close()
            up_srv.close()

    run(main(), use_uvloop=use_uvloop)
