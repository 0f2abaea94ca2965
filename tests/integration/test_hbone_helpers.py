"""Helpers shared by the HBONE integration tests (certificates, echo server, dialling); no tests."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ambient.ca import CertificateAuthority, WorkloadCertificate
from ambient.hbone.aio import Incoming, relay
from ambient.hbone.protocol import ConnectRequest
from ambient.identity import SpiffeId
from ambient.tls import client_context, server_context

TD = "cluster.local"
CLIENT_ID = SpiffeId(TD, "default", "sleep")
SERVER_ID = SpiffeId(TD, "default", "httpbin")
OTHER_ID = SpiffeId(TD, "other", "impostor")


@dataclass
class Pki:
    ca: CertificateAuthority
    certs: dict[SpiffeId, WorkloadCertificate] = field(default_factory=dict)

    def cert(self, ident: SpiffeId) -> WorkloadCertificate:
        if ident not in self.certs:
            self.certs[ident] = self.ca.issue(ident)
        return self.certs[ident]


_PKI: Pki | None = None


def pki() -> Pki:
    global _PKI
    if _PKI is None:
        _PKI = Pki(CertificateAuthority.generate(TD))
    return _PKI


def server_ctx(ident: SpiffeId = SERVER_ID):
    return server_context(pki().cert(ident))


def client_ctx(ident: SpiffeId = CLIENT_ID):
    return client_context(pki().cert(ident))


async def start_echo() -> tuple[asyncio.Server, int]:
    """A TCP echo server that half-closes after the client does."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(256 * 1024):
                w.write(data)
                await w.drain()
            if w.can_write_eof():
                w.write_eof()
            await w.drain()
        except OSError:
            pass
        finally:
            w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


@dataclass
class Seen:
    requests: list[ConnectRequest] = field(default_factory=list)
    peers: list[SpiffeId] = field(default_factory=list)
    results: list[object] = field(default_factory=list)


def relay_handler(seen: Seen, status: int = 200) -> Callable[..., Awaitable[None]]:
    """HBONE handler: relays to 127.0.0.1:<authority port> on 200, else answers ``status``."""

    async def handler(req: ConnectRequest, peer: SpiffeId, incoming: Incoming) -> None:
        seen.requests.append(req)
        seen.peers.append(peer)
        if status != 200:
            incoming.reject(status)
            return
        try:
            r, w = await asyncio.open_connection("127.0.0.1", req.port, limit=1 << 20)
        except OSError:
            incoming.reject(503)
            return
        stream = incoming.accept()
        seen.results.append(await relay(stream, r, w))

    return handler


async def dial(dst: tuple[object, int]) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (str(dst[0]), dst[1]))
    except BaseException:
        sock.close()
        raise
    return sock


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def transfer(stream, payload: bytes) -> bytes:
    """Write ``payload`` then EOF on an HBONE stream while reading everything back."""

    async def writer() -> None:
        view = memoryview(payload)
        for i in range(0, len(view), 1 << 20):
            await stream.write(view[i : i + (1 << 20)])
        stream.write_eof()

    wt = asyncio.ensure_future(writer())
    out = bytearray()
    while data := await stream.read():
        out += data
    await wt
    return bytes(out)
