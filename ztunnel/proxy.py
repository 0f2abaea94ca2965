"""ztunnel's data path: the listeners inside each pod and the three connection handlers.

For every pod it serves, ztunnel opens, *inside the pod's network namespace*:

* 15001, outbound: the pod's captured connections (original destination via
  SO_ORIGINAL_DST), routed by :func:`ztunnel.route.route_outbound` over HBONE (to the
  destination, or to its waypoint with the original VIP:port as ``:authority``), or, for a
  destination pod this ztunnel serves itself, through the same-node shortcut (the inbound
  checks and both results without the tunnel: ``ztunnel/samenode.py``), or passed through as
  plain TCP;
* 15006, inbound plaintext: connections to the pod that did not come over HBONE; L4
  policy applies with no peer identity, so PeerAuthentication STRICT denies them;
* 15008, inbound HBONE: mutual TLS with the pod's own certificate, HTTP/2 CONNECT, L4
  policy with the peer's SPIFFE identity, then a connection to the application that keeps
  the client's IP as its source.  Traffic that must pass a waypoint is refused (401, DENY)
  unless the peer is that waypoint (:func:`ztunnel.route.waypoint_bypass`).

Every socket ztunnel opens in a pod carries SO_MARK 1337, so the pod's capture rules skip
it.  Each proxied connection has exactly one :class:`~ztunnel.result.ConnectionResult`,
which writes the access-log line and the ``istio_tcp_*`` metrics.  Decisions (routing,
authorization) are pure functions over one state snapshot taken when the connection starts.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ambient.authz import ConnectionInfo, evaluate
from ambient.certs import CertificateError, CertificateManager
from ambient.hbone.aio import HboneConnectError, Incoming, serve_hbone
from ambient.hbone.pool import HbonePool, PoolKey
from ambient.hbone.protocol import ConnectRequest, build_request_headers
from ambient.hbone.tcpleg import Accepted, splice_hbone, splice_hbone_socket, splice_tcp
from ambient.identity import SpiffeId
from ambient.model import Workload
from ambient.store import MeshState, MeshStore
from ambient.tls import classify_handshake_error
from ztunnel.config import Settings
from ztunnel.metrics import Metrics
from ztunnel.result import ConnectionResult, ConnectionTracker, ResponseFlags
from ztunnel.route import Hbone, NoRoute, Passthrough, route_outbound, waypoint_bypass
from ztunnel.samenode import LocalSplicer, local_target
from ztunnel.sockets import connect, dial_socket, listener, original_dst

log = logging.getLogger("ztunnel.proxy")

OUTBOUND_PORT = 15001
INBOUND_PLAINTEXT_PORT = 15006
INBOUND_HBONE_PORT = 15008
# How long a connection of a served pod waits for the pod's configuration before failing
# closed (see Ztunnel._pod_workload).
WORKLOAD_WAIT_S = 5.0
# Accept queue of 15001/15006. start_server(sock=...) calls listen() again, with 100 unless
# told: under a burst of new connections (1k/s) that dropped SYNs (clients retry after 1 s).
LISTEN_BACKLOG = 1024


@dataclass(eq=False)
class PodProxy:
    """What ztunnel runs for one pod: its listeners, its HBONE pool and its live tasks."""

    uid: str
    name: str
    namespace: str
    netns: str | int
    workload_uid: str | None = None
    own_netns: bool = False  # ``netns`` is an fd this pod closes when it stops (ZDS)
    servers: list[asyncio.Server] = field(default_factory=list)
    accept_task: asyncio.Task[None] | None = None
    hbone_listener: socket.socket | None = None
    pool: HbonePool | None = None
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)  # one per proxied connection
    conn_tasks: set[asyncio.Task[Any]] = field(default_factory=set)  # inbound HBONE connections
    _cache: tuple[int, Workload | None] = (-1, None)

    def workload(self, state: MeshState) -> Workload | None:
        """This pod's Workload in ``state`` (by uid, else by namespace/name)."""
        if self._cache[0] == state.version:
            return self._cache[1]
        found = state.workload_by_uid(self.workload_uid) if self.workload_uid else None
        if found is None:
            for w in state.workloads.values():
                if w.name == self.name and w.namespace == self.namespace:
                    found = w
                    break
        self._cache = (state.version, found)
        return found


