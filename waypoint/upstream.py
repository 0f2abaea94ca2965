"""Upstream side of the waypoint: endpoint choice and HTTP over HBONE to the endpoint's ztunnel.

Role: ``Upstreams.pick`` chooses an endpoint of a backend service (healthy ones only, the less
loaded of two random candidates); ``Upstreams.send`` carries one HTTP request to it. Every
upstream connection is an HBONE CONNECT to ``<pod IP>:15008`` with ``:authority`` =
``<pod IP>:<target port>``, made with the waypoint's own certificate and checked against the
endpoint workload's identity (``ambient.hbone.pool.HbonePool`` shares the mTLS connections).
Inside the tunnel we speak HTTP/1.1 (``waypoint.h1.H1Client``, kept alive and pooled) or
HTTP/2 (``waypoint.h2conn.H2Conn``, one multiplexed connection per endpoint, more when full).

HTTP/1.1 pool (as Envoy's upstream pool): idle keep-alive connections are kept per endpoint
(pod IP, target port, workload uid) and reused, most recently used first, by later requests
of any downstream client: the upstream CONNECT carries only the waypoint's identity and the
endpoint's address, nothing of the client, so nothing is mixed. At most ``max_idle`` idle
connections per endpoint, each closed after ``idle_timeout`` seconds unused (checked when
taken and by a sweep while any is idle).

Invariants:
* A tunnel carries requests for exactly one (endpoint IP, target port, workload).
* An HTTP/1.1 connection goes back to the pool only when its last exchange ended cleanly:
  request sent whole, response read to its end, no ``Connection: close``, no error, no stray
  byte; anything else closes it. A pooled connection the upstream closed, reset or wrote to
  meanwhile is discarded when taken.
* A request that fails on a reused connection before any response byte arrived (the
  upstream closed it as we sent) is sent once more on a fresh connection, if its body can be
  sent again (complete in memory, or not read at all); never more than once.
* ``Lease.release`` is called exactly once per ``send`` (the exchange does it when the
  response is over); in-flight counts per endpoint drive the least-loaded choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ambient.hbone.aio import HboneConnectError, HboneStream
from ambient.hbone.pool import HbonePool, PoolKey
from ambient.hbone.protocol import HBONE_PORT, IPAddress, format_authority, make_traceparent
from ambient.identity import SpiffeId
from ambient.model import HealthStatus, Workload
from ambient.store import Endpoint
from waypoint.h1 import H1Client, H1Error
from waypoint.h2conn import H2Conn, H2Error
from waypoint.message import Body, Headers, HttpRequest, HttpResponse

__all__ = ["Lease", "UpstreamError", "Upstreams", "endpoint_addr"]

log = logging.getLogger("waypoint.upstream")

MAX_IDLE_H1 = 64  # idle HTTP/1.1 connections kept per endpoint
IDLE_TIMEOUT_H1 = 60.0  # seconds an idle HTTP/1.1 upstream connection is kept


class UpstreamError(Exception):
    """The request could not be carried to the endpoint; ``flag`` is Envoy's response flag
    (``UF`` connection failure, ``UC`` connection terminated, ``UH`` no healthy upstream)."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(message)
        self.flag = flag


@dataclass
class Lease:
    """One request's hold on an endpoint connection; ``release`` it when the response ends."""

    key: tuple[str, int, str]
    _release: Callable[[bool], None] | None = None
    released: bool = False

    def release(self, ok: bool) -> None:
        if self.released:
            return
        self.released = True
        if self._release is not None:
            self._release(ok)


@dataclass
class _Endpoint:
    inflight: int = 0
    idle_h1: list[H1Client] = field(default_factory=list)
    h2: list[H2Conn] = field(default_factory=list)
    h2_opening: asyncio.Future[H2Conn] | None = None


