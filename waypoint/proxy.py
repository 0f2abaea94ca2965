"""The waypoint's data path: HBONE in on 15008, HTTP or TCP inside each tunnel, HBONE out.

Role: ``WaypointProxy`` accepts mTLS connections (the waypoint's own certificate, fetched per
connection so rotation applies), terminates HBONE CONNECTs and resolves each ``:authority``
(the client's original destination) in the mesh model: a service VIP:port (the usual case) or
a workload IP:port. The port's protocol decides what runs inside the tunnel:

* TCP: an L4 proxy, one endpoint per tunnel, bytes relayed both ways (``istio_tcp_*``).
* HTTP: the first bytes are sniffed (the h2c prior-knowledge preface ``PRI * HTTP/2.0``
  means HTTP/2, anything else HTTP/1.1) and every request goes through ``Exchange``.

Answers to the CONNECT follow ztunnel: 503 when the destination is unknown (a malformed
authority is refused with 400 by the HBONE layer); while draining, a CONNECT on a live
connection is refused unprocessed (REFUSED_STREAM), so the client retries it elsewhere. The
peer's SPIFFE identity (the source workload, through its ztunnel) and the original client
address (``forwarded: for=``, else the peer address) describe the source of every request.

Invariants: one task per tunnel, tracked for drain; ``drain(deadline)`` stops accepting at once
and aborts what is still open at the deadline; nothing a peer sends can raise out of a tunnel
task.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from ambient.certs import CertificateManager
from ambient.hbone.aio import HboneConnectError, HboneStream, Incoming, serve_hbone
from ambient.hbone.protocol import ConnectRequest, HboneSettings
from ambient.identity import SpiffeId
from ambient.model import Service, Workload
from ambient.store import Endpoint, MeshState
from waypoint.exchange import Exchange, Tunnel
from waypoint.h1 import Limits, serve_h1
from waypoint.h2conn import PREFACE, H2Conn
from waypoint.message import HttpRequest, HttpResponse
from waypoint.state import Snapshot, WaypointState
from waypoint.telemetry import TcpRecord, WaypointMetrics
from waypoint.upstream import UpstreamError, Upstreams, endpoint_addr

__all__ = ["WaypointProxy", "resolve_target", "sniff_protocol"]

log = logging.getLogger("waypoint.proxy")

_FORWARDED_FOR = re.compile(r'for="?\[?([0-9A-Fa-f.:]+?)\]?(?::(\d+))?"?(?:;|,|$)')


def sniff_protocol(prefix: bytes) -> str | None:
    """``"h2"`` / ``"http/1.1"`` from the first bytes, or None if more are needed (pure)."""
    n = min(len(prefix), len(PREFACE))
    if prefix[:n] != PREFACE[:n]:
        return "http/1.1"
    return "h2" if n == len(PREFACE) else None


def parse_forwarded_for(value: str | None) -> tuple[str, int] | None:
    """The ``for=`` address of an HBONE ``forwarded`` header (pure; None if unusable)."""
    if not value:
        return None
    m = _FORWARDED_FOR.search(value)
    if m is None:
        return None
    try:
        ip = str(ipaddress.ip_address(m.group(1)))
    except ValueError:
        return None
    return ip, int(m.group(2) or 0)


def resolve_target(
    mesh: MeshState, network: str, ip: str, port: int
) -> tuple[Service | None, Workload | None]:
    """(service, workload) addressed by ``ip:port``: a VIP declaring the port, else a workload
    address; (None, None) when the mesh does not know it (pure)."""
    svc = mesh.service_by_vip(network, ip)
    if svc is not None and port in svc.ports:
        return svc, None
    wl = mesh.workload_by_address(network, ip)
    return None, wl


def workload_port_protocol(snap: Snapshot, wl: Workload, port: int) -> str:
    """The protocol of a workload-addressed port: from a service mapping a port onto it."""
    for key, ports in wl.services.items():
        svc = snap.mesh.service_by_key(key)
        for sport, target in ports.items():
            if target == port or (svc is not None and svc.ports.get(sport) == port):
                return snap.protocol(key, sport)
    return "tcp"


class WaypointProxy:
    """The waypoint's listeners and tunnels; see the module docstring."""

    def __init__(
        self,
        state: WaypointState,
        certs: CertificateManager,
        identity: SpiffeId,
        upstreams: Upstreams,
        exchange: Exchange,
        metrics: WaypointMetrics | None = None,
        *,
        network: str = "",
        limits: Limits | None = None,
        hbone: HboneSettings | None = None,
    ) -> None:
        self.state = state
        self.certs = certs
        self.identity = identity
        self.upstreams = upstreams
        self.exchange = exchange
        self.metrics = metrics
        self.network = network
        self.limits = limits or Limits()
        self.hbone = hbone
        self.draining = False
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- listener ---------------------------------------------------------------------------

    async def start(self, host: str = "0.0.0.0", port: int = 15008) -> tuple[str, int]:
        """Listen for HBONE; returns the bound address."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        lsock = socket.socket(family, socket.SOCK_STREAM)
        try:
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lsock.bind((host, port))
            lsock.listen(1024)
            lsock.setblocking(False)
        except OSError as e:
            lsock.close()
            raise OSError(e.errno, f"waypoint cannot listen for HBONE on {host}:{port}: "
                          f"{e.strerror} (is another waypoint running?)") from e
        self._listener = lsock
        self._accepting = asyncio.ensure_future(self._accept_loop(lsock))
        addr = lsock.getsockname()
        return addr[0], addr[1]

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(lsock)
            except OSError as e:
                if self.draining:
                    return
                log.warning("accept on the HBONE port failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            task = asyncio.ensure_future(self._serve_socket(sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve_socket(self, sock: socket.socket) -> None:
        if self.draining:
            sock.close()
            return
        try:
            ctx: ssl.SSLContext = await self.certs.server_ctx(self.identity)
        except Exception as e:
            log.error("no certificate for %s yet, refusing a connection: %s", self.identity, e)
            sock.close()
            return
        try:
            await serve_hbone(sock, ctx, self._on_connect,
                              trust_domain=self.identity.trust_domain, settings=self.hbone)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # handshake or identity failure
            log.info("inbound HBONE connection failed: %s", e)
            with contextlib.suppress(OSError):
                sock.close()

    # -- tunnels ------------------------------------------------------------------------------

    async def _on_connect(self, req: ConnectRequest, peer: SpiffeId, incoming: Incoming
                          ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._tunnel(req, peer, incoming)
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _tunnel(self, req: ConnectRequest, peer: SpiffeId, incoming: Incoming) -> None:
        snap = self.state.snapshot()
        peer_addr = incoming.peer_address or ("0.0.0.0", 0)
        src = parse_forwarded_for(req.headers.get("forwarded")) or (str(peer_addr[0]),
                                                                    int(peer_addr[1]))
        ip = str(req.host)
        svc, wl = resolve_target(snap.mesh, self.network, ip, req.port)
        if self.draining:
            incoming.refuse()
            return
        if svc is None and wl is None:
            log.info("CONNECT %s from %s: no service or workload has this address; 503",
                     req.authority, peer)
            incoming.reject(503)
            return
        if svc is not None:
            protocol = snap.protocol(svc.key, req.port)
        else:
            assert wl is not None
            protocol = workload_port_protocol(snap, wl, req.port)
        src_wl = snap.mesh.workload_by_address(self.network, src[0])
        tunnel = Tunnel(snap, peer, src, src_wl, svc, wl, ip, req.port, protocol)
        if protocol == "tcp":
            await self._tcp(tunnel, incoming)
            return
        stream = incoming.accept()
        await self._http(tunnel, stream)

    async def _http(self, tunnel: Tunnel, stream: HboneStream) -> None:
        prefix = b""
        try:
            while (proto := sniff_protocol(prefix)) is None:
                async with asyncio.timeout(self.limits.header_timeout):
                    data = await stream.read()
                if not data:
                    stream.close()
                    return
                prefix += data
        except (TimeoutError, OSError, ConnectionError) as e:
            log.debug("tunnel closed before its first request: %s", e)
            stream.abort()
            return

        async def handle(r: HttpRequest) -> HttpResponse:
            return await self.exchange.handle(tunnel, r)

        try:
            if proto == "h2":
                await self._serve_h2(stream, prefix, handle)
            else:
                await serve_h1(stream, handle, initial=prefix, limits=self.limits)
        except (OSError, ConnectionError) as e:
            log.debug("HTTP tunnel ended: %s", e)
        finally:
            await finish_stream(stream, self.limits.header_timeout)

    async def _serve_h2(self, stream: HboneStream, prefix: bytes,
                        handle: Callable[[HttpRequest], Awaitable[HttpResponse]]) -> None:
        tasks: set[asyncio.Task[None]] = set()
        conn: H2Conn

        async def one(sid: int, r: HttpRequest) -> None:
            resp = await handle(r)
            sent, error = 0, None
            try:
                sent = await conn.send_response(sid, resp, head_only=r.method == "HEAD")
            except Exception as e:
                error = e
                conn.reset_stream(sid)
            finally:
                resp.done(sent, error)

        def on_request(sid: int, r: HttpRequest) -> None:
            t = asyncio.ensure_future(one(sid, r))
            tasks.add(t)
            t.add_done_callback(tasks.discard)

        conn = H2Conn(stream, client=False, on_request=on_request, initial=prefix)
        try:
            await conn.run()
        finally:
            for t in list(tasks):
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _tcp(self, tunnel: Tunnel, incoming: Incoming) -> None:
        snap, svc = tunnel.snapshot, tunnel.service
        rec = TcpRecord(self.metrics, tunnel.src_addr, tunnel.src_workload,
                        str(tunnel.peer_identity), svc)
        if svc is not None:
            endpoints = list(snap.mesh.endpoints(svc, tunnel.port))
        else:
            assert tunnel.workload is not None
            endpoints = [Endpoint(tunnel.workload, tunnel.port)]
        ep = self.upstreams.pick(endpoints)
        rec.open()
        if ep is None:
            incoming.reject(503)
            rec.finish(0, 0, flags="UH", error="no healthy endpoint")
            return
        rec.dst_workload = ep.workload
        rec.upstream = endpoint_addr(ep)
        try:
            up = await self.upstreams.tunnel(ep)
        except (UpstreamError, HboneConnectError) as e:
            incoming.reject(503)
            rec.finish(0, 0, flags="UF", error=e)
            return
        down = incoming.accept()
        sent, received, error = await splice(down, up)
        rec.finish(sent, received, error=error)

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def active(self) -> int:
        return len(self._tasks)

    async def drain(self, deadline: float) -> None:
        """Stop accepting now; give open tunnels until ``deadline`` seconds, then abort them."""
        self.draining = True
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self._listener is not None:
            self._listener.close()
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=deadline)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.upstreams.close()


async def finish_stream(stream: HboneStream, grace: float) -> None:
    """Half-close our side and let the peer finish reading (it half-closes in turn), so the
    last response is never cut by a reset; after ``grace`` seconds the stream is reset."""
    stream.write_eof()
    try:
        async with asyncio.timeout(grace):
            for _ in range(1024):
                if not await stream.read():
                    break
    except (TimeoutError, OSError, ConnectionError):
        pass
    stream.close()


async def splice(a: HboneStream, b: HboneStream) -> tuple[int, int, BaseException | None]:
    """Copy bytes both ways between two tunnel streams, half-closes included.

    Returns (bytes a->b, bytes b->a, first error)."""
    counts = [0, 0]
    errors: list[BaseException] = []

    async def pump(src: HboneStream, dst: HboneStream, i: int) -> None:
        try:
            while data := await src.read():
                await dst.write(data)
                counts[i] += len(data)
            dst.write_eof()
        except Exception as e:
            errors.append(e)
            src.abort()
            dst.abort()

    await asyncio.gather(pump(a, b, 0), pump(b, a, 1))
    if not errors:
        a.close()
        b.close()
    return counts[0], counts[1], errors[0] if errors else None