class Ztunnel:
    """The node proxy: owns the pods it serves and handles their connections."""

    def __init__(
        self,
        settings: Settings,
        store: MeshStore,
        certs: CertificateManager,
        metrics: Metrics,
        tracker: ConnectionTracker | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.certs = certs
        self.metrics = metrics
        self.tracker = tracker if tracker is not None else ConnectionTracker()
        self.pods: dict[str, PodProxy] = {}
        self.draining = False
        self._open_results: dict[asyncio.Task[Any], list[ConnectionResult]] = {}
        self.local = LocalSplicer(settings.bpf_pin_dir, settings.kernel_splice)
        self._served: tuple[tuple[int, int], dict[str, PodProxy]] = ((-1, -1), {})
        self._pods_gen = 0
        # Inbound connections that passed authorization, re-checked when policy changes.
        self._authorized: dict[asyncio.Task[Any], _Authorized] = {}
        self._unsubscribe = store.subscribe(self._on_config_change)

    # -- pod lifecycle --------------------------------------------------------------------

    async def add_pod(
        self,
        uid: str,
        name: str,
        namespace: str,
        netns: str | int,
        *,
        workload_uid: str | None = None,
        own_netns: bool = False,
    ) -> PodProxy:
        """Start serving a pod: open its three listeners inside ``netns``.

        With ``own_netns`` the pod takes ownership of the netns fd: it stays open while the
        pod is served (dials use it) and is closed when the pod stops, or here if the add fails.
        """
        if uid in self.pods:
            await self.del_pod(uid)
        pod = PodProxy(uid, name, namespace, netns, workload_uid, own_netns)
        mark = self.settings.packet_mark
        reuse = self.settings.inpod_port_reuse
        try:
            # transparent: eBPF capture of virtual interfaces hands SYNs for foreign
            # addresses to 15001 (harmless for iptables/nftables REDIRECT).
            out_sock = listener(netns, OUTBOUND_PORT, mark=mark, reuseport=reuse,
                                transparent=True)
            in_sock = listener(netns, INBOUND_PLAINTEXT_PORT, mark=mark, reuseport=reuse)
            pod.hbone_listener = listener(netns, INBOUND_HBONE_PORT, mark=mark, reuseport=reuse)
            loop = asyncio.get_running_loop()
            for sock, handler in ((out_sock, self._outbound), (in_sock, self._inbound_plain)):
                pod.servers.append(await loop.create_server(
                    self._tracked(pod, handler), sock=sock, backlog=LISTEN_BACKLOG))
        except OSError as e:
            await self._close_pod(pod)
            raise OSError(
                e.errno,
                f"cannot open ztunnel listeners in the netns of pod {namespace}/{name}: "
                f"{e.strerror}; does ztunnel have CAP_NET_ADMIN and is the netns alive?",
            ) from e
        pod.pool = HbonePool(
            self._dialer(pod),
            self.certs.client_ctx,
            trust_domain=self.settings.trust_domain,
            max_streams=self.settings.pool_max_streams,
            idle_timeout=self.settings.pool_unused_release_s,
            connect_timeout=self.settings.connect_timeout_s,
            settings=self.settings.hbone,
        )
        pod.accept_task = asyncio.create_task(self._accept_hbone(pod))
        self.pods[uid] = pod
        self._pods_gen += 1
        wl = pod.workload(self.store.snapshot)
        if wl is not None:
            self.certs.prefetch(wl.identity())
        self.metrics.active_proxy_count.labels().set(len(self.pods))
        self.metrics.proxies_started.labels().inc()
        log.info("serving pod %s/%s (uid %s)", namespace, name, uid)
        return pod

    async def del_pod(self, uid: str) -> None:
        """Stop serving a pod at once (its network is already gone): no drain."""
        pod = self.pods.pop(uid, None)
        if pod is None:
            return
        self._pods_gen += 1
        await self._close_pod(pod, abort=True)
        self.metrics.active_proxy_count.labels().set(len(self.pods))
        self.metrics.proxies_stopped.labels().inc()
        log.info("stopped serving pod %s/%s (uid %s)", pod.namespace, pod.name, uid)

    async def _close_pod(self, pod: PodProxy, *, abort: bool = False) -> None:
        self._close_listeners(pod)
        if abort:
            tasks = pod.tasks | pod.conn_tasks
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if pod.pool is not None:
            await pod.pool.close()
        if pod.own_netns and isinstance(pod.netns, int) and pod.netns >= 0:
            fd, pod.netns = pod.netns, -1
            os.close(fd)

    def _close_listeners(self, pod: PodProxy) -> None:
        for srv in pod.servers:
            srv.close()
        if pod.accept_task is not None:
            pod.accept_task.cancel()
        if pod.hbone_listener is not None:
            pod.hbone_listener.close()

    async def drain(self, deadline: float) -> None:
        """Graceful shutdown: listeners close now, live connections get ``deadline`` s."""
        self.draining = True  # from now on, new CONNECTs on live HBONE connections are refused
        for pod in self.pods.values():
            self._close_listeners(pod)
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        await asyncio.sleep(0)  # connections accepted just before the close start their handler
        tasks = {t for pod in self.pods.values() for t in pod.tasks}
        if tasks:
            log.info("draining %d connections for up to %.1fs", len(tasks), deadline)
        pending: set[asyncio.Task[Any]] = set()
        for _ in range(1000):  # re-check: a handler may start while we wait for the others
            tasks = {t for pod in self.pods.values() for t in pod.tasks if not t.done()}
            remaining = end - loop.time()
            if not tasks or remaining <= 0:
                pending = tasks
                break
            _, pending = await asyncio.wait(tasks, timeout=remaining)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for uid in list(self.pods):
            await self.del_pod(uid)

    # -- late policy rejection -----------------------------------------------------------

    def _guard(self, pod: PodProxy, src_ip: str, identity: SpiffeId | None,
               dst: tuple[str, int], result: ConnectionResult) -> None:
        """Remember an authorized inbound connection so a later policy can close it."""
        task = asyncio.current_task()
        if task is not None:
            self._authorized[task] = _Authorized(pod, src_ip, identity, dst, result)
            task.add_done_callback(self._unguard)

    def _unguard(self, task: asyncio.Task[Any]) -> None:
        self._authorized.pop(task, None)

    def _on_config_change(self, state: MeshState) -> None:
        """Re-evaluate open inbound connections; close those the new policy denies."""
        for task, g in list(self._authorized.items()):
            wl = g.pod.workload(state)
            if wl is None or task.done():
                continue
            decision = self._authorize(state, wl, g.src_ip, g.identity, g.dst)
            if not decision.allowed:
                log.info("closing connection %s -> %s:%d: %s", g.src_ip, *g.dst, decision.reason)
                g.result.close(error=f"closed by a policy change: {decision.reason}",
                               response_flags=ResponseFlags.DENY)
                self._authorized.pop(task, None)
                task.cancel()

    # -- plumbing -------------------------------------------------------------------------

    def _tracked(
        self, pod: PodProxy, handler: Callable[[PodProxy, Accepted], Awaitable[None]]
    ) -> Callable[[], Accepted]:
        """Protocol factory of a pod listener: each accepted connection (no StreamReader
        pair: see ``ambient.hbone.tcpleg.Accepted``) runs ``handler`` in a task of its own."""
        loop = asyncio.get_running_loop()

        async def run(conn: Accepted) -> None:
            task = asyncio.current_task()
            assert task is not None
            pod.tasks.add(task)
            try:
                await handler(pod, conn)
            except asyncio.CancelledError:
                conn.transport.abort()
            except Exception:
                log.exception("connection handler failed")
                conn.transport.abort()
            finally:
                pod.tasks.discard(task)
                self._finish(task)

        class _Conn(Accepted):
            __slots__ = ()

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                loop.create_task(run(self))

        return _Conn

    def _dialer(self, pod: PodProxy) -> Callable[[tuple[Any, int]], Awaitable[socket.socket]]:
        async def dial(dst: tuple[Any, int]) -> socket.socket:
            return await self._dial(pod, str(dst[0]), dst[1])

        return dial

    async def _dial(
        self, pod: PodProxy, ip: str, port: int, *, source: tuple[str, int] | None = None
    ) -> socket.socket:
        sock = dial_socket(pod.netns, ip, mark=self.settings.packet_mark, source=source)
        try:
            # Not loop.sock_connect: uvloop resolves even an IP literal on its thread pool.
            await connect(sock, (ip, port), self.settings.connect_timeout_s)
        except TimeoutError:
            sock.close()
            raise TimeoutError(
                f"connection to {ip}:{port} timed out; is a NetworkPolicy blocking it?"
            ) from None
        except BaseException:
            sock.close()
            raise
        return sock

    def _orig_src(self, client_ip: str) -> tuple[str, int] | None:
        """Bind address that keeps the client's IP towards the application (ENABLE_ORIG_SRC)."""
        return (client_ip, 0) if self.settings.enable_orig_src else None

    async def _relay_tcp(
        self,
        pod: PodProxy,
        dst: tuple[str, int],
        source: tuple[str, int] | None,
        conn: Accepted,
        result: ConnectionResult,
    ) -> None:
        """Plain TCP leg: dial ``dst`` from the pod, copy both ways, close the result."""
        try:
            up = await self._dial(pod, dst[0], dst[1], source=source)
        except OSError as e:
            conn.transport.abort()
            result.close(0, 0, error=e, response_flags=ResponseFlags.CONNECT)
            return
        sent, received, error = await splice_tcp(conn, up)
        result.close(sent, received, error=error)

    @staticmethod
    def _authorize(
        state: MeshState,
        wl: Workload,
        src_ip: str,
        identity: SpiffeId | None,
        dst: tuple[str, int],
    ) -> Any:
        decision = evaluate(
            ConnectionInfo(
                src_ip=ipaddress.ip_address(src_ip), src_identity=identity,
                dst_ip=ipaddress.ip_address(dst[0]), dst_port=dst[1], dst_workload=wl,
            ),
            state.policies_for(wl),
        )
        for key, would_allow in decision.dry_run:
            log.info("dry-run policy %s would %s the connection from %s to %s:%d",
                     key, "allow" if would_allow else "deny", src_ip, *dst)
        return decision

    def _result(self, **kw: Any) -> ConnectionResult:
        result = ConnectionResult.open(self.metrics, tracker=self.tracker, **kw)
        task = asyncio.current_task()
        if task is not None:
            self._open_results.setdefault(task, []).append(result)
        return result

    def _finish(self, task: asyncio.Task[Any]) -> None:
        """Close the task's results if its handler was cut short (closing is idempotent)."""
        for result in self._open_results.pop(task, ()):
            result.close(error="closed by ztunnel: drain deadline reached or pod removed",
                         response_flags=ResponseFlags.CONNECT)

    def _served_pods(self, state: MeshState) -> dict[str, PodProxy]:
        """The pods this ztunnel serves, by workload uid (for the same-node shortcut)."""
        key = (state.version, self._pods_gen)
        if self._served[0] != key:
            served = {}
            for pod in self.pods.values():
                wl = pod.workload(state)
                if wl is not None:
                    served[wl.uid] = pod
            self._served = (key, served)
        return self._served[1]

    async def _pod_workload(self, pod: PodProxy) -> Workload | None:
        """The pod's Workload.  A pod can be served before its configuration arrives (a new
        pod's first connection, or a restarted ztunnel sharing the listeners with SO_REUSEPORT
        before its first xDS sync): wait for it, bounded, then fail closed."""
        deadline = time.monotonic() + WORKLOAD_WAIT_S
        while (wl := pod.workload(self.store.snapshot)) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return wl

    # -- outbound (15001) -----------------------------------------------------------------

    async def _outbound(
        self, pod: PodProxy, conn: Accepted
    ) -> None:
        peer = conn.transport.get_extra_info("peername")
        sock = conn.transport.get_extra_info("socket")
        try:
            dst = original_dst(sock)
        except OSError:
            log.warning("outbound connection from %s has no original destination; closing", peer)
            conn.transport.abort()
            return
        src = await self._pod_workload(pod)
        state = self.store.snapshot
        if src is None:
            # Fail closed: without knowing who the pod is we cannot prove its identity.
            log.warning(
                "pod %s/%s is not in the mesh configuration yet; refusing its connection to %s:%d",
                pod.namespace, pod.name, *dst,
            )
            conn.transport.abort()
            return
        route = route_outbound(state, src, dst[0], dst[1], network=self.settings.network)
        local = (local_target(route, self._served_pods(state))
                 if self.settings.same_node_shortcut else None)
        if local is not None:
            assert isinstance(route, Hbone)
            await self._outbound_local(pod, src, peer, route, local[0], local[1], conn)
        elif isinstance(route, Hbone):
            await self._outbound_hbone(pod, src, peer, dst, route, conn)
        elif isinstance(route, Passthrough):
            await self._outbound_passthrough(pod, src, peer, route, conn)
        else:
            self._refuse(src, peer, dst, route, conn)

    def _refuse(
        self,
        src: Workload,
        peer: tuple[str, int],
        dst: tuple[str, int],
        route: NoRoute,
        conn: Accepted,
    ) -> None:
        result = self._result(
            reporter="source", src=peer, dst=dst, src_workload=src, dst_service=route.service,
            src_identity=src.identity(),
        )
        conn.transport.abort()
        result.close(0, 0, error=route.reason, response_flags=ResponseFlags.CONNECT)

    async def _outbound_hbone(
        self,
        pod: PodProxy,
        src: Workload,
        peer: tuple[str, int],
        dst: tuple[str, int],
        route: Hbone,
        conn: Accepted,
    ) -> None:
        assert pod.pool is not None
        result = self._result(
            reporter="source", src=peer, dst=route.address, hbone_target=route.authority,
            src_workload=src, dst_workload=route.workload, dst_service=route.service,
            src_identity=src.identity(), dst_identity=route.workload.identity(),
            security_policy="mutual_tls",
        )
        key = PoolKey(
            src_identity=src.identity(),
            dst_identities=route.identities,
            src_ip=ipaddress.ip_address(peer[0]),
            dst=(ipaddress.ip_address(route.address[0]), route.address[1]),
        )
        headers = build_request_headers(
            route.authority,
            forwarded_for=f"{peer[0]}:{peer[1]}",
            forwarded_host=route.service.hostname if route.service else None,
            baggage=_baggage(src),
        )
        try:
            stream = await pod.pool.connect(key, route.authority, headers)
        except (HboneConnectError, CertificateError, OSError) as e:
            conn.transport.abort()
            result.close(0, 0, error=e)  # the flag comes from flag_for_error
            return
        r = await splice_hbone(stream, conn)
        result.close(r.to_stream, r.from_stream, error=r.error)

    async def _outbound_local(
        self,
        pod: PodProxy,
        src: Workload,
        peer: tuple[str, int],
        route: Hbone,
        dst_pod: PodProxy,
        target: tuple[str, int],
        conn: Accepted,
    ) -> None:
        """The same-node shortcut (ztunnel/samenode.py): the HBONE path's checks and results
        on both sides, without the tunnel."""
        state = self.store.snapshot
        src_id = src.identity()
        wl = dst_pod.workload(state)
        out = self._result(
            reporter="source", src=peer, dst=route.address, hbone_target=route.authority,
            src_workload=src, dst_workload=route.workload, dst_service=route.service,
            src_identity=src_id, dst_identity=route.workload.identity(),
            security_policy="mutual_tls",
        )
        inb = self._result(
            reporter="destination", src=peer, dst=target, hbone_target=route.authority,
            src_workload=src, dst_workload=wl, src_identity=src_id,
            dst_identity=wl.identity() if wl else None, security_policy="mutual_tls",
        )
        try:  # both certificates, as the tunnel would need them
            await self.certs.client_ctx(src_id)
            if wl is not None:
                await self.certs.server_ctx(wl.identity())
        except CertificateError as e:
            conn.transport.abort()
            inb.close(0, 0, error=e, response_flags=ResponseFlags.CONNECT)
            out.close(0, 0, error=e)
            return
        status = self._admit(state, dst_pod, wl, peer[0], src_id, target, route.authority, inb)
        if status is not None:
            conn.transport.abort()
            out.close(0, 0, error=inb.error or f"destination refused ({status})",
                      response_flags=ResponseFlags.DENY if status == 401 else
                      ResponseFlags.CONNECT)
            return
        try:
            app = await self._dial(dst_pod, target[0], target[1], source=self._orig_src(peer[0]))
        except OSError as e:
            conn.transport.abort()
            inb.close(0, 0, error=e, response_flags=ResponseFlags.CONNECT)
            out.close(0, 0, error=e, response_flags=ResponseFlags.CONNECT)
            return
        self._guard(dst_pod, peer[0], src_id, target, inb)
        sent, received, error = await self.local.splice(conn, app)
        inb.close(sent, received, error=error)
        out.close(sent, received, error=error)

    async def _outbound_passthrough(
        self,
        pod: PodProxy,
        src: Workload,
        peer: tuple[str, int],
        route: Passthrough,
        conn: Accepted,
    ) -> None:
        result = self._result(
            reporter="source", src=peer, dst=route.address, src_workload=src,
            dst_workload=route.workload, dst_service=route.service, src_identity=src.identity(),
        )
        await self._relay_tcp(pod, route.address, None, conn, result)

    # -- inbound plaintext (15006) --------------------------------------------------------

    async def _inbound_plain(
        self, pod: PodProxy, conn: Accepted
    ) -> None:
        peer = conn.transport.get_extra_info("peername")
        try:
            dst = original_dst(conn.transport.get_extra_info("socket"))
        except OSError:
            conn.transport.abort()
            return
        wl = await self._pod_workload(pod)
        state = self.store.snapshot
        src_wl = state.workload_by_address(self.settings.network, peer[0])
        result = self._result(
            reporter="destination", src=peer, dst=dst, src_workload=src_wl, dst_workload=wl,
        )
        if wl is None:
            conn.transport.abort()
            result.close(0, 0, error="destination workload unknown", response_flags="CONNECT")
            return
        bypass = waypoint_bypass(state, wl, dst[1], None)
        if bypass is not None:  # a plaintext peer is never the waypoint
            result.set_decision(False, None, bypass)
            conn.transport.abort()
            result.close(0, 0, error=bypass, response_flags=ResponseFlags.DENY)
            return
        decision = self._authorize(state, wl, peer[0], None, dst)
        result.set_decision(decision.allowed, decision.policy, decision.reason)
        if not decision.allowed:
            conn.transport.abort()
            result.close(0, 0, error=decision.reason, response_flags=ResponseFlags.DENY)
            return
        self._guard(pod, peer[0], None, dst, result)
        await self._relay_tcp(pod, dst, self._orig_src(peer[0]), conn, result)

    # -- inbound HBONE (15008) ------------------------------------------------------------

    async def _accept_hbone(self, pod: PodProxy) -> None:
        assert pod.hbone_listener is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(pod.hbone_listener)
            except asyncio.CancelledError:
                raise
            except OSError as e:
                if pod.hbone_listener.fileno() < 0:
                    return
                log.warning("accept on 15008 for pod %s/%s failed: %s", pod.namespace, pod.name, e)
                await asyncio.sleep(0.1)
                continue
            task = asyncio.create_task(self._serve_hbone(pod, sock))
            pod.conn_tasks.add(task)
            task.add_done_callback(pod.conn_tasks.discard)

    async def _serve_hbone(self, pod: PodProxy, sock: socket.socket) -> None:
        wl = await self._pod_workload(pod)
        if wl is None:
            log.warning("HBONE to pod %s/%s, which is not in the mesh configuration; closing",
                        pod.namespace, pod.name)
            sock.close()
            return
        try:
            ctx = await self.certs.server_ctx(wl.identity())
        except CertificateError as e:
            log.error("no certificate for %s, refusing HBONE: %s", wl.identity(), e)
            sock.close()
            return

        async def handler(request: ConnectRequest, peer: SpiffeId, incoming: Incoming) -> None:
            await self._inbound_hbone(pod, request, peer, incoming)

        try:
            await serve_hbone(sock, ctx, handler, trust_domain=self.settings.trust_domain,
                              settings=self.settings.hbone,
                              handshake_timeout=self.settings.hbone_handshake_timeout_s,
                              idle_timeout=self.settings.hbone_idle_timeout_s)
        except asyncio.CancelledError:
            raise  # serve_hbone aborted the connection
        except Exception as e:  # handshake or identity failure: the peer gets a TLS alert
            why = classify_handshake_error(e) if isinstance(e, ssl.SSLError) else e  # reason
            log.info("inbound HBONE connection to %s/%s failed: %s", pod.namespace, pod.name, why)
            sock.close()

    async def _inbound_hbone(
        self, pod: PodProxy, request: ConnectRequest, peer_id: SpiffeId, incoming: Incoming
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            pod.tasks.add(task)
        try:
            await self._inbound_hbone_stream(pod, request, peer_id, incoming)
        finally:
            if task is not None:
                pod.tasks.discard(task)
                self._finish(task)

    def _admit(
        self,
        state: MeshState,
        pod: PodProxy,
        wl: Workload | None,
        src_ip: str,
        peer_id: SpiffeId,
        dst: tuple[str, int],
        authority: str,
        result: ConnectionResult,
    ) -> int | None:
        """The destination's checks on a tunnelled connection (HBONE, or the same-node
        shortcut): None to accept, else the HTTP status to refuse with (``result`` closed)."""
        if wl is None or self.pods.get(pod.uid) is not pod:
            reason = ("destination workload unknown" if wl is None
                      else "destination pod is no longer served by this ztunnel")
            result.close(0, 0, error=reason, response_flags=ResponseFlags.CONNECT)
            return 503
        if ipaddress.ip_address(dst[0]) not in wl.addresses:
            result.close(
                0, 0, error=f"authority {authority} is not an address of {wl.namespace}/{wl.name}",
                response_flags=ResponseFlags.CONNECT,
            )
            return 400
        # Traffic that must pass a waypoint is accepted only from that waypoint (stricter
        # than Istio, which leaves it to an L4 policy; see ztunnel.route.waypoint_bypass).
        bypass = waypoint_bypass(state, wl, dst[1], peer_id)
        if bypass is not None:
            result.set_decision(False, None, bypass)
            result.close(0, 0, error=bypass, response_flags=ResponseFlags.DENY)
            return 401
        decision = self._authorize(state, wl, src_ip, peer_id, dst)
        result.set_decision(decision.allowed, decision.policy, decision.reason)
        if not decision.allowed:
            result.close(0, 0, error=decision.reason, response_flags=ResponseFlags.DENY)
            return 401
        return None

    async def _inbound_hbone_stream(
        self, pod: PodProxy, request: ConnectRequest, peer_id: SpiffeId, incoming: Incoming
    ) -> None:
        if self.draining:
            # Unprocessed, so the source retries it on a new connection, which reaches the
            # ztunnel now serving the pod (rolling restart) or finds no listener.
            log.debug("CONNECT %s from %s refused: ztunnel is draining", request.authority,
                      peer_id)
            incoming.refuse()
            return
        state = self.store.snapshot
        wl = pod.workload(state)
        peer = incoming.peer_address or ("0.0.0.0", 0)
        src_ip = str(peer[0])
        dst = (str(request.host), request.port)
        src_wl = state.workload_by_address(self.settings.network, src_ip)
        result = self._result(
            reporter="destination", src=(src_ip, peer[1]), dst=dst,
            hbone_target=request.authority, src_workload=src_wl, dst_workload=wl,
            src_identity=peer_id, dst_identity=wl.identity() if wl else None,
            security_policy="mutual_tls",
        )
        status = self._admit(state, pod, wl, src_ip, peer_id, dst, request.authority, result)
        if status is not None:
            incoming.reject(status)
            return
        assert wl is not None
        try:
            app = await self._dial(pod, dst[0], dst[1], source=self._orig_src(src_ip))
        except OSError as e:
            incoming.reject(503)
            result.close(0, 0, error=e, response_flags=ResponseFlags.CONNECT)
            return
        try:
            stream = incoming.accept()
        except BaseException:
            app.close()
            raise
        self._guard(pod, src_ip, peer_id, dst, result)
        r = await splice_hbone_socket(stream, app)
        result.close(r.from_stream, r.to_stream, error=r.error)


@dataclass(frozen=True)
class _Authorized:
    pod: PodProxy
    src_ip: str
    identity: SpiffeId | None
    dst: tuple[str, int]
    result: ConnectionResult


def _baggage(w: Workload) -> str:
    parts = [
        f"k8s.cluster.name={w.cluster_id}",
        f"k8s.namespace.name={w.namespace}",
        f"k8s.{(w.workload_type or 'deployment').lower()}.name={w.workload_name or w.name}",
        f"service.name={w.canonical_name or w.name}",
        f"service.version={w.canonical_revision or 'latest'}",
    ]
    return ",".join(parts)
