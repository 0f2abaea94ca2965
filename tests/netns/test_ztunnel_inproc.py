"""Two ztunnels in the test process, serving real pods of a 2-node local cluster.

The pods are network namespaces with the in-pod capture rules and echo apps (the cluster
harness); the ztunnels run on one event loop in a background thread, with the mesh
configuration given directly as model objects.  Each test starts fresh ztunnels (fresh
stores, metrics and certificates) over the same module-wide cluster, so a test that drains or
removes a pod leaves nothing behind for the next one.

Topology: client-a (node1) -> server-b (node2) crosses nodes; client-a -> server-a2 (node1)
stays on one node: it takes the same-node shortcut (ztunnel/samenode.py; no HBONE, same checks
and results) unless the test turns it off.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from ztunnel_fixtures import (
    ZTUNNEL_MARK,
    HeldConnection,
    LoopThread,
    Node,
    cert_serial,
    connect_refused,
    hbone_attempt,
    start_node,
    stop_node,
    wait_until,
)

from ambient import tls
from ambient.ca import CertificateAuthority
from ambient.cluster.cluster import LocalCluster, PodHandle
from ambient.cluster.echo import tcp_probe
from ambient.hbone.pool import PoolKey
from ambient.identity import SpiffeId
from ambient.model import Action, Match, Policy, Scope, StringMatch, TunnelProtocol, Workload
from cni.capture.base import PodCapture
from cni.capture.iptables import IptablesBackend

pytestmark = pytest.mark.netns

TD = "cluster.local"
APP_PORT = 8080
# name -> (kubernetes namespace, service account, node)
PODS = {
    "client-a": ("front", "client", "node1"),
    "server-b": ("apps", "server", "node2"),
    "server-a2": ("apps", "server-a2", "node1"),
}


@dataclass
class Env:
    cluster: LocalCluster
    loop: LoopThread
    ca: CertificateAuthority
    ca_dir: str
    pods: dict[str, PodHandle] = field(default_factory=dict)
    workloads: dict[str, Workload] = field(default_factory=dict)

    def identity(self, pod: str) -> SpiffeId:
        return self.workloads[pod].identity()


@dataclass
class Mesh:
    nodes: dict[str, Node] = field(default_factory=dict)


def _workload(pod: PodHandle) -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/{pod.namespace}/{pod.name}",
        name=pod.name,
        namespace=pod.namespace,
        addresses=(ipaddress.ip_address(pod.ip),),
        tunnel_protocol=TunnelProtocol.HBONE,
        service_account=pod.service_account,
        node=pod.node,
        workload_name=pod.name,
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    run_dir = tmp_path_factory.mktemp("zi")
    cluster = LocalCluster(f"zi{secrets.token_hex(2)}", ["node1", "node2"], str(run_dir / "run"))
    loop: LoopThread | None = None
    try:
        cluster.create()
        ca_dir = str(run_dir / "ca")
        CertificateAuthority.generate(TD).save_dir(ca_dir)
        loop = LoopThread()
        e = Env(cluster, loop, CertificateAuthority.load_dir(ca_dir, trust_domain=TD), ca_dir)
        for name, (ns, sa, node) in PODS.items():
            pod = cluster.add_pod(name, ns, node, service_account=sa)
            cluster.start_echo(pod, tcp_port=APP_PORT)
            IptablesBackend().apply(PodCapture(pod.uid, pod.name, pod.namespace,
                                                     pod.netns_path))
            e.pods[name] = pod
            e.workloads[name] = _workload(pod)
        yield e
    finally:
        if loop is not None:
            loop.close()
        errors = cluster.destroy()
        assert errors == [], errors


@pytest.fixture
def mesh(env: Env) -> Iterator[Callable[..., Mesh]]:
    """Factory: ``mesh(extra=[...], ttl=..., node1={settings}, node2={settings})`` starts one
    ztunnel per node serving that node's pods; all are stopped at the end of the test."""
    built: list[Mesh] = []

    async def build(m: Mesh, extra: list[Any], ttl: float | None,
                    settings: dict[str, dict[str, Any]]) -> Mesh:
        for node in ("node1", "node2"):
            n = await start_node(node, env.ca, [*env.workloads.values(), *extra], ttl=ttl,
                                 **settings.get(node, {}))
            m.nodes[node] = n
            for name, pod in env.pods.items():
                if pod.node == node:
                    await n.zt.add_pod(pod.uid, pod.name, pod.namespace, pod.netns_path,
                                       workload_uid=env.workloads[name].uid)
        return m

    def start(extra: list[Any] | None = None, ttl: float | None = None,
              **settings: dict[str, Any]) -> Mesh:
        m = Mesh()
        built.append(m)
        return env.loop.run(build(m, list(extra or []), ttl, settings))

    try:
        yield start
    finally:
        for m in built:
            for n in m.nodes.values():
                env.loop.run(stop_node(n))


