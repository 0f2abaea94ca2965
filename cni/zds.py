"""The node agent's ZDS server: hands pods (and their netns fds) to the node's ztunnel(s).

The agent listens on a ``SOCK_SEQPACKET`` unix socket (Istio's ``/var/run/ztunnel/ztunnel.sock``);
every ztunnel on the node connects to it (two at once during a rolling restart).  Per
connection: read ``ZdsHello`` (only V1 is accepted), replay the snapshot (Add with the netns
fd, opened at send time, or Keep when the netns path cannot be opened), send ``SnapshotSent``;
afterwards the agent's :meth:`ZdsServer.add` and :meth:`ZdsServer.delete` flow.

Invariants:
- Strict request/ack: each connection has at most one request outstanding (a per-connection
  lock), each answered within ``ack_timeout`` (5 s) or the connection is dropped.  A NACK
  (non-empty ``Ack.error``) fails that request; during the snapshot it is only logged, since
  ztunnel keeps such a pod pending and retries it.
- ``add`` goes to the newest connection that has said hello.  If that one is still receiving
  its snapshot, the add queues behind the snapshot on the connection lock: ztunnel therefore
  never misses a pod that appeared after the snapshot was read but before it finished (the
  new ztunnel, not the draining old one, must get it).  ``delete`` goes to every connection.
- A disconnected ztunnel (EOF, socket error, protocol violation) is forgotten at once: one
  reader task per connection is always reading, so no keepalive polling is needed, and it
  fails the outstanding request.
- At most ``accept_rate`` (5) new connections are accepted per second.
- Every netns fd opened here is closed right after it was sent (the kernel holds its own
  reference while it is in flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ambient import zds
from ambient.netns import netns_path

log = logging.getLogger("cni.zds")


class ZdsError(Exception):
    """ztunnel could not be told about a pod (none connected, NACK, timeout, I/O)."""


@dataclass(frozen=True)
class ZdsPod:
    """A pod as the agent hands it to ztunnel; ``netns`` is a path or an ``ip netns`` name."""

    uid: str
    name: str
    namespace: str
    service_account: str
    netns: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(eq=False)
class _Conn:
    id: int
    sock: socket.socket
    session: zds.AgentSession = field(default_factory=zds.AgentSession)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    hello: asyncio.Future[int] | None = None
    ack: asyncio.Future[str] | None = None
    reader: asyncio.Task[None] | None = None
    handler: asyncio.Task[None] | None = None
    closed: str = ""  # why the connection was dropped; "" while it is alive

    @property
    def said_hello(self) -> bool:
        return not self.closed and self.session.phase is not zds.Phase.HELLO

    @property
    def ready(self) -> bool:
        return not self.closed and self.session.phase is zds.Phase.READY


class ZdsServer:
    """Serves ZDS to the ztunnel(s) of this node."""

    def __init__(
        self,
        path: str,
        snapshot: Callable[[], list[ZdsPod]],
        *,
        ack_timeout: float = zds.ACK_TIMEOUT_S,
        accept_rate: float = zds.ACCEPT_RATE_PER_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.path = path
        self.snapshot = snapshot
        self.ack_timeout = ack_timeout
        self._limiter = zds.RateLimiter(accept_rate)
        self._clock = clock
        self._sleep = sleep
        self._conns: list[_Conn] = []
        self._ids = itertools.count(1)
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._inode: int | None = None
        self._changed: asyncio.Event | None = None
        self.accepted = 0  # connections accepted so far

    # -- public API ------------------------------------------------------------------------

    @property
    def connections(self) -> int:
        """ztunnel connections that have received their snapshot."""
        return sum(1 for c in self._conns if c.ready)

    async def start(self) -> None:
        """Bind the socket (replacing a stale one) and start accepting ztunnels."""
        self._changed = asyncio.Event()
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o755, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.path)
            if not stat.S_ISSOCK(st.st_mode):
                raise ZdsError(f"{self.path} exists and is not a socket; remove it or point "
                               "the ZDS socket elsewhere")
            os.unlink(self.path)  # a previous agent's socket: nobody can be listening on it
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.path)
            os.chmod(self.path, 0o600)  # ztunnel runs as root; nobody else may talk ZDS
            sock.listen(16)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            raise ZdsError(f"cannot serve ZDS on {self.path}: {e}") from e
        self._inode = os.stat(self.path).st_ino
        self._listener = sock
        self._accept_task = asyncio.create_task(self._accept_loop())
        log.info("serving ZDS on %s", self.path)

    async def close(self) -> None:
        """Stop accepting, drop every connection, remove the socket file."""
        if self._accept_task is not None:
            self._accept_task.cancel()
            await asyncio.gather(self._accept_task, return_exceptions=True)
            self._accept_task = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == self._inode:
                    os.unlink(self.path)
        conns = list(self._conns)
        for c in conns:
            self._drop(c, "the node agent is shutting down")
        tasks = [t for c in conns for t in (c.reader, c.handler)
                 if t is not None and t is not asyncio.current_task()]
        await asyncio.gather(*tasks, return_exceptions=True)

    async def wait_connections(self, count: int = 1, timeout: float = 10.0) -> int:
        """Wait (bounded) until at least ``count`` ztunnels are ready; return how many are."""
        assert self._changed is not None, "start() the server first"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.connections < count and loop.time() < deadline:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), deadline - loop.time())
        return self.connections

    async def add(self, pod: ZdsPod) -> None:
        """Hand ``pod`` to the newest ztunnel and wait for its Ack; ZdsError if not acked."""
        conn = self._newest()
        if conn is None:
            raise ZdsError(
                f"no ztunnel is connected on this node: cannot hand over pod {pod.key}; is "
                f"the ztunnel DaemonSet running here with INPOD_UDS={self.path}?"
            )
        try:
            fd = os.open(netns_path(pod.netns), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ZdsError(f"cannot open the netns of pod {pod.key} at {pod.netns}: "
                           f"{e.strerror or e}; is the pod sandbox gone?") from e
        try:
            async with conn.lock:
                error = await self._exchange(conn, _add(pod), fd)
        finally:
            os.close(fd)
        if error:
            raise ZdsError(f"ztunnel rejected pod {pod.key}: {error}")

    async def delete(self, uid: str) -> list[str]:
        """Tell every ztunnel to drop pod ``uid`` at once; returns the errors (best effort)."""
        conns = [c for c in self._conns if c.said_hello]

        async def one(c: _Conn) -> str:
            try:
                async with c.lock:
                    error = await self._exchange(c, zds.Del(uid), None)
            except ZdsError as e:
                return str(e)
            return f"ztunnel connection {c.id} rejected the delete of pod {uid}: {error}" \
                if error else ""

        results = await asyncio.gather(*(one(c) for c in conns))
        return [r for r in results if r]

    # -- connections ------------------------------------------------------------------------

    def _newest(self) -> _Conn | None:
        for c in reversed(self._conns):
            if c.said_hello:
                return c
        return None

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def _accept_loop(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            wait = self._limiter.reserve(self._clock())
            if wait > 0:
                await self._sleep(wait)
            try:
                sock, _ = await loop.sock_accept(self._listener)
            except OSError as e:
                log.error("accepting a ztunnel connection on %s failed: %s", self.path, e)
                await self._sleep(0.1)
                continue
            sock.setblocking(False)
            self.accepted += 1
            conn = _Conn(next(self._ids), sock)
            conn.hello = loop.create_future()
            self._conns.append(conn)
            conn.reader = asyncio.create_task(self._read_loop(conn))
            conn.handler = asyncio.create_task(self._handle(conn))

    def _drop(self, conn: _Conn, why: str) -> None:
        if conn.closed:
            return
        conn.closed = why
        conn.sock.close()
        for fut in (conn.hello, conn.ack):
            if fut is not None and not fut.done():
                fut.set_exception(ZdsError(f"ztunnel connection {conn.id} dropped: {why}"))
                fut.exception()  # retrieved: nobody may be waiting on it
        for task in (conn.reader, conn.handler):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        with contextlib.suppress(ValueError):
            self._conns.remove(conn)
        log.info("ztunnel connection %d closed (%s); %d ztunnels connected", conn.id, why,
                 self.connections)
        self._notify()

    async def _read_loop(self, conn: _Conn) -> None:
        """Read every datagram ztunnel sends: the hello, then acks; detects disconnects."""
        try:
            while True:
                data, fds, flags = await zds.recv_datagram(conn.sock)
                if not data and not fds:
                    self._drop(conn, "ztunnel closed the connection")
                    return
                try:
                    if conn.session.phase is zds.Phase.HELLO:
                        conn.session.hello(zds.decode_hello(data, fds, flags))
                        assert conn.hello is not None
                        conn.hello.set_result(zds.VERSION_V1)
                    else:
                        error = zds.decode_ack(data, fds, flags)
                        conn.session.acked(error)
                        if conn.ack is not None and not conn.ack.done():
                            conn.ack.set_result(error)
                finally:
                    zds.close_fds(fds)
        except zds.ZdsProtocolError as e:
            log.error("ztunnel connection %d broke the ZDS protocol: %s", conn.id, e)
            self._drop(conn, f"protocol error: {e}")
        except OSError as e:
            self._drop(conn, f"socket error: {e}")

    async def _handle(self, conn: _Conn) -> None:
        """Hello, then the snapshot; afterwards the connection serves add/delete."""
        assert conn.hello is not None
        try:
            async with conn.lock:
                try:
                    await asyncio.wait_for(asyncio.shield(conn.hello), self.ack_timeout)
                except TimeoutError:
                    self._drop(conn, f"no hello within {self.ack_timeout:g}s")
                    return
                log.info("ztunnel connection %d said hello (V1); sending the snapshot", conn.id)
                await self._send_snapshot(conn)
        except ZdsError as e:
            log.warning("ztunnel connection %d: snapshot not delivered: %s", conn.id, e)
            self._drop(conn, str(e))
            return
        log.info("snapshot delivered to ztunnel connection %d; %d ztunnels connected",
                 conn.id, self.connections)
        self._notify()

    async def _send_snapshot(self, conn: _Conn) -> None:
        try:
            pods = list(self.snapshot())
        except Exception as e:  # noqa: BLE001 - a broken cache must not kill the server
            raise ZdsError(f"the agent could not list its pods: {e}") from e
        for pod in pods:
            try:
                fd: int | None = os.open(netns_path(pod.netns), os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                log.info("netns of pod %s unavailable (%s); sending keep", pod.key, e.strerror)
                fd = None
            try:
                req = _add(pod) if fd is not None else zds.Keep(pod.uid)
                error = await self._exchange(conn, req, fd)
            finally:
                if fd is not None:
                    os.close(fd)
            if error:
                log.error("ztunnel connection %d rejected pod %s in the snapshot: %s",
                          conn.id, pod.key, error)
        error = await self._exchange(conn, zds.SnapshotSent(), None)
        if error:
            log.error("ztunnel connection %d rejected snapshot-sent: %s", conn.id, error)

    async def _exchange(self, conn: _Conn, req: zds.Request, fd: int | None) -> str:
        """Send ``req`` and wait for its Ack (caller holds ``conn.lock``): "" or the NACK."""
        if conn.closed:
            raise ZdsError(f"ztunnel connection {conn.id} is gone ({conn.closed})")
        try:
            data = zds.encode_request(req)
            conn.session.sending(req, self._clock(), self.ack_timeout)
        except zds.ZdsProtocolError as e:
            raise ZdsError(str(e)) from e
        conn.ack = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(zds.send_datagram(conn.sock, data, fd), self.ack_timeout)
            return await asyncio.wait_for(asyncio.shield(conn.ack), self.ack_timeout)
        except TimeoutError:
            why = f"no ack for {zds.describe(req)} within {self.ack_timeout:g}s"
            self._drop(conn, why)
            raise ZdsError(f"ztunnel connection {conn.id} dropped: {why}") from None
        except OSError as e:
            self._drop(conn, f"socket error: {e}")
            raise ZdsError(f"ztunnel connection {conn.id} dropped: {e}") from e
        except asyncio.CancelledError:
            # Whether ztunnel applied the request is unknown now; a fresh connection (and
            # snapshot) is the only way back to an agreed state.
            self._drop(conn, f"{zds.describe(req)} abandoned while awaiting its ack")
            raise
        finally:
            conn.ack = None


def _add(pod: ZdsPod) -> zds.Add:
    return zds.Add(pod.uid, zds.WorkloadInfo(pod.name, pod.namespace, pod.service_account))
