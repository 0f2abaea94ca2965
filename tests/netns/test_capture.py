"""In-pod capture rules (contract C.3) against the real kernel, with iptables-nft."""

from __future__ import annotations

import contextlib
import secrets
import select
import socket
import struct

import pytest

from ambient.cluster import netlink
from ambient.cluster.capture import apply_capture, dump_rules, remove_capture
from ambient.cluster.cluster import LocalCluster
from ambient.cluster.echo import tcp_probe
from ambient.netns import socket_in_netns

pytestmark = pytest.mark.netns

SO_ORIGINAL_DST = 80


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(f"amb{secrets.token_hex(3)}", ["a", "b"],
                     str(tmp_path_factory.mktemp("capture")))
    try:
        c.create()
        c.add_pod("cap", "default", "a")  # captured
        c.add_pod("peer", "default", "a")  # same node, not captured
        c.add_pod("far", "default", "b")  # other node, not captured
        for p in ("cap", "peer", "far"):
            c.start_echo(p)
        apply_capture(c.pods["cap"].netns)
        yield c
    finally:
        assert c.destroy() == []


@pytest.fixture
def listeners(cluster):
    """ztunnel stand-ins: listeners on 15001/15006/15008 inside the captured pod."""
    socks = {}
    try:
        for port in (15001, 15006, 15008):
            s = socket_in_netns(cluster.pods["cap"].netns_path)
            socks[port] = s
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", port))
            s.listen(8)
            s.settimeout(5)
        yield socks
    finally:
        for s in socks.values():
            s.close()


def _original_dst(conn: socket.socket) -> tuple[str, int]:
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(addr), port


def _pending(s: socket.socket) -> bool:
    return bool(select.select([s], [], [], 0)[0])


@contextlib.contextmanager
def _client(netns_path: str, dst: tuple[str, int], mark: int | None = None):
    c = socket_in_netns(netns_path)
    try:
        if mark is not None:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        c.settimeout(5)
        c.connect(dst)
        yield c
    finally:
        c.close()


@pytest.mark.parametrize("dst_pod", ["peer", "far"])
def test_outbound_redirected_to_15001(cluster, listeners, dst_pod):
    cap, dst = cluster.pods["cap"], cluster.pods[dst_pod]
    with _client(cap.netns_path, (dst.ip, 8080)) as c:
        conn, peer = listeners[15001].accept()
        with conn:
            assert _original_dst(conn) == (dst.ip, 8080)
            assert peer[0] == cap.ip
            assert conn.getsockname()[1] == 15001
            c.sendall(b"x")
            assert conn.recv(1) == b"x"  # really connected to our listener, not the app
    assert not _pending(listeners[15006])


def test_inbound_redirected_to_15006(cluster, listeners):
    cap, far = cluster.pods["cap"], cluster.pods["far"]
    with _client(far.netns_path, (cap.ip, 8080)):
        conn, peer = listeners[15006].accept()
        with conn:
            assert _original_dst(conn) == (cap.ip, 8080)
            assert peer[0] == far.ip  # source preserved across nodes


def test_inbound_hbone_port_not_redirected(cluster, listeners):
    cap, peer_pod = cluster.pods["cap"], cluster.pods["peer"]
    with _client(peer_pod.netns_path, (cap.ip, 15008)):
        conn, peer = listeners[15008].accept()
        with conn:
            assert conn.getsockname() == (cap.ip, 15008)
            assert peer[0] == peer_pod.ip
    assert not _pending(listeners[15006])


def test_marked_socket_bypasses_capture(cluster, listeners):
    cap, far = cluster.pods["cap"], cluster.pods["far"]
    r = tcp_probe(cap.netns, far.ip, 8080, mark=1337)
    assert r.ok, r.error
    assert r.server_name == "far" and r.seen_client[0] == cap.ip
    assert not _pending(listeners[15001])


def test_loopback_not_redirected(cluster, listeners):
    cap = cluster.pods["cap"]
    r = tcp_probe(cap.netns, "127.0.0.1", 8080)
    assert r.ok and r.server_name == "cap", r.error


def test_rules_and_policy_routing_present_once(cluster):
    ns = cluster.pods["cap"].netns
    apply_capture(ns)  # re-apply: idempotent
    rules = dump_rules(ns)
    assert rules.count("-A PREROUTING -j ISTIO_PRERT") == 2  # mangle + nat
    assert rules.count("-A OUTPUT -j ISTIO_OUTPUT") == 2
    assert "--to-ports 15001" in rules and "--to-ports 15006" in rules
    assert "15053" not in rules
    assert "32764:\tfrom all fwmark 0x111/0xfff lookup 100" in netlink.ip_in(ns, "rule", "show")
    assert "local default dev lo" in netlink.ip_in(ns, "route", "show", "table", "100")


def test_remove_capture_restores_direct_path(tmp_path):
    c = LocalCluster(f"amb{secrets.token_hex(3)}", ["a"], str(tmp_path / "run"))
    try:
        c.create()
        src, dst = c.add_pod("s", "default", "a"), c.add_pod("d", "default", "a")
        c.start_echo(dst)
        apply_capture(src.netns)
        assert not tcp_probe(src.netns, dst.ip, 8080, timeout=2).ok  # nobody on 15001
        assert remove_capture(src.netns) == []
        assert remove_capture(src.netns) == []  # idempotent
        assert "ISTIO" not in dump_rules(src.netns)
        assert "fwmark 0x111" not in netlink.ip_in(src.netns, "rule", "show")
        r = tcp_probe(src.netns, dst.ip, 8080)
        assert r.ok and r.server_name == "d", r.error
    finally:
        assert c.destroy() == []