def _probe(env: Env, src: str, dst: str, payload: bytes = b"ping through the mesh\n"):
    return tcp_probe(env.pods[src].netns, env.pods[dst].ip, APP_PORT, payload, timeout=10)


def _no_greeting(result: Any) -> bool:
    return not result.ok and result.server_name is None


# ------------------------------------------------------------------------------- 1. data path


@pytest.mark.parametrize(("dst", "dst_node"), [("server-b", "node2"), ("server-a2", "node1")],
                         ids=["cross-node", "same-node"])
def test_connection_through_both_sides_is_mutual_tls(
    env: Env, mesh: Callable[..., Mesh], dst: str, dst_node: str
) -> None:
    m = mesh()
    client = env.pods["client-a"]
    src_id, dst_id = str(env.identity("client-a")), str(env.identity(dst))
    dest = m.nodes[dst_node]

    # A live connection shows up in the destination's tracker with the proven identity.
    with HeldConnection(client.netns, env.pods[dst].ip, APP_PORT) as held:
        assert held.greeting.startswith(f"hello from {dst}; you are {client.ip}:"), held.greeting
        assert held.echo(b"abc\n") == b"abc\n"
        live = wait_until(lambda: _live_from(dest.tracker, src_id))  # the admin's tracker
        assert live, dest.tracker.list()
        assert live[0].security_policy == "mutual_tls"
        assert str(live[0].dst_identity) == dst_id

    payload = b"x" * 3000 + b"\n"
    r = _probe(env, "client-a", dst, payload)
    assert r.ok, r.error
    assert r.server_name == dst
    assert r.seen_client is not None and r.seen_client[0] == client.ip  # source IP kept

    want = dict(source_principal=src_id, destination_principal=dst_id,
                connection_security_policy="mutual_tls", response_flags="-")
    assert wait_until(lambda: len(dest.closed_series(reporter="destination", **want)) == 1 and
                      dest.closed_series(reporter="destination", **want)[0][1] >= 2), \
        dest.metrics.render().decode()
    received = dest.series("received_bytes", reporter="destination", source_principal=src_id)
    assert received and received[0][1] >= len(payload) + 4
    source_side = m.nodes["node1"]
    assert wait_until(lambda: source_side.closed_series(reporter="source", **want))


def _live_from(tracker: Any, src_id: str) -> list[Any]:
    return [r for r in tracker.results()
            if r.reporter == "destination" and str(r.src_identity) == src_id]


def test_tracker_given_to_ztunnel_sees_live_connections(
    env: Env, mesh: Callable[..., Mesh]
) -> None:
    # Regression: an empty tracker is falsy (it has __len__) and was once replaced.
    m = mesh()
    client, dest = env.pods["client-a"], m.nodes["node2"]
    assert dest.zt.tracker is dest.tracker
    with HeldConnection(client.netns, env.pods["server-b"].ip, APP_PORT) as held:
        assert held.echo(b"abc\n") == b"abc\n"
        assert wait_until(lambda: _live_from(dest.tracker, str(env.identity("client-a"))))
    assert wait_until(lambda: not dest.tracker.results())


# ------------------------------------------------------------------------------- 2. HBONE checks


