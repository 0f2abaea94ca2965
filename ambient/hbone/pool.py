"""HBONE client connection pool (ztunnel's outbound pool).

Role: give callers an ``HboneStream`` for ``(PoolKey, authority)``, multiplexing CONNECT
streams over as few mTLS connections as possible. The caller owns sockets and certificates:
``dial(dst)`` returns a connected ``socket.socket`` (ztunnel makes it inside the pod's netns,
with SO_MARK) and ``ssl_context_for(src_identity)`` returns the client ``SSLContext``.

Invariants:
* Key = {source identity, destination identity set, source IP, destination ip:port}: streams
  are never shared across keys, so a connection's TLS identity always matches its streams.
* At most ``max_streams`` active streams per connection (and never above the server's
  MAX_CONCURRENT_STREAMS); beyond that another connection is opened.
* Concurrent requests for a key with no spare capacity share one dial.
* After the handshake the server identity is checked against ``key.dst_identities``.
* Connections idle (no active stream) for ``idle_timeout`` are closed; dead ones are evicted.
* A CONNECT the server left unprocessed (REFUSED_STREAM or above a GOAWAY's last stream: a
  draining ztunnel or waypoint) is retried on another connection, up to ``_ATTEMPTS`` times;
  the refusing connection takes no new stream and is closed once its live streams end.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from ..identity import SpiffeId
from ..tls import PeerVerificationError
from .aio import HboneConnectError, HboneConnection, HboneStream, open_hbone_connection
from .aio import wait_response as _wait_response
from .protocol import HboneError, HboneSettings, IPAddress, format_authority

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_STREAMS",
    "HboneConnectError",
    "HbonePool",
    "PoolKey",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_STREAMS = 100  # POOL_MAX_STREAMS_PER_CONNECTION
DEFAULT_IDLE_TIMEOUT = 300.0  # POOL_UNUSED_RELEASE_TIMEOUT
DEFAULT_CONNECT_TIMEOUT = 10.0  # ztunnel's CONNECTION_TIMEOUT
_ATTEMPTS = 3  # a CONNECT left unprocessed is safe to send again, on another connection

Dial = Callable[[tuple[IPAddress, int]], Awaitable[socket.socket]]
SslContextFor = Callable[[SpiffeId], Awaitable[ssl.SSLContext]]


@dataclass(frozen=True, slots=True)
class PoolKey:
    src_identity: SpiffeId
    dst_identities: frozenset[SpiffeId]
    src_ip: IPAddress | None
    dst: tuple[IPAddress, int]


class HbonePool:
    """Pooled HBONE client connections. Use one per process (per ztunnel)."""

    def __init__(
        self,
        dial: Dial,
        ssl_context_for: SslContextFor,
        *,
        trust_domain: str,
        max_streams: int = DEFAULT_MAX_STREAMS,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        settings: HboneSettings | None = None,
    ) -> None:
        self._dial = dial
        self._ssl_context_for = ssl_context_for
        self.trust_domain = trust_domain
        self.max_streams = max_streams
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.settings = settings
        self._conns: dict[PoolKey, list[HboneConnection]] = {}
        self._dialing: dict[PoolKey, asyncio.Future[HboneConnection]] = {}
        self._idle_timers: dict[HboneConnection, asyncio.TimerHandle] = {}
        self._closed = False

    # -- public ---------------------------------------------------------------------------

    async def connect(
        self, key: PoolKey, authority: str, headers: Iterable[tuple[str, str]] = ()
    ) -> HboneStream:
        """Open a CONNECT stream to ``authority`` through a pooled connection for ``key``."""
        headers = list(headers)
        attempts = 0
        while True:
            attempts += 1
            conn = await self._checkout(key)
            try:
                stream = conn.open_stream_nowait(authority, headers)
            except HboneError as e:
                raise HboneConnectError(
                    "closed", f"{self._where(key)}: connection closed: {e}") from None
            try:
                await _wait_response(stream, authority)
            except HboneConnectError as e:
                if e.reason == "unprocessed" and attempts < _ATTEMPTS:
                    log.debug("HBONE pool: %s; retrying on another connection", e)
                    continue
                if e.status is None:
                    e.message = f"{self._where(key)}: {e.message}"
                    e.args = (e.message,)
                raise
            return stream

    def connections(self, key: PoolKey) -> list[HboneConnection]:
        """Live connections for ``key`` (for metrics and tests)."""
        return [c for c in self._conns.get(key, []) if c.is_usable]

    @property
    def connection_count(self) -> int:
        return sum(len(self.connections(k)) for k in list(self._conns))

    async def close(self) -> None:
        """Close every pooled connection."""
        self._closed = True
        for timer in self._idle_timers.values():
            timer.cancel()
        self._idle_timers.clear()
        conns = [c for lst in self._conns.values() for c in lst]
        self._conns.clear()
        for c in conns:
            c.close()
        await asyncio.gather(*(c.closed for c in conns), return_exceptions=True)

    # -- internals ------------------------------------------------------------------------

    async def _checkout(self, key: PoolKey) -> HboneConnection:
        while True:
            if self._closed:
                raise HboneConnectError("closed", "the HBONE pool is shut down")
            conn = self._pick(key)
            if conn is not None:
                return conn
            pending = self._dialing.get(key)
            if pending is None:
                pending = asyncio.ensure_future(self._open(key))
                self._dialing[key] = pending
                pending.add_done_callback(self._dial_done_callback(key))
            # shield: one waiter being cancelled must not cancel the shared dial
            await asyncio.shield(pending)

    def _dial_done_callback(
        self, key: PoolKey
    ) -> Callable[[asyncio.Future[HboneConnection]], None]:
        def done(fut: asyncio.Future[HboneConnection]) -> None:
            if self._dialing.get(key) is fut:
                del self._dialing[key]
            if not fut.cancelled():
                fut.exception()  # retrieved: every waiter already got it via shield

        return done

    def _pick(self, key: PoolKey) -> HboneConnection | None:
        conns = self._conns.get(key)
        if not conns:
            return None
        # Closed ones are evicted; one that only stopped taking streams (refusing, GOAWAY)
        # stays listed until it closes, so pool.close still ends it.
        alive = [c for c in conns if not c.closed.done()]
        if len(alive) != len(conns):
            self._conns[key] = alive
            for dead in set(conns) - set(alive):
                self._drop_timer(dead)
        for c in alive:
            limit = min(self.max_streams, c.proto.peer_max_concurrent_streams)
            if c.is_usable and c.active_streams < limit:
                return c
        return None

    async def _open(self, key: PoolKey) -> HboneConnection:
        where = self._where(key)
        try:
            async with asyncio.timeout(self.connect_timeout):
                sock = await self._dial(key.dst)
                try:
                    ctx = await self._ssl_context_for(key.src_identity)
                    conn = await open_hbone_connection(
                        sock, ctx, trust_domain=self.trust_domain,
                        expected=key.dst_identities, settings=self.settings,
                    )
                except BaseException:
                    sock.close()
                    raise
        except TimeoutError:
            raise HboneConnectError(
                "timeout",
                f"{where} timed out after {self.connect_timeout:g}s; is port "
                f"{key.dst[1]} blocked by a NetworkPolicy or firewall?",
            ) from None
        except ConnectionRefusedError:
            raise HboneConnectError(
                "refused",
                f"{where} was refused; is the destination pod enrolled in ambient and its "
                f"node's ztunnel listening on {key.dst[1]}?",
            ) from None
        except PeerVerificationError as e:
            token = "identity" if e.reason in ("unexpected-san", "wrong-trust-domain") else "tls"
            raise HboneConnectError(token, f"{where}: TLS/identity check failed: {e}") from None
        except OSError as e:
            hint = " (no route: check the pod network)" if e.errno in (
                errno.EHOSTUNREACH, errno.ENETUNREACH) else ""
            raise HboneConnectError("io", f"{where} failed: {e}{hint}") from None
        conn.on_idle = self._on_idle
        self._conns.setdefault(key, []).append(conn)
        conn.closed.add_done_callback(lambda _f: self._evict(key, conn))
        conn.idle_since = asyncio.get_running_loop().time()
        self._on_idle(conn)
        log.debug("HBONE pool: new connection %s as %s", where, key.src_identity)
        return conn

    def _on_idle(self, conn: HboneConnection) -> None:
        self._drop_timer(conn)
        if conn.refusing:  # the server is going away: nothing more to carry here
            conn.close()
            return
        loop = asyncio.get_running_loop()
        self._idle_timers[conn] = loop.call_later(self.idle_timeout, self._idle_check, conn)

    def _idle_check(self, conn: HboneConnection) -> None:
        self._idle_timers.pop(conn, None)
        if conn.active_streams == 0 and conn.idle_since is not None:
            log.debug("HBONE pool: releasing idle connection to %s", conn.peer_address)
            conn.close()

    def _drop_timer(self, conn: HboneConnection) -> None:
        timer = self._idle_timers.pop(conn, None)
        if timer is not None:
            timer.cancel()

    def _evict(self, key: PoolKey, conn: HboneConnection) -> None:
        self._drop_timer(conn)
        conns = self._conns.get(key)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._conns[key]

    @staticmethod
    def _where(key: PoolKey) -> str:
        return f"connection to {format_authority(key.dst[0], key.dst[1])}"
