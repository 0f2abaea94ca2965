"""ztunnel <-> waypoint in real namespaces: two in-process ztunnels and a stand-in waypoint.

The stand-in is a minimal L4 waypoint (the real one is ``python -m waypoint``): it terminates
HBONE on 15008 in its own, uncaptured pod with the waypoint's certificate, records every
CONNECT, and re-originates HBONE to the destination pod with its own identity.  It lets us
check what ztunnel does around a waypoint without depending on the L7 proxy:

* a client's connection to a Service with a waypoint goes to the waypoint, with the original
  VIP:port as ``:authority`` and the client's identity, and only reaches the app through it;
* the destination sees the waypoint's identity as the source;
* skipping the waypoint (pod IP, or a hand-made CONNECT) is refused by the destination;
* a waypoint that is down, unknown, or presents another identity fails closed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from ztunnel_fixtures import LoopThread, Node, hbone_attempt, start_node, stop_node, wait_until

from ambient import tls
from ambient.ca import CertificateAuthority
from ambient.cluster.cluster import LocalCluster, PodHandle
from ambient.cluster.echo import tcp_probe
from ambient.hbone.aio import Incoming, open_hbone_connection, serve_hbone
from ambient.hbone.protocol import ConnectRequest
from ambient.identity import SpiffeId
from ambient.model import (
    GatewayAddress,
    NamespacedHostname,
    NetworkAddress,
    Service,
    TunnelProtocol,
    Workload,
)
from ambient.netns import netns_path, socket_in_netns
from cni.capture.base import PodCapture
from cni.capture.iptables import IptablesBackend

pytestmark = pytest.mark.netns

TD = "cluster.local"
APP_PORT = 8080
VIP = "10.96.50.1"
SVC_HOST = "echo.apps.svc.cluster.local"
WP_HOST = "wp.apps.svc.cluster.local"
# name -> (kubernetes namespace, service account, node, captured)
PODS = {
    "client": ("apps", "client", "node1", True),
    "server": ("apps", "server", "node2", True),
    "wp": ("apps", "waypoint", "node1", False),
}


@dataclass
class Env:
    cluster: LocalCluster
    loop: LoopThread
    ca: CertificateAuthority
    pods: dict[str, PodHandle] = field(default_factory=dict)

    def identity(self, pod: str) -> SpiffeId:
        p = self.pods[pod]
        return SpiffeId(TD, p.namespace, p.service_account)


def _workload(pod: PodHandle, captured: bool, services: dict[str, dict[int, int]]) -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/{pod.namespace}/{pod.name}", name=pod.name,
        namespace=pod.namespace, addresses=(ipaddress.ip_address(pod.ip),),
        tunnel_protocol=TunnelProtocol.HBONE if captured else TunnelProtocol.NONE,
        service_account=pod.service_account, node=pod.node, workload_name=pod.name,
        services=services,
    )


def objects(env: Env, waypoint: GatewayAddress | None) -> list[Any]:
    svc_key, wp_key = f"apps/{SVC_HOST}", f"apps/{WP_HOST}"
    return [
        _workload(env.pods["client"], True, {}),
        _workload(env.pods["server"], True, {svc_key: {80: APP_PORT}}),
        _workload(env.pods["wp"], False, {wp_key: {15008: 15008}}),
        Service("echo", "apps", SVC_HOST, (NetworkAddress("", ipaddress.ip_address(VIP)),),
                {80: APP_PORT}, waypoint=waypoint),
        Service("wp", "apps", WP_HOST, (NetworkAddress("", ipaddress.ip_address("10.96.50.9")),),
                {15008: 15008}),
    ]


WAYPOINT = GatewayAddress(NamespacedHostname("apps", WP_HOST))
WAYPOINT_ID = SpiffeId(TD, "apps", "waypoint")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    run_dir = tmp_path_factory.mktemp("zw")
    cluster = LocalCluster(f"zw{secrets.token_hex(2)}", ["node1", "node2"], str(run_dir / "run"))
    loop: LoopThread | None = None
    try:
        cluster.create()
        loop = LoopThread()
        e = Env(cluster, loop, CertificateAuthority.generate(TD))
        for name, (ns, sa, node, captured) in PODS.items():
            pod = cluster.add_pod(name, ns, node, service_account=sa)
            if name != "wp":
                cluster.start_echo(pod, tcp_port=APP_PORT)
            if captured:
                IptablesBackend().apply(PodCapture(pod.uid, pod.name, pod.namespace,
                                                         pod.netns_path))
            e.pods[name] = pod
        yield e
    finally:
        if loop is not None:
            loop.close()
        errors = cluster.destroy()
        assert errors == [], errors


class StandInWaypoint:
    """An L4 waypoint: HBONE in (as ``identity``), HBONE out to the server pod."""

    def __init__(self, env: Env, identity: SpiffeId) -> None:
        self.env = env
        self.identity = identity
        self.seen: list[tuple[str, SpiffeId]] = []  # (authority, peer identity) per CONNECT
        self.listener: socket.socket | None = None
        self.tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        s = socket_in_netns(netns_path(self.env.pods["wp"].netns))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", 15008))
        s.listen(64)
        s.setblocking(False)
        self.listener = s
        self.tasks.add(asyncio.create_task(self._accept(s)))

    async def _accept(self, s: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        ctx = tls.server_context(self.env.ca.issue(self.identity))
        while True:
            conn, _ = await loop.sock_accept(s)
            task = asyncio.create_task(serve_hbone(conn, ctx, self._handle, trust_domain=TD))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _handle(self, req: ConnectRequest, peer: SpiffeId, incoming: Incoming) -> None:
        self.seen.append((req.authority, peer))
        server = self.env.pods["server"]
        loop = asyncio.get_running_loop()
        sock = socket_in_netns(netns_path(self.env.pods["wp"].netns))
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (server.ip, 15008))
            up = await open_hbone_connection(
                sock, tls.client_context(self.env.ca.issue(self.identity)), trust_domain=TD,
                expected={self.env.identity("server")})
            out = await up.open_stream(f"{server.ip}:{APP_PORT}")
        except Exception:
            sock.close()
            incoming.reject(503)
            return
        down = incoming.accept()

        async def pump(a: Any, b: Any) -> None:
            while data := await a.read():
                await b.write(data)
            b.write_eof()

        try:
            await asyncio.gather(pump(down, out), pump(out, down))
        finally:
            up.close()

    async def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@dataclass
class World:
    nodes: dict[str, Node]
    waypoint: StandInWaypoint | None


@pytest.fixture
def world(env: Env) -> Iterator[Callable[..., World]]:
    """Factory: ``world(waypoint=GatewayAddress|None, stand_in=identity|None)`` starts the
    stand-in waypoint and one ztunnel per node; everything stops at the end of the test."""
    built: list[World] = []

    async def build(gw: GatewayAddress | None, stand_in: SpiffeId | None) -> World:
        wp = None
        if stand_in is not None:
            wp = StandInWaypoint(env, stand_in)
            await wp.start()
        w = World({}, wp)
        built.append(w)
        for node in ("node1", "node2"):
            n = await start_node(node, env.ca, objects(env, gw))
            w.nodes[node] = n
            for name, pod in env.pods.items():
                if pod.node == node and PODS[name][3]:
                    await n.zt.add_pod(pod.uid, pod.name, pod.namespace, pod.netns_path,
                                       workload_uid=f"Kubernetes//Pod/apps/{name}")
        return w

    def start(waypoint: GatewayAddress | None = WAYPOINT,
              stand_in: SpiffeId | None = WAYPOINT_ID) -> World:
        return env.loop.run(build(waypoint, stand_in))

    try:
        yield start
    finally:
        for w in built:
            for n in w.nodes.values():
                env.loop.run(stop_node(n))
            if w.waypoint is not None:
                env.loop.run(w.waypoint.stop())


def _probe(env: Env, host: str, port: int) -> Any:
    return tcp_probe(env.pods["client"].netns, host, port, b"through the waypoint\n", timeout=10)


def test_service_traffic_goes_through_the_waypoint(env: Env, world: Callable[..., World]) -> None:
    w = world()
    r = _probe(env, VIP, 80)
    assert r.ok, r.error
    assert r.server_name == "server"
    assert r.seen_client is not None and r.seen_client[0] == env.pods["wp"].ip  # re-originated
    assert w.waypoint is not None
    # ztunnel asked the waypoint for the *original* destination, as the client.
    assert w.waypoint.seen == [(f"{VIP}:80", env.identity("client"))]
    # The destination saw the waypoint as the source (what its L4 policies evaluate).
    dest, src = w.nodes["node2"], w.nodes["node1"]
    assert wait_until(lambda: dest.closed_series(
        reporter="destination", source_principal=str(env.identity("wp")), response_flags="-"))
    # The client's ztunnel reports the waypoint as the peer, the service as the destination.
    assert wait_until(lambda: src.closed_series(
        reporter="source", destination_workload="wp", destination_service=SVC_HOST,
        response_flags="-"))


def test_skipping_the_waypoint_is_refused_by_the_destination(
    env: Env, world: Callable[..., World]
) -> None:
    w = world()
    server = env.pods["server"]
    r = _probe(env, server.ip, APP_PORT)  # straight to the pod: no waypoint on the way
    assert not r.ok and r.server_name is None, r
    dest = w.nodes["node2"]
    assert wait_until(lambda: dest.closed_series(
        reporter="destination", source_principal=str(env.identity("client")),
        response_flags="DENY"))
    # A hand-made CONNECT with the client's own certificate: 401, never the app.
    ctx = tls.client_context(env.ca.issue(env.identity("client")))
    out = env.loop.run(hbone_attempt(env.pods["client"].netns, server.ip, ctx,
                                     f"{server.ip}:{APP_PORT}", trust_domain=TD,
                                     expected={env.identity("server")}))
    assert (out.kind, out.status) == ("status", 401), out


def test_without_a_waypoint_pod_traffic_is_allowed(env: Env, world: Callable[..., World]) -> None:
    """Control for the test above: the same pod traffic when the service has no waypoint."""
    world(waypoint=None, stand_in=None)
    r = _probe(env, env.pods["server"].ip, APP_PORT)
    assert r.ok and r.server_name == "server", r


def test_waypoint_down_fails_closed(env: Env, world: Callable[..., World]) -> None:
    w = world(stand_in=None)  # the waypoint's pod exists, nothing listens on its 15008
    r = _probe(env, VIP, 80)
    assert not r.ok and r.server_name is None, r
    src = w.nodes["node1"]
    assert wait_until(lambda: src.closed_series(
        reporter="source", destination_service=SVC_HOST, response_flags="CONNECT"))


@pytest.mark.parametrize("gw", [
    GatewayAddress(NamespacedHostname("apps", "ghost.apps.svc.cluster.local")),
    GatewayAddress(NetworkAddress("", ipaddress.ip_address("10.96.50.99"))),
], ids=["unknown hostname", "unknown address"])
def test_unknown_waypoint_fails_closed(
    env: Env, world: Callable[..., World], gw: GatewayAddress
) -> None:
    w = world(waypoint=gw)
    r = _probe(env, VIP, 80)
    assert not r.ok and r.server_name is None, r
    assert w.waypoint is not None and w.waypoint.seen == []  # not sent to any waypoint
    assert wait_until(lambda: w.nodes["node1"].closed_series(
        reporter="source", destination_service=SVC_HOST, response_flags="CONNECT"))


def test_waypoint_with_another_identity_is_refused(
    env: Env, world: Callable[..., World]
) -> None:
    w = world(stand_in=SpiffeId(TD, "apps", "impostor"))
    r = _probe(env, VIP, 80)
    assert not r.ok and r.server_name is None, r
    assert w.waypoint is not None and w.waypoint.seen == []  # the TLS identity check failed
    failed = w.nodes["node1"].closed_series(reporter="source", destination_service=SVC_HOST)
    assert failed and all(labels["response_flags"] != "-" for labels, _ in failed), failed
