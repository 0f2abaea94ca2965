"""Upstream side of the waypoint: endpoint choice and HTTP over HBONE to the endpoint's ztunnel.

Role: ``Upstreams.pick`` chooses an endpoint of a backend service (healthy ones only, the less
loaded of two random candidates); ``Upstreams.send`` carries one HTTP request to it. Every
upstream connection is an HBONE CONNECT to ``<pod IP>:15008`` with ``:authority`` =
``<pod IP>:<target port>``, made with the waypoint's own certificate and checked against the
endpoint workload's identity (``ambient.hbone.pool.HbonePool`` shares the mTLS connections).
Inside the tunnel we speak HTTP/1.1 (``waypoint.h1.H1Client``, kept alive and reused) or
HTTP/2 (``waypoint.h2conn.H2Conn``, one multiplexed connection per endpoint, more when full).

Invariants:
* A tunnel carries requests for exactly one (endpoint IP, target port, identity).
* An HTTP/1.1 connection is reused only when both messages finished cleanly; anything else
  closes it.
* ``Lease.release`` is called exactly once per ``send`` (the exchange does it when the
  response is over); in-flight counts per endpoint drive the least-loaded choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ambient.hbone.aio import HboneConnectError, HboneStream
from ambient.hbone.pool import HbonePool, PoolKey
from ambient.hbone.protocol import HBONE_PORT, format_authority, make_traceparent
from ambient.identity import SpiffeId
from ambient.model import HealthStatus, Workload
from ambient.store import Endpoint
from waypoint.h1 import H1Client, H1Error
from waypoint.h2conn import H2Conn, H2Error
from waypoint.message import HttpRequest, HttpResponse

__all__ = ["Lease", "UpstreamError", "Upstreams", "endpoint_addr"]

log = logging.getLogger("waypoint.upstream")

MAX_IDLE_H1 = 64  # idle HTTP/1.1 connections kept per endpoint


class UpstreamError(Exception):
    """The request could not be carried to the endpoint; ``flag`` is Envoy's response flag
    (``UF`` connection failure, ``UC`` connection terminated, ``UH`` no healthy upstream)."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(message)
        self.flag = flag


@dataclass
class Lease:
    """One request's hold on an endpoint connection; ``release`` it when the response ends."""

    key: tuple[str, int]
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
    ) -> None:
        self.pool = pool
        self._identity = identity
        self.hbone_port = hbone_port
        self.rng = rng or random.Random()
        self._eps: dict[tuple[str, int], _Endpoint] = {}
        self._tasks: set[asyncio.Task[None]] = set()

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
        for _ in range(MAX_IDLE_H1 + 1):
            client, reused = None, False
            while st.idle_h1 and client is None:
                c = st.idle_h1.pop()
                if not c.broken:
                    client, reused = c, True
            if client is None:
                client = H1Client(await self.tunnel(ep))
            lease._release = self._h1_release(st, client)
            try:
                return await client.request(req)
            except H1Error as e:
                # A kept-alive connection the upstream closed meanwhile: try a fresh one, if
                # no byte of the body was taken yet.
                if reused and req.body.read_bytes == 0:
                    log.debug("stale upstream connection to %s: %s", endpoint_addr(ep), e)
                    continue
                raise UpstreamError("UC", f"upstream {endpoint_addr(ep)}: {e}") from e
        raise UpstreamError(
            "UC", f"upstream {endpoint_addr(ep)}: every kept-alive connection failed")

    def _h1_release(self, st: _Endpoint, client: H1Client) -> Callable[[bool], None]:
        def release(ok: bool) -> None:
            st.inflight -= 1
            if ok and client.reset() and len(st.idle_h1) < MAX_IDLE_H1:
                st.idle_h1.append(client)
            else:
                client.close()

        return release

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


def _key(ep: Endpoint) -> tuple[str, int]:
    return (str(ep.workload.addresses[0]) if ep.workload.addresses else "", ep.target_port)


def endpoint_addr(ep: Endpoint) -> str:
    """``ip:port`` (``[v6]:port``) of an endpoint, for logs; ``ns/name`` without an address."""
    if not ep.workload.addresses:
        return f"{ep.workload.namespace}/{ep.workload.name}"
    return format_authority(ep.workload.addresses[0], ep.target_port)


def _describe(wl: Workload) -> str:
    return f"{wl.namespace}/{wl.name}"