def test_direct_hbone_connect_is_validated(env: Env, mesh: Callable[..., Mesh]) -> None:
    m = mesh()
    client, srv, other = env.pods["client-a"], env.pods["server-b"], env.pods["server-a2"]
    cid, sid = env.identity("client-a"), env.identity("server-b")
    good = tls.client_context(env.ca.issue(cid))

    def attempt(ctx: Any, authority: str):
        return env.loop.run(hbone_attempt(client.netns, srv.ip, ctx, authority,
                                          trust_domain=TD, expected={sid}))

    # Control: the right authority with a mesh certificate gets through to the app.
    ok = attempt(good, f"{srv.ip}:{APP_PORT}")
    assert ok.kind == "ok", ok
    assert ok.greeting.startswith(f"hello from server-b; you are {client.ip}:"), ok

    # An authority that is not the destination pod's address.
    wrong_ip = attempt(good, f"{other.ip}:{APP_PORT}")
    assert (wrong_ip.kind, wrong_ip.status) == ("status", 400), wrong_ip

    # ztunnel's own ports are never a tunnel target.
    for port in (15001, 15006, 15008):
        illegal = attempt(good, f"{srv.ip}:{port}")
        assert (illegal.kind, illegal.status) == ("status", 503), (port, illegal)

    # A client certificate from a CA the mesh does not trust: the server refuses the TLS.
    foreign = CertificateAuthority.generate(TD).issue(cid)
    foreign_ctx = tls.client_context(dataclasses.replace(foreign, roots_pem=env.ca.roots_pem))
    out = attempt(foreign_ctx, f"{srv.ip}:{APP_PORT}")
    assert out.kind in ("tls", "reset"), out

    # Signed by the mesh CA, but for another trust domain: refused by the identity check.
    other_td = CertificateAuthority.load_dir(env.ca_dir, trust_domain="evil.example")
    evil_id = SpiffeId("evil.example", cid.namespace, cid.service_account)
    out = attempt(tls.client_context(other_td.issue(evil_id)), f"{srv.ip}:{APP_PORT}")
    assert out.kind in ("tls", "reset"), out

    dest = m.nodes["node2"]
    assert wait_until(lambda: dest.closed_series(reporter="destination",
                                                 source_principal=str(cid), response_flags="-"))
    # Refused CONNECTs are recorded as failures; the TLS-refused peers never got that far.
    assert dest.series("connections_failed", reporter="destination", source_principal=str(cid))
    assert not dest.series("connections_opened", source_principal=str(evil_id))


# ------------------------------------------------------------------------------- 3. policy


def _deny_client(env: Env, *, dry_run: bool) -> Policy:
    principal = str(env.identity("client-a")).removeprefix("spiffe://")
    return Policy(
        name="deny-client", namespace=env.pods["server-b"].namespace, scope=Scope.NAMESPACE,
        action=Action.DENY, dry_run=dry_run,
        groups=(((Match(principals=(StringMatch("exact", principal),)),),),),
    )


def test_deny_policy_blocks_and_dry_run_does_not(env: Env, mesh: Callable[..., Mesh]) -> None:
    m = mesh(extra=[_deny_client(env, dry_run=False)])
    dest = m.nodes["node2"]
    src_id = str(env.identity("client-a"))

    r = _probe(env, "client-a", "server-b")
    assert _no_greeting(r), r
    assert wait_until(lambda: dest.closed_series(reporter="destination", source_principal=src_id,
                                                 response_flags="DENY"))
    assert not dest.closed_series(reporter="destination", response_flags="-")

    # The same policy in dry-run mode is only logged.
    assert dest.store.apply([_deny_client(env, dry_run=True)]) == []
    r = _probe(env, "client-a", "server-b")
    assert r.ok, r.error
    assert wait_until(lambda: dest.closed_series(reporter="destination", source_principal=src_id,
                                                 response_flags="-"))


def test_policy_change_closes_an_open_connection_it_now_denies(
    env: Env, mesh: Callable[..., Mesh]
) -> None:
    m = mesh()
    dest = m.nodes["node2"]
    src_id = str(env.identity("client-a"))
    client = env.pods["client-a"]

    async def apply(objs: list[Any]) -> list[Any]:
        return dest.store.apply(objs)  # on ztunnel's loop, as its config sources do

    with HeldConnection(client.netns, env.pods["server-b"].ip, APP_PORT) as held, \
            HeldConnection(client.netns, env.pods["server-a2"].ip, APP_PORT) as other:
        assert held.echo(b"before\n") == b"before\n"
        assert other.echo(b"before\n") == b"before\n"
        assert env.loop.run(apply([_deny_client(env, dry_run=False)])) == []
        assert held.wait_closed(), "the connection the new policy denies stayed open"
        assert wait_until(lambda: dest.closed_series(
            reporter="destination", source_principal=src_id, response_flags="DENY"))
        # node1's ztunnel (its configuration unchanged) keeps its connection open.
        assert other.echo(b"after\n") == b"after\n"


