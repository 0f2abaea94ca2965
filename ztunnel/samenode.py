"""The same-node shortcut: a connection between two pods this ztunnel serves skips HBONE.

Role: Istio's ztunnel tunnels even to a pod on its own node: TLS to itself, HTTP/2 CONNECT, and
back in through its own 15008 listener.  Both ends of that tunnel are this process, so the
tunnel proves nothing the process does not already know, and it costs about three times the CPU
of the connection itself (``perf/README.md``).  Here such a connection keeps every check and
record of the HBONE path (``ztunnel.proxy.Ztunnel._outbound_local``):

* the source pod's certificate must exist (no certificate, no traffic, as for HBONE), and the
  destination's too;
* the destination's inbound checks run exactly as for a CONNECT: the workload's own address,
  waypoint bypass refusal, L4 authorization with the *source's SPIFFE identity* as principal
  (ztunnel captured the connection in the source pod's network namespace: that is the identity
  it would have put in the client certificate), late rejection on policy changes;
* the application is dialled from the destination pod's namespace with the client's IP;
* both reporters' results are written with the labels the tunnel gives
  (``connection_security_policy="mutual_tls"``, both principals).

Only the bytes take a shorter way: from one pod socket to the other, through ztunnel's TCP
relay, or, with ``KERNEL_SPLICE=true`` and the node agent's eBPF sockmap loaded
(:mod:`ambient.splicemap`), through the kernel (far less CPU; lower single-stream throughput on
6.18, see ``perf/README.md``).  Both legs are sockets inside the two pods' own namespaces, so
plaintext never crosses the node's network (the veths), exactly as with HBONE.
``SAME_NODE_SHORTCUT=false`` restores Istio's behaviour (HBONE to itself).

This module holds the pure decision (:func:`local_target`) and the splice glue; the checks live
with the other handlers in ``ztunnel/proxy.py``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, TypeVar

from ambient.hbone.protocol import parse_authority
from ambient.hbone.tcpleg import Accepted, splice_tcp
from ztunnel.route import HBONE_PORT, Hbone, Route

if TYPE_CHECKING:
    from ambient.splicemap import KernelSplice

log = logging.getLogger("ztunnel.samenode")

P = TypeVar("P")

# How often a missing kernel splice (the agent has not loaded it yet) is looked for again.
REOPEN_INTERVAL_S = 10.0


def local_target(route: Route, served: Mapping[str, P]) -> tuple[P, tuple[str, int]] | None:
    """The served pod and ``(ip, port)`` a route may reach without HBONE, or None.

    Only a direct HBONE route (not to a waypoint: that is another process, with its own
    policy) to the HBONE port of a workload whose pod this ztunnel serves (``served``: by
    workload uid) qualifies.
    """
    if not isinstance(route, Hbone) or route.waypoint or route.address[1] != HBONE_PORT:
        return None
    pod = served.get(route.workload.uid)
    if pod is None:
        return None
    try:
        host, port = parse_authority(route.authority)
    except ValueError:
        return None
    return pod, (str(host), port)


class LocalSplicer:
    """Moves the bytes of a shortcut connection: kernel splice when available, else the relay."""

    def __init__(self, pin_dir: str, kernel: bool) -> None:
        self._pin_dir = pin_dir
        self._kernel_enabled = kernel
        self._kernel: KernelSplice | None = None
        self._next_try = 0.0
        self.kernel_used = 0  # connections the kernel carried (for tests and the admin)

    def _kernel_splice(self) -> KernelSplice | None:
        if not self._kernel_enabled:
            return None
        now = time.monotonic()
        if self._kernel is None and now >= self._next_try:
            self._next_try = now + REOPEN_INTERVAL_S
            try:
                from ambient.splicemap import KernelSplice
            except ImportError:  # pragma: no cover - the module ships with ztunnel
                self._kernel_enabled = False
                return None
            self._kernel = KernelSplice.open(self._pin_dir)
            if self._kernel is not None:
                log.info("same-node connections are spliced in the kernel (%s)", self._pin_dir)
        return self._kernel

    async def splice(
        self, conn: Accepted, app: socket.socket
    ) -> tuple[int, int, BaseException | None]:
        """Relay client <-> app until both sides end; returns (to app, to client, error)."""
        kernel = self._kernel_splice()
        if kernel is not None and conn.lost is None and not conn.transport.is_closing():
            from ambient.splicemap import SpliceUnavailable

            try:  # a duplicate of the client socket; the transport (paused) keeps its own
                raw = conn.transport.get_extra_info("socket")
                sock = socket.socket(fileno=os.dup(raw.fileno()))
            except OSError as e:
                log.info("cannot duplicate the client socket (%s); relaying in ztunnel", e)
            else:
                sock.setblocking(False)
                try:
                    result = await kernel.splice(sock, app, pending=bytes(conn.pending))
                except SpliceUnavailable as e:
                    log.info("kernel splice unavailable (%s); relaying in ztunnel", e)
                    sock.close()
                else:
                    conn.pending.clear()
                    self.kernel_used += 1
                    conn.transport.abort()  # the splice closed its copy of the socket
                    return result
        return await splice_tcp(conn, app)
