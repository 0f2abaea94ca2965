"""Server-side bounds on slow or silent HBONE peers (``ambient.hbone.aio``), on loopback with
real mTLS, under asyncio and uvloop, with short timeouts:

* a peer that connects and sends nothing, one that completes TLS but sends no HTTP/2
  preface, and one that trickles its preface are closed by ``handshake_timeout``;
* a CONNECT stream on which no byte moves either way is reset by ``idle_timeout``, and the
  connection, left without streams, is then closed; a stream that keeps trickling bytes is
  not reset (slow is served, only idle is cut);
* ``HBONE_HANDSHAKE_TIMEOUT`` / ``HBONE_IDLE_TIMEOUT`` are parsed like ztunnel's other
  durations.

Each wait is bounded; nothing asserts how fast a bound fired, only that it did.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest
import uvloop
from test_hbone_helpers import CLIENT_ID, SERVER_ID, TD, client_ctx, server_ctx

from ambient.hbone.aio import (
    HboneStream,
    Incoming,
    StreamResetError,
    open_hbone_connection,
    serve_hbone,
)
from ambient.hbone.protocol import ConnectRequest
from ambient.identity import SpiffeId
from ztunnel.config import SettingsError, from_env

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
BOUND = 20.0  # generous: a bound that never fires fails the test instead of hanging it


def run(coro, use_uvloop: bool):  # noqa: ANN001, ANN201
    if use_uvloop:
        return uvloop.run(asyncio.wait_for(coro, 60))
    return asyncio.run(asyncio.wait_for(coro, 60))


class Server:
    """Listens on loopback; serves each accepted socket with ``serve_hbone``."""

    def __init__(self, handshake: float | None, idle: float | None) -> None:
        self.handshake, self.idle = handshake, idle
        self.streams: list[HboneStream] = []
        self.served: list[asyncio.Task[object]] = []

    async def start(self) -> int:
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen()
        self.lsock.setblocking(False)
        self.accepter = asyncio.ensure_future(self._accept())
        return int(self.lsock.getsockname()[1])

    async def _handler(self, req: ConnectRequest, peer: SpiffeId, inc: Incoming) -> None:
        stream = inc.accept()
        self.streams.append(stream)
        got = b""
        try:  # echo whatever comes, until the stream ends either way
            for _ in range(10_000):
                data = await stream.read()
                if not data:
                    break
                got += data
                await stream.write(data)
        except StreamResetError:
            pass

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self.lsock)
            self.served.append(asyncio.ensure_future(serve_hbone(
                sock, server_ctx(), self._handler, trust_domain=TD,
                handshake_timeout=self.handshake, idle_timeout=self.idle)))

    async def stop(self) -> None:
        self.accepter.cancel()
        for t in self.served:
            t.cancel()
        await asyncio.gather(self.accepter, *self.served, return_exceptions=True)
        self.lsock.close()


async def _closed_by_server(reader: asyncio.StreamReader) -> bool:
    try:
        for _ in range(1000):
            if not await asyncio.wait_for(reader.read(65536), BOUND):
                return True
    except TimeoutError:  # before OSError, of which it is a subclass
        return False
    except (ConnectionError, ssl.SSLError, OSError):
        return True
    return False


@pytest.mark.parametrize("use_uvloop", [False, True], ids=["asyncio", "uvloop"])
def test_handshake_timeout_closes_silent_and_slow_peers(use_uvloop: bool) -> None:
    async def main() -> None:
        srv = Server(handshake=0.5, idle=None)
        port = await srv.start()
        try:
            # 1. TCP only: no ClientHello.
            r1, w1 = await asyncio.open_connection("127.0.0.1", port)
            # 2. TLS done, no preface.
            r2, w2 = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx(CLIENT_ID),
                                                   server_hostname="")
            # 3. TLS done, the preface one byte at a time (never all of it in time).
            r3, w3 = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx(CLIENT_ID),
                                                   server_hostname="")

            async def trickle() -> None:
                for b in PREFACE:
                    if w3.is_closing():
                        return
                    w3.write(bytes([b]))
                    await asyncio.sleep(0.2)

            t = asyncio.ensure_future(trickle())
            results = await asyncio.gather(_closed_by_server(r1), _closed_by_server(r2),
                                           _closed_by_server(r3))
            t.cancel()
            for w in (w1, w2, w3):
                w.transport.abort()
            assert results == [True, True, True]
            # A peer that is not slow still gets through with the same settings.
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setblocking(False)
            conn = await open_hbone_connection(sock, client_ctx(CLIENT_ID), trust_domain=TD,
                                               expected=[SERVER_ID])
            s = await conn.open_stream("127.0.0.1:9")
            await s.write(b"ping")
            assert await asyncio.wait_for(s.read(), BOUND) == b"ping"
            conn.close()
        finally:
            await srv.stop()

    run(main(), use_uvloop)


@pytest.mark.parametrize("use_uvloop", [False, True], ids=["asyncio", "uvloop"])
def test_idle_timeout_resets_idle_stream_not_trickling_one(use_uvloop: bool) -> None:
    async def main() -> None:
        srv = Server(handshake=5.0, idle=0.5)
        port = await srv.start()
        try:
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setblocking(False)
            conn = await open_hbone_connection(sock, client_ctx(CLIENT_ID), trust_domain=TD,
                                               expected=[SERVER_ID])
            idle = await conn.open_stream("127.0.0.1:9")
            busy = await conn.open_stream("127.0.0.1:10")
            echoed = b""
            # The busy stream trickles a byte every 0.1 s for 3 s (several idle timeouts).
            for i in range(30):
                await busy.write(bytes([65 + i % 26]))
                await asyncio.sleep(0.1)
                echoed += await asyncio.wait_for(busy.read(), BOUND)
            assert len(echoed) == 30  # served all along
            with pytest.raises(StreamResetError):
                for _ in range(100):
                    if not await asyncio.wait_for(idle.read(), BOUND):
                        break
            busy.close()
            # Now without streams: the server closes the connection.
            await asyncio.wait_for(conn.closed, BOUND)
        finally:
            await srv.stop()

    run(main(), use_uvloop)


def test_timeout_settings_parse() -> None:
    base = {"FAKE_CA": "true", "CA_DIR": "/nonexistent", "LOCAL_XDS": "{}"}
    s = from_env(base)
    assert (s.hbone_handshake_timeout_s, s.hbone_idle_timeout_s) == (15.0, 3600.0)
    s = from_env({**base, "HBONE_HANDSHAKE_TIMEOUT": "2s", "HBONE_IDLE_TIMEOUT": "0"})
    assert (s.hbone_handshake_timeout_s, s.hbone_idle_timeout_s) == (2.0, 0.0)
    assert from_env({**base, "HBONE_IDLE_TIMEOUT": "5m"}).hbone_idle_timeout_s == 300.0
    for bad in ({"HBONE_IDLE_TIMEOUT": "soon"}, {"HBONE_HANDSHAKE_TIMEOUT": "0"},
                {"HBONE_IDLE_TIMEOUT": "-1"}):
        with pytest.raises(SettingsError, match=next(iter(bad))):
            from_env({**base, **bad})