def test_same_node_shortcut_keeps_policy_and_late_rejection(
    env: Env, mesh: Callable[..., Mesh]
) -> None:
    # _deny_client covers namespace "apps", where server-a2 (node1) lives too.
    m = mesh(extra=[_deny_client(env, dry_run=False)])
    node1 = m.nodes["node1"]
    src_id = str(env.identity("client-a"))
    r = _probe(env, "client-a", "server-a2")
    assert _no_greeting(r), r
    assert wait_until(lambda: node1.closed_series(reporter="destination",
                                                  source_principal=src_id, response_flags="DENY"))
    assert wait_until(lambda: node1.closed_series(reporter="source", source_principal=src_id,
                                                  response_flags="DENY"))
    assert not node1.closed_series(reporter="destination", response_flags="-")

    # Allowed again (dry run), then denied while a connection is open: it is closed.
    assert env.loop.run(_apply(node1, [_deny_client(env, dry_run=True)])) == []
    with HeldConnection(env.pods["client-a"].netns, env.pods["server-a2"].ip, APP_PORT) as held:
        assert held.echo(b"before\n") == b"before\n"
        assert env.loop.run(_apply(node1, [_deny_client(env, dry_run=False)])) == []
        assert held.wait_closed(), "the same-node connection the new policy denies stayed open"


async def _apply(node: Node, objs: list[Any]) -> list[Any]:
    return node.store.apply(objs)  # on ztunnel's loop, as its config sources do


@pytest.fixture(scope="module")
def splice_pins() -> Iterator[str]:
    """The node agent's kernel splice maps, loaded into a pin dir of this module's own."""
    from bpf import splice

    pin_dir = f"/sys/fs/bpf/ambtest-zi-{secrets.token_hex(3)}"
    try:
        assert splice.load_splice(pin_dir, max_entries=64) is True
        yield pin_dir
    finally:
        assert splice.unload_splice(pin_dir) == []


@pytest.mark.parametrize("path", ["relay", "kernel", "hbone-to-itself"])
def test_same_node_shortcut_skips_the_tunnel_only(
    env: Env, mesh: Callable[..., Mesh], splice_pins: str, path: str
) -> None:
    shortcut = path != "hbone-to-itself"
    m = mesh(node1={"same_node_shortcut": shortcut, "kernel_splice": path == "kernel",
                    "bpf_pin_dir": splice_pins})
    node1 = m.nodes["node1"]
    client = env.pods["client-a"]
    payload = b"y" * 5000 + b"\n"
    r = _probe(env, "client-a", "server-a2", payload)
    assert r.ok, r.error
    assert r.seen_client is not None and r.seen_client[0] == client.ip
    want = dict(source_principal=str(env.identity("client-a")),
                destination_principal=str(env.identity("server-a2")),
                connection_security_policy="mutual_tls", response_flags="-")
    for reporter in ("source", "destination"):
        assert wait_until(lambda r=reporter: node1.closed_series(reporter=r, **want)), reporter
    received = node1.series("received_bytes", reporter="destination",
                            source_principal=want["source_principal"])
    assert received and received[0][1] >= len(payload)
    pool = node1.zt.pods[client.uid].pool
    assert pool is not None
    # With the shortcut no HBONE connection is opened to the node's own pod.
    assert (pool.connection_count == 0) is shortcut
    assert node1.zt.local.kernel_used == (1 if path == "kernel" else 0)
    if path != "hbone-to-itself":  # exact byte counts, whoever moved the bytes
        # received = request bytes, sent = response bytes (a greeting, then the echo)
        counts = {(fam, rep): node1.series(fam, reporter=rep,
                                           source_principal=want["source_principal"])[0][1]
                  for fam in ("received_bytes", "sent_bytes") for rep in ("source", "destination")}
        assert counts[("received_bytes", "source")] == len(payload), counts
        assert counts[("received_bytes", "destination")] == len(payload), counts
        greeting = len(r.greeting or "") + 1  # its newline
        assert counts[("sent_bytes", "source")] == len(payload) + greeting, counts
        assert counts[("sent_bytes", "destination")] == len(payload) + greeting, counts