class Upstreams:
    """Connections from this waypoint to endpoints; one per process."""

    def __init__(
        self,
        pool: HbonePool,
        identity: Callable[[], SpiffeId],
        *,
        hbone_port: int = HBONE_PORT,
        rng: random.Random | None = None,
        max_idle: int = MAX_IDLE_H1,
        idle_timeout: float = IDLE_TIMEOUT_H1,
    ) -> None:
        self.pool = pool
        self._identity = identity
        self.hbone_port = hbone_port
        self.rng = rng or random.Random()
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self._eps: dict[tuple[str, int, str], _Endpoint] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self.h1_opened = 0  # HTTP/1.1 upstream connections opened (tests, debugging)
        self.stale_retries = 0  # requests resent after a pooled connection turned out dead

    # -- endpoint choice --------------------------------------------------------------------

    def pick(self, endpoints: Sequence[Endpoint]) -> Endpoint | None:
        """A healthy endpoint with an address: the less loaded of two random candidates."""
        healthy = [e for e in endpoints
                   if e.workload.status is HealthStatus.HEALTHY and e.workload.addresses]
        if not healthy:
            return None
        if len(healthy) == 1:
            return healthy[0]
        a, b = self.rng.sample(healthy, 2)
        la, lb = self.load(a), self.load(b)
        if la == lb:
            return a
        return a if la < lb else b

    def load(self, ep: Endpoint) -> int:
        st = self._eps.get(_key(ep))
        return st.inflight if st is not None else 0

    # -- sending ----------------------------------------------------------------------------

    async def send(
        self, ep: Endpoint, req: HttpRequest, *, http2: bool
    ) -> tuple[HttpResponse, Lease]:
        """Carry ``req`` to ``ep``; returns the response head (body streaming) and its lease.

        Raises ``UpstreamError``. Cancelling the call (a timeout) releases everything.
        """
        key = _key(ep)
        st = self._eps.setdefault(key, _Endpoint())
        st.inflight += 1
        lease = Lease(key)
        try:
            if http2:
                resp = await self._send_h2(ep, st, req, lease)
            else:
                resp = await self._send_h1(ep, st, req, lease)
        except BaseException:
            lease.release(False)
            raise
        return resp, lease

    async def _send_h1(self, ep: Endpoint, st: _Endpoint, req: HttpRequest, lease: Lease
                       ) -> HttpResponse:
        client = self._checkout(st)
        reused = client is not None
        replay: tuple[bytes, Headers] | None = None
        if client is None:
            client = await self._open_h1(ep)
        elif req.body.ended and req.body.read_bytes == 0:
            # Keep the bytes, in case the pooled connection died as we sent on it.
            whole = req.body.take_ended() or b""
            replay = (whole, req.body.trailers)
            req = _with_body(req, Body.of(whole, replay[1]))
        lease._release = self._h1_release(st, client)
        try:
            return await client.request(req)
        except H1Error as e:
            retry = reused and e.before_response and (
                replay is not None or req.body.read_bytes == 0)
            if not retry:
                raise UpstreamError("UC", f"upstream {endpoint_addr(ep)}: {e}") from e
            log.debug("pooled upstream connection to %s was dead (%s); once more on a new one",
                      endpoint_addr(ep), e)
        self.stale_retries += 1
        if replay is not None:
            req = _with_body(req, Body.of(*replay))
        client = await self._open_h1(ep)
        lease._release = self._h1_release(st, client)
        try:
            return await client.request(req)
        except H1Error as e:
            raise UpstreamError("UC", f"upstream {endpoint_addr(ep)}: {e}") from e

    async def _open_h1(self, ep: Endpoint) -> H1Client:
        client = H1Client(await self.tunnel(ep))
        self.h1_opened += 1
        return client

    def _checkout(self, st: _Endpoint) -> H1Client | None:
        """The most recently used live idle connection (dead and expired ones are closed)."""
        if not st.idle_h1:
            return None
        oldest = asyncio.get_running_loop().time() - self.idle_timeout
        while st.idle_h1:
            c = st.idle_h1.pop()
            if c.idle_since >= oldest and not c.stale:
                return c
            c.close()
        return None

    def _h1_release(self, st: _Endpoint, client: H1Client) -> Callable[[bool], None]:
        def release(ok: bool) -> None:
            st.inflight -= 1
            if ok and len(st.idle_h1) < self.max_idle and client.reset():
                client.idle_since = asyncio.get_running_loop().time()
                st.idle_h1.append(client)
                if self._sweeper is None:
                    self._arm_sweep()
            else:
                client.close()

        return release

    def _arm_sweep(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(max(self.idle_timeout / 2, 0.01), self._sweep)

    def _sweep(self) -> None:
        """Close idle connections past ``idle_timeout`` or dead; forget unused endpoints."""
        self._sweeper = None
        oldest = asyncio.get_running_loop().time() - self.idle_timeout
        left = 0
        for key, st in list(self._eps.items()):
            keep: list[H1Client] = []
            for c in st.idle_h1:
                if c.idle_since >= oldest and not c.stale:
                    keep.append(c)
                else:
                    c.close()
            st.idle_h1 = keep
            left += len(keep)
            if not keep and not st.inflight and not st.h2 and st.h2_opening is None:
                del self._eps[key]
        if left:
            self._arm_sweep()

    @property
    def idle_connections(self) -> int:
        """Idle pooled HTTP/1.1 connections, all endpoints (tests, debugging)."""
        return sum(len(st.idle_h1) for st in self._eps.values())

    async def _send_h2(self, ep: Endpoint, st: _Endpoint, req: HttpRequest, lease: Lease
                       ) -> HttpResponse:
        conn = await self._h2_conn(ep, st)

        def release(ok: bool) -> None:
            st.inflight -= 1

        lease._release = release
        try:
            return await conn.request(req)
        except H2Error as e:
            raise UpstreamError("UC", f"upstream {endpoint_addr(ep)}: {e}") from e

    async def _h2_conn(self, ep: Endpoint, st: _Endpoint) -> H2Conn:
        while True:
            st.h2 = [c for c in st.h2 if c.is_usable]
            for c in st.h2:
                if c.capacity > 0:
                    return c
            if st.h2_opening is None:
                st.h2_opening = asyncio.ensure_future(self._open_h2(ep))
                fut = st.h2_opening

                def done(f: asyncio.Future[H2Conn], st: _Endpoint = st) -> None:
                    st.h2_opening = None
                    if not f.cancelled() and f.exception() is None:
                        st.h2.append(f.result())

                fut.add_done_callback(done)
            await asyncio.shield(st.h2_opening)

    async def _open_h2(self, ep: Endpoint) -> H2Conn:
        conn = H2Conn(await self.tunnel(ep), client=True)
        task = asyncio.ensure_future(conn.run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return conn

    async def tunnel(self, ep: Endpoint) -> HboneStream:
        """A new HBONE CONNECT stream to the endpoint (through the shared pool)."""
        wl = ep.workload
        ip = wl.addresses[0]
        authority = format_authority(ip, ep.target_port)
        key = PoolKey(self._identity(), frozenset({wl.identity()}), None,
                      (ip, self.hbone_port))
        try:
            return await self.pool.connect(key, authority, [("traceparent", make_traceparent())])
        except (HboneConnectError, OSError) as e:
            raise UpstreamError("UF", f"HBONE to {_describe(wl)} at {authority}: {e}") from e

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for st in self._eps.values():
            for c in st.idle_h1:
                c.close()
            for h in st.h2:
                with contextlib.suppress(Exception):
                    await h.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pool.close()


def _key(ep: Endpoint) -> tuple[str, int, str]:
    wl = ep.workload
    return (str(wl.addresses[0]) if wl.addresses else "", ep.target_port, wl.uid)


def _with_body(req: HttpRequest, body: Body) -> HttpRequest:
    return HttpRequest(req.method, req.scheme, req.authority, req.target, req.headers, body,
                       req.protocol)


def endpoint_addr(ep: Endpoint) -> str:
    """``ip:port`` (``[v6]:port``) of an endpoint, for logs; ``ns/name`` without an address."""
    if not ep.workload.addresses:
        return f"{ep.workload.namespace}/{ep.workload.name}"
    return _authority(ep.workload.addresses[0], ep.target_port)


@functools.lru_cache(maxsize=4096)
def _authority(ip: IPAddress, port: int) -> str:
    return format_authority(ip, port)  # once per address: it is asked for on every request


def _describe(wl: Workload) -> str:
    return f"{wl.namespace}/{wl.name}"

