"""Helpers for running ztunnel in the test process against real pod network namespaces.

Role: a dedicated event-loop thread (so blocking probes from the test thread never stall the
proxies), per-node in-process ztunnels built from model objects, a held-open client
connection, a direct HBONE client, and readers for the ``istio_tcp_*`` metrics.

Invariants:
- Every coroutine touching a ztunnel runs on the loop thread (``LoopThread.run``); the test
  thread only blocks on sockets and on that call, always with a bound.
- Sockets that play a pod's application are created inside the pod netns; sockets that must
  bypass the pod's capture carry SO_MARK 1337, like ztunnel's own.
- Waiting is on conditions (``wait_until``), never on fixed sleeps, and nothing asserts a
  duration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from ambient.ca import CertificateAuthority
from ambient.certs import CertificateManager, LocalCaProvider
from ambient.hbone.aio import HboneConnectError, open_hbone_connection
from ambient.hbone.protocol import HboneError
from ambient.identity import SpiffeId
from ambient.netns import netns_path, socket_in_netns
from ambient.store import MeshStore
from ambient.tls import PeerVerificationError
from ztunnel.config import Settings
from ztunnel.metrics import TRAFFIC_LABELS, Metrics
from ztunnel.proxy import Ztunnel
from ztunnel.result import ConnectionTracker

T = TypeVar("T")
ZTUNNEL_MARK = 1337
HBONE_PORT = 15008
STEP_TIMEOUT = 10.0  # bound for any single network step


# ------------------------------------------------------------------------------- event loop


class LoopThread:
    """One event loop (uvloop, as ztunnel runs in production) on its own daemon thread."""

    def __init__(self) -> None:
        try:
            import uvloop

            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover
            self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="ztunnel-loop",
                                       daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run ``coro`` on the loop thread and wait (bounded) for its result."""
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(cancel_all(), timeout=15)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(15)
            if not self.thread.is_alive():
                self.loop.close()


# ------------------------------------------------------------------------------- ztunnels


@dataclass
class Node:
    """One node's in-process ztunnel with its own store, metrics and certificates."""

    name: str
    zt: Ztunnel
    store: MeshStore
    metrics: Metrics
    certs: CertificateManager
    tracker: ConnectionTracker

    def series(self, family: str, **match: str) -> list[tuple[dict[str, str], float]]:
        """Non-zero series of ``metrics.<family>`` whose labels contain ``match``."""
        return _series(getattr(self.metrics, family).series(), match)

    def closed_series(self, **match: str) -> list[tuple[dict[str, str], float]]:
        """``istio_tcp_connections_closed`` series whose labels contain ``match``."""
        return self.series("connections_closed", **match)


def _series(raw: dict[tuple[str, ...], float],
            match: dict[str, str]) -> list[tuple[dict[str, str], float]]:
    out = []
    for key, value in raw.items():
        labels = dict(zip(TRAFFIC_LABELS, key, strict=True))
        if all(labels.get(k) == v for k, v in match.items()) and value > 0:
            out.append((labels, value))
    return out


async def start_node(name: str, ca: CertificateAuthority, objects: Iterable[Any], *,
                     ttl: float | None = None, **settings: Any) -> Node:
    """Build a ztunnel for node ``name`` on the running loop (certificates rotate if ``ttl``)."""
    from datetime import timedelta

    cfg = dataclasses.replace(Settings(), node_name=name, connect_timeout_s=5.0, **settings)
    store = MeshStore()
    rejected = store.apply(list(objects))
    assert not rejected, rejected
    provider = LocalCaProvider(ca) if ttl is None else LocalCaProvider(ca, timedelta(seconds=ttl))
    certs = CertificateManager(provider)
    certs.start()
    metrics = Metrics(version="test")
    tracker = ConnectionTracker()
    return Node(name, Ztunnel(cfg, store, certs, metrics, tracker), store, metrics, certs,
                tracker)


async def stop_node(node: Node) -> None:
    """Stop serving every pod at once, then stop certificate rotation (idempotent)."""
    for uid in list(node.zt.pods):
        await node.zt.del_pod(uid)
    await node.certs.stop()


def cert_serial(node: Node, identity: SpiffeId) -> str | None:
    """Serial of the leaf ``node`` currently holds for ``identity`` (from the admin dump)."""
    for entry in node.certs.dump():
        if entry["identity"] == str(identity) and entry["certChain"]:
            return entry["certChain"][0]["serialNumber"]
    return None


# ------------------------------------------------------------------------------- waiting