# ------------------------------------------------------------------------------- 4. del_pod



def test_del_pod_closes_listeners_and_fails_closed(env: Env, mesh: Callable[..., Mesh]) -> None:
    m = mesh()
    srv = env.pods["server-b"]
    env.loop.run(m.nodes["node2"].zt.del_pod(srv.uid))
    assert srv.uid not in m.nodes["node2"].zt.pods

    r = _probe(env, "client-a", "server-b")
    assert _no_greeting(r), r
    for port in (15008, 15006, 15001):
        assert connect_refused(srv.netns, srv.ip, port, mark=ZTUNNEL_MARK), port
    # Without ztunnel, the captured pod is not reachable in plaintext either (15006 is gone).
    assert _no_greeting(tcp_probe(env.pods["server-a2"].netns, srv.ip, APP_PORT,
                                  mark=ZTUNNEL_MARK, timeout=10))
    # The other pods are untouched.
    assert _probe(env, "client-a", "server-a2").ok


def test_del_pod_closes_pooled_hbone_connections(env: Env, mesh: Callable[..., Mesh]) -> None:
    m = mesh()
    srv = env.pods["server-b"]
    assert _probe(env, "client-a", "server-b").ok  # leaves a pooled HBONE connection
    env.loop.run(m.nodes["node2"].zt.del_pod(srv.uid))
    assert connect_refused(srv.netns, srv.ip, 15008, mark=ZTUNNEL_MARK)

    r = _probe(env, "client-a", "server-b")
    assert _no_greeting(r), r


# ------------------------------------------------------------------------------- 5. drain


def test_drain_closes_live_connections_and_refuses_new(
    env: Env, mesh: Callable[..., Mesh]
) -> None:
    m = mesh()
    client, srv = env.pods["client-a"], env.pods["server-b"]
    src_node, dest = m.nodes["node1"], m.nodes["node2"]
    with HeldConnection(client.netns, srv.ip, APP_PORT) as held:
        assert held.greeting.startswith("hello from server-b"), held.greeting
        assert held.echo(b"before drain\n") == b"before drain\n"

        env.loop.run(dest.zt.drain(1.0), timeout=60)  # it returns; no timing asserted
        assert dest.zt.draining and not dest.zt.pods
        assert held.wait_closed(), "the live connection survived the drain deadline"
    assert connect_refused(srv.netns, srv.ip, 15008, mark=ZTUNNEL_MARK)

    # Drain the source side too: the client's captured connections find no proxy.
    with HeldConnection(client.netns, env.pods["server-a2"].ip, APP_PORT) as held:
        assert held.echo(b"x\n") == b"x\n"
        env.loop.run(src_node.zt.drain(1.0), timeout=60)
        assert held.wait_closed(), "the live connection survived the drain deadline"
    assert connect_refused(client.netns, env.pods["server-a2"].ip, APP_PORT)
    assert connect_refused(client.netns, srv.ip, APP_PORT)


def test_drain_records_connections_it_cuts(env: Env, mesh: Callable[..., Mesh]) -> None:
    m = mesh()
    client, srv, dest = env.pods["client-a"], env.pods["server-b"], m.nodes["node2"]
    with HeldConnection(client.netns, srv.ip, APP_PORT) as held:
        assert held.echo(b"x\n") == b"x\n"
        env.loop.run(dest.zt.drain(1.0), timeout=60)
        assert held.wait_closed()
    src_id = str(env.identity("client-a"))
    assert wait_until(lambda: dest.closed_series(reporter="destination", source_principal=src_id))
    assert not dest.tracker.results()
    assert dest.metrics.sockets_open.value("destination") == 0


def test_drain_refuses_new_streams_on_pooled_connections(
    env: Env, mesh: Callable[..., Mesh]
) -> None:
    m = mesh()
    client, srv = env.pods["client-a"], env.pods["server-b"]
    with HeldConnection(client.netns, srv.ip, APP_PORT) as held:
        assert held.echo(b"before drain\n") == b"before drain\n"
        env.loop.run(m.nodes["node2"].zt.drain(1.0), timeout=60)
        assert held.wait_closed()

    r = _probe(env, "client-a", "server-b")
    assert _no_greeting(r), r


def test_rolling_restart_moves_new_connections_to_the_new_ztunnel(
    env: Env, mesh: Callable[..., Mesh]
) -> None:
    """A second ztunnel takes server-b over (its listeners join with SO_REUSEPORT), then the
    old one drains.  The source's pooled HBONE connection still leads to the old one: a new
    CONNECT on it is refused unprocessed and retried on a new connection, which reaches the
    new ztunnel; the live connection keeps working through the old one until it ends."""
    m = mesh()
    client, srv = env.pods["client-a"], env.pods["server-b"]
    old = m.nodes["node2"]
    new = env.loop.run(start_node("node2", env.ca, env.workloads.values()))
    drain: list[asyncio.Task[None]] = []

    async def start_drain() -> None:
        drain.append(asyncio.ensure_future(old.zt.drain(30.0)))
        await asyncio.sleep(0)

    src_id = str(env.identity("client-a"))
    try:
        with HeldConnection(client.netns, srv.ip, APP_PORT) as held:  # pooled, to the old one
            assert held.echo(b"before\n") == b"before\n"
            env.loop.run(new.zt.add_pod(srv.uid, srv.name, srv.namespace, srv.netns_path,
                                        workload_uid=env.workloads["server-b"].uid))
            env.loop.run(start_drain())
            assert old.zt.draining
            for i in range(5):
                r = _probe(env, "client-a", "server-b", f"after the drain {i}\n".encode())
                assert r.ok, r.error
            served = new.series("connections_opened", reporter="destination",
                                source_principal=src_id)
            assert [v for _, v in served] == [5], served
            assert held.echo(b"still here\n") == b"still here\n"  # the old one drains it
        env.loop.run(asyncio.wait_for(asyncio.shield(drain[0]), 30))
        opened = old.series("connections_opened", reporter="destination",
                            source_principal=src_id)
        assert [v for _, v in opened] == [1], opened  # only the held connection
    finally:
        env.loop.run(stop_node(new))
        for t in drain:
            env.loop.run(asyncio.wait_for(asyncio.shield(t), 60))


# ------------------------------------------------------------------------------- 6. rotation


def test_certificate_rotation_keeps_live_connections(
    env: Env, mesh: Callable[..., Mesh]
) -> None:
    # One stream per pooled connection, so a connection opened after the rotation needs a
    # new TLS handshake (with the new certificates) instead of riding the old one.
    m = mesh(ttl=6.0, node1={"pool_max_streams": 1})
    client, srv = env.pods["client-a"], env.pods["server-b"]
    src_node, dst_node = m.nodes["node1"], m.nodes["node2"]
    cid, sid = env.identity("client-a"), env.identity("server-b")

    with HeldConnection(client.netns, srv.ip, APP_PORT) as held:
        assert held.greeting.startswith("hello from server-b"), held.greeting
        assert held.echo(b"before rotation\n") == b"before rotation\n"
        before = (cert_serial(src_node, cid), cert_serial(dst_node, sid))
        assert None not in before

        def rotated() -> bool:
            now = (cert_serial(src_node, cid), cert_serial(dst_node, sid))
            return None not in now and now[0] != before[0] and now[1] != before[1]

        assert wait_until(rotated, timeout=40), (before, src_node.certs.dump())
        assert held.echo(b"after rotation\n") == b"after rotation\n"

        r = _probe(env, "client-a", "server-b")
        assert r.ok, r.error
        key = PoolKey(src_identity=cid, dst_identities=frozenset({sid}),
                      src_ip=ipaddress.ip_address(client.ip),
                      dst=(ipaddress.ip_address(srv.ip), 15008))
        pool = src_node.zt.pods[client.uid].pool
        assert pool is not None and len(pool.connections(key)) >= 2
        assert held.echo(b"still here\n") == b"still here\n"