def wait_until(pred: Callable[[], Any], timeout: float = STEP_TIMEOUT,
               interval: float = 0.05) -> Any:
    """Poll ``pred`` until it returns something truthy (returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# ------------------------------------------------------------------------------- sockets


class HeldConnection:
    """A client connection from inside a pod to an echo server, kept open mid-stream."""

    def __init__(self, netns: str, host: str, port: int, timeout: float = STEP_TIMEOUT):
        self.sock = socket_in_netns(netns_path(netns))
        try:
            self.sock.settimeout(timeout)
            self.sock.connect((host, port))
            self.greeting = self._read_line()
        except BaseException:
            self.sock.close()
            raise

    def _read_line(self) -> str:
        buf = b""
        while not buf.endswith(b"\n") and len(buf) < 4096:
            chunk = self.sock.recv(1)
            if not chunk:
                break
            buf += chunk
        return buf.decode(errors="replace").strip()

    def echo(self, data: bytes) -> bytes:
        """Send ``data`` and read back as many bytes (or fewer if the peer closes)."""
        self.sock.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = self.sock.recv(len(data) - len(got))
            if not chunk:
                break
            got += chunk
        return got

    def wait_closed(self, timeout: float = STEP_TIMEOUT) -> bool:
        """True once the peer closed or reset the connection (within ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                if not self.sock.recv(65536):
                    return True
            except (ConnectionResetError, BrokenPipeError):
                return True
            except TimeoutError:
                return False
        return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> HeldConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect_refused(netns: str, host: str, port: int, *, mark: int | None = None) -> bool:
    """Whether a TCP connect from inside ``netns`` to ``host:port`` is refused."""
    s = socket_in_netns(netns_path(netns))
    try:
        if mark is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        s.settimeout(STEP_TIMEOUT)
        s.connect((host, port))
    except ConnectionRefusedError:
        return True
    finally:
        s.close()
    return False


# ------------------------------------------------------------------------------- HBONE


@dataclass
class HboneOutcome:
    """What a direct CONNECT attempt came to.

    ``kind``: ``ok`` (200; ``greeting`` holds the first line from the app), ``status`` (the
    destination answered ``status``), ``tls`` (handshake or identity check failed), ``reset``
    (the connection died before an answer), ``connect`` (TCP refused/unreachable),
    ``timeout`` (no answer in time).
    """

    kind: str
    status: int | None = None
    greeting: str = ""
    error: str = ""


async def hbone_attempt(netns: str, dst_ip: str, ctx: ssl.SSLContext, authority: str, *,
                        trust_domain: str, expected: Iterable[SpiffeId] | None) -> HboneOutcome:
    """CONNECT ``authority`` over a fresh mTLS connection from inside ``netns`` to
    ``dst_ip:15008``, on a socket marked 1337 so the pod's capture leaves it alone."""
    loop = asyncio.get_running_loop()
    sock = socket_in_netns(netns_path(netns))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, ZTUNNEL_MARK)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (dst_ip, HBONE_PORT)), STEP_TIMEOUT)
    except (OSError, TimeoutError) as e:
        sock.close()
        return HboneOutcome("connect", error=repr(e))
    try:
        conn = await asyncio.wait_for(
            open_hbone_connection(sock, ctx, trust_domain=trust_domain, expected=expected),
            STEP_TIMEOUT)
    except TimeoutError:
        sock.close()
        return HboneOutcome("timeout", error="TLS handshake timed out")
    except (PeerVerificationError, ssl.SSLError, OSError, HboneError) as e:
        sock.close()
        return HboneOutcome("tls", error=repr(e))
    try:
        try:
            stream = await asyncio.wait_for(conn.open_stream(authority), STEP_TIMEOUT)
        except TimeoutError:
            return HboneOutcome("timeout", error="no answer to CONNECT")
        except HboneConnectError as e:
            if e.status is not None:
                return HboneOutcome("status", status=e.status, error=e.message)
            return HboneOutcome("reset", error=repr(e))
        except (HboneError, OSError) as e:
            return HboneOutcome("reset", error=repr(e))
        buf = b""
        while b"\n" not in buf:
            data = await asyncio.wait_for(stream.read(), STEP_TIMEOUT)
            if not data:
                break
            buf += data
        stream.write_eof()  # finish politely: the echo app half-closes back
        while await asyncio.wait_for(stream.read(), STEP_TIMEOUT):
            pass
        stream.close()
        return HboneOutcome("ok", status=200, greeting=buf.decode(errors="replace").strip())
    finally:
        conn.close()
