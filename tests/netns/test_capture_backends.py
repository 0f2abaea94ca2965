"""Every capture backend against the real kernel, with real sockets (contract C.3 and C.4).

Topology per test: a "pod" netns joined by a veth to a "node" netns.  The node holds an
"outside" address 10.77.1.1 (an echo listener stands there) and reaches the pod at 10.77.0.2.
Inside the pod, listeners on 15001/15006/15008 play ztunnel (SO_MARK 1337, like ztunnel's
sockets) and a listener on 8080 plays the application.

The fixture is built around ``make_backend(name)``: to run these cases for another backend,
add its name to ``BACKENDS`` (and its options to ``backend_options``, its way of deleting one
piece of capture to ``SABOTAGE``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import select
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from ambient.bpfmap import OrigDstMap
from ambient.cluster import cgroups, netlink
from ambient.netns import netns_path, socket_in_netns
from cni.capture import make_backend
from cni.capture.base import CaptureBackend, PodCapture
from cni.capture.common import read_sysctl, run
from cni.capture.probe import ProbeSnat
from ztunnel.sockets import original_dst

pytestmark = pytest.mark.netns

BACKENDS = ["iptables", "nftables", "ebpf"]
SO_ORIGINAL_DST = 80
IP_TRANSPARENT = 19
NODE_IP, POD_IP, OUTSIDE_IP = "10.77.0.1", "10.77.0.2", "10.77.1.1"
APP_PORT = 8080
ZTUNNEL_MARK = 1337


def backend_options(name: str, topo: Topo, stack: contextlib.ExitStack) -> dict[str, object]:
    """Backend-specific constructor options for this topology (none for the rule backends).

    eBPF: the cgroup programs act on sockets of processes in ``cgroup_path``, and the clients
    here are this test process's sockets, so the process joins a test cgroup for the test."""
    if name != "ebpf":
        return {}
    topo.bpf_pin_dir = f"/sys/fs/bpf/ambtest-{topo.pod}"
    return {"cgroup_path": stack.enter_context(_this_process_in_test_cgroup(topo.pod)),
            "pin_dir": topo.bpf_pin_dir}


@contextlib.contextmanager
def _this_process_in_test_cgroup(name: str) -> Iterator[str]:
    mount = cgroups.cgroup2_mount()
    with open("/proc/self/cgroup") as f:
        home = next(line.split("::", 1)[1].strip() for line in f if line.startswith("0::"))
    path = cgroups.create_cgroup(os.path.join(mount, f"ambtest-{name}"))
    try:
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        yield path
    finally:
        with open(os.path.join(mount, home.lstrip("/"), "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        cgroups.remove_cgroup(path)


@dataclass
class Topo:
    node: str  # ip netns names
    pod: str
    listeners: dict[int, socket.socket] = field(default_factory=dict)  # in the pod
    outside: socket.socket | None = None  # in the node, on OUTSIDE_IP:APP_PORT
    bpf_pin_dir: str = ""  # the eBPF backend's pinned maps (ztunnel reads amb_origdst)

    @property
    def node_path(self) -> str:
        return netns_path(self.node)

    @property
    def pod_path(self) -> str:
        return netns_path(self.pod)

    def spec(self, **changes: object) -> PodCapture:
        pod = PodCapture(uid=f"uid-{self.pod}", name=self.pod, namespace="test",
                         netns=self.pod_path, ips=(POD_IP,))
        return dataclasses.replace(pod, **changes)  # type: ignore[arg-type]


def _listen(netns: str, addr: tuple[str, int], mark: int | None = None) -> socket.socket:
    s = socket_in_netns(netns)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if mark is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        s.bind(addr)
        s.listen(16)
        s.settimeout(5)
    except BaseException:
        s.close()
        raise
    return s


@pytest.fixture
def topo() -> Iterator[Topo]:
    tok = secrets.token_hex(3)
    t = Topo(node=f"capn-{tok}", pod=f"capp-{tok}")
    try:
        netlink.create_netns(t.node)
        netlink.create_netns(t.pod)
        netlink.add_veth(t.node, f"vp{tok}", t.pod, "eth0")
        netlink.add_address(t.node, f"vp{tok}", f"{NODE_IP}/24")
        netlink.add_address(t.node, "lo", f"{OUTSIDE_IP}/32")
        netlink.add_address(t.pod, "eth0", f"{POD_IP}/24")
        netlink.add_route(t.pod, "default", via=NODE_IP)
        for port in (15001, 15006, 15008):
            t.listeners[port] = _listen(t.pod_path, ("0.0.0.0", port), ZTUNNEL_MARK)
        # The eBPF backend hands virtual-interface SYNs to 15001 with their original (foreign)
        # destination kept: the listener answers from that address only with IP_TRANSPARENT.
        t.listeners[15001].setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        t.listeners[APP_PORT] = _listen(t.pod_path, ("0.0.0.0", APP_PORT))
        t.outside = _listen(t.node_path, (OUTSIDE_IP, APP_PORT))
        yield t
    finally:
        for s in [*t.listeners.values(), t.outside]:
            if s is not None:
                s.close()
        netlink.delete_netns(t.pod)
        netlink.delete_netns(t.node)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, topo: Topo) -> Iterator[CaptureBackend]:
    with contextlib.ExitStack() as stack:
        b = make_backend(request.param, **backend_options(request.param, topo, stack))
        reason = b.unavailable_reason()
        assert reason is None, reason  # a missing tool is a failure here, not a skip
        b.setup_node()
        try:
            yield b
        finally:
            errors = b.remove(topo.spec()) if netlink.netns_exists(topo.pod) else []
            errors += b.teardown_node()
            assert errors == []


def _original_dst(conn: socket.socket, topo: Topo) -> tuple[str, int]:
    """As ztunnel finds it: SO_ORIGINAL_DST, else the eBPF backend's map or local address."""
    origmap = OrigDstMap(topo.bpf_pin_dir or "/nonexistent")
    try:
        return original_dst(conn, origdst_map=origmap)
    finally:
        origmap.close()


def _pending(s: socket.socket) -> bool:
    return bool(select.select([s], [], [], 0)[0])


@contextlib.contextmanager
def _connect(netns: str, dst: tuple[str, int], mark: int | None = None) -> Iterator[socket.socket]:
    c = socket_in_netns(netns)
    try:
        if mark is not None:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        c.settimeout(5)
        c.connect(dst)
        yield c
    finally:
        c.close()


def _accept(listener: socket.socket) -> tuple[socket.socket, tuple[str, int]]:
    conn, peer = listener.accept()
    conn.settimeout(5)
    return conn, peer


# -- (a) outbound -----------------------------------------------------------------------------

def test_outbound_lands_on_15001_with_original_destination(topo: Topo,
                                                           backend: CaptureBackend) -> None:
    backend.apply(topo.spec())
    assert read_sysctl(topo.pod_path, "net/ipv4/tcp_migrate_req") == "1"
    with _connect(topo.pod_path, (OUTSIDE_IP, APP_PORT)) as c:
        conn, peer = _accept(topo.listeners[15001])
        with conn:
            assert _original_dst(conn, topo) == (OUTSIDE_IP, APP_PORT)
            assert peer[0] == POD_IP and conn.getsockname()[1] == 15001
            c.sendall(b"ping")
            assert conn.recv(4) == b"ping"  # really connected to our listener
    assert topo.outside is not None and not _pending(topo.outside)


def test_loopback_is_not_captured(topo: Topo, backend: CaptureBackend) -> None:
    backend.apply(topo.spec())
    with _connect(topo.pod_path, ("127.0.0.1", APP_PORT)):
        conn, _ = _accept(topo.listeners[APP_PORT])
        conn.close()
    assert not _pending(topo.listeners[15001])


# -- (b) inbound ------------------------------------------------------------------------------

def test_inbound_lands_on_15006_but_15008_is_left_alone(topo: Topo,
                                                        backend: CaptureBackend) -> None:
    backend.apply(topo.spec())
    with _connect(topo.node_path, (POD_IP, APP_PORT)):
        conn, peer = _accept(topo.listeners[15006])
        with conn:
            assert _original_dst(conn, topo) == (POD_IP, APP_PORT)
            assert peer[0] == NODE_IP  # source preserved
    with _connect(topo.node_path, (POD_IP, 15008)):
        conn, peer = _accept(topo.listeners[15008])
        with conn:
            assert conn.getsockname() == (POD_IP, 15008) and peer[0] == NODE_IP
    assert not _pending(topo.listeners[15006]) and not _pending(topo.listeners[APP_PORT])


def test_bypass_inbound_capture_variant(topo: Topo, backend: CaptureBackend) -> None:
    backend.apply(topo.spec(inbound_capture=False))
    assert backend.check(topo.spec(inbound_capture=False)) == []
    with _connect(topo.node_path, (POD_IP, APP_PORT)):
        conn, peer = _accept(topo.listeners[APP_PORT])
        conn.close()
    assert peer[0] == NODE_IP and not _pending(topo.listeners[15006])
    with _connect(topo.pod_path, (OUTSIDE_IP, APP_PORT)):  # outbound still captured
        conn, _ = _accept(topo.listeners[15001])
        conn.close()


def test_virtual_interface_traffic_goes_to_15001(topo: Topo, backend: CaptureBackend) -> None:
    tok = topo.pod.split("-")[-1]
    netlink.add_veth(topo.node, f"vt{tok}", topo.pod, "tun0")
    netlink.add_address(topo.node, f"vt{tok}", "10.77.2.1/24")
    netlink.add_address(topo.pod, "tun0", "10.77.2.2/24")
    netlink.add_route(topo.node, "10.78.0.0/24", via="10.77.2.2")
    spec = topo.spec(virtual_interfaces=("tun0",))
    backend.apply(spec)
    assert backend.check(spec) == []
    with _connect(topo.node_path, ("10.78.0.5", 80)):
        conn, _ = _accept(topo.listeners[15001])
        with conn:
            assert _original_dst(conn, topo) == ("10.78.0.5", 80)
    assert not _pending(topo.listeners[15006])


def test_app_replies_to_a_spoofed_source_reach_ztunnel(topo: Topo,
                                                      backend: CaptureBackend) -> None:
    """ztunnel delivers inbound traffic to the app from the *original* client address
    (IP_TRANSPARENT, mark 1337); the app's replies to that foreign address must come back to
    ztunnel (connmark 0x111 -> mark -> ``ip rule`` -> table 100) instead of leaving by eth0."""
    backend.apply(topo.spec())
    client = "10.99.0.5"  # nowhere on this topology: only the policy routing brings it home
    c = socket_in_netns(topo.pod_path)
    try:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, ZTUNNEL_MARK)
        c.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        c.bind((client, 0))
        c.settimeout(5)
        c.connect((POD_IP, APP_PORT))
        conn, peer = _accept(topo.listeners[APP_PORT])
        with conn:
            assert peer[0] == client
            conn.sendall(b"pong")
            assert c.recv(4) == b"pong"
    finally:
        c.close()
    assert not _pending(topo.listeners[15006])


# -- (c) ztunnel's own sockets ----------------------------------------------------------------

def test_marked_socket_is_not_captured(topo: Topo, backend: CaptureBackend) -> None:
    backend.apply(topo.spec())
    assert topo.outside is not None
    with _connect(topo.pod_path, (OUTSIDE_IP, APP_PORT), mark=ZTUNNEL_MARK):
        conn, peer = _accept(topo.outside)
        conn.close()
    assert peer[0] == POD_IP and not _pending(topo.listeners[15001])


# -- (d) + (h) kubelet probes -----------------------------------------------------------------

def _probe_flavor(name: str) -> str:
    return "nftables" if name == "nftables" else "iptables"


def test_probe_snat_reaches_the_app_uncaptured(topo: Topo, backend: CaptureBackend) -> None:
    backend.apply(topo.spec())
    probe = ProbeSnat(_probe_flavor(backend.name), topo.node_path)  # type: ignore[arg-type]
    try:
        probe.setup()
        probe.add_pod_ip(POD_IP)
        probe.setup()  # re-setup (agent restart) keeps the member
        assert probe.check([POD_IP]) == []
        with _connect(topo.node_path, (POD_IP, APP_PORT)):  # (d): not captured
            conn, peer = _accept(topo.listeners[APP_PORT])
            conn.close()
        assert peer[0] == "169.254.7.127"
        assert not _pending(topo.listeners[15006])
        probe.remove_pod_ip(POD_IP)
        probe.remove_pod_ip(POD_IP)  # idempotent
        assert probe.check([]) == []
        with _connect(topo.node_path, (POD_IP, APP_PORT)):  # (h): plain node traffic again
            conn, peer = _accept(topo.listeners[15006])
            conn.close()
        assert peer[0] == NODE_IP
    finally:
        assert probe.teardown() == []


def _node_snapshot(netns: str) -> dict[str, str]:
    out = {}
    for key, argv in (("iptables", ["/usr/sbin/iptables-save"]),
                      ("nft", ["/usr/sbin/nft", "list", "ruleset"]),
                      ("ipset", ["/usr/sbin/ipset", "list", "-n"])):
        p = run(netns, argv)
        assert p.returncode == 0, p.stderr
        out[key] = "\n".join(line for line in p.stdout.splitlines() if not line.startswith("#"))
    return out


@pytest.mark.parametrize("flavor", ["iptables", "nftables"])
def test_probe_snat_teardown_restores_the_node(topo: Topo, flavor: str) -> None:
    before = _node_snapshot(topo.node_path)
    probe = ProbeSnat(flavor, topo.node_path)  # type: ignore[arg-type]
    probe.setup()
    probe.add_pod_ip(POD_IP)
    assert probe.members() == {POD_IP}
    assert _node_snapshot(topo.node_path) != before
    assert probe.teardown() == []
    assert probe.teardown() == []  # idempotent
    assert _node_snapshot(topo.node_path) == before
    assert probe.check() != []  # and check says it is gone


def test_probe_snat_iptables_jump_comes_before_masquerade(topo: Topo) -> None:
    p = run(topo.node_path, ["/usr/sbin/iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "lo",
                             "-j", "MASQUERADE"])
    assert p.returncode == 0, p.stderr
    probe = ProbeSnat("iptables", topo.node_path)
    try:
        probe.setup()
        assert probe.check() == []
        save = run(topo.node_path, ["/usr/sbin/iptables-save", "-t", "nat"]).stdout
        posrt = [r for r in save.splitlines() if r.startswith("-A POSTROUTING")]
        assert posrt == ["-A POSTROUTING -j ISTIO_POSTRT", "-A POSTROUTING -o lo -j MASQUERADE"]
    finally:
        assert probe.teardown() == []
    save = run(topo.node_path, ["/usr/sbin/iptables-save", "-t", "nat"]).stdout
    assert "-A POSTROUTING -o lo -j MASQUERADE" in save and "ISTIO" not in save


# -- (e) fail closed --------------------------------------------------------------------------

def test_without_ztunnel_the_app_is_refused(topo: Topo, backend: CaptureBackend) -> None:
    backend.apply(topo.spec())
    topo.listeners.pop(15001).close()
    c = socket_in_netns(topo.pod_path)
    try:
        c.settimeout(5)
        with pytest.raises(ConnectionRefusedError):
            c.connect((OUTSIDE_IP, APP_PORT))
    finally:
        c.close()
    assert topo.outside is not None and not _pending(topo.outside)  # never went out in clear


# -- (f) idempotence and exact removal --------------------------------------------------------

def _pod_snapshot(netns: str) -> dict[str, str]:
    out = {}
    for key, argv in (("iptables", ["/usr/sbin/iptables-save"]),
                      ("nft", ["/usr/sbin/nft", "list", "ruleset"]),
                      ("rules", ["/usr/sbin/ip", "rule", "show"]),
                      ("table100", ["/usr/sbin/ip", "route", "show", "table", "100"])):
        p = run(netns, argv)
        # A routing table that was never used "does not exist"; one emptied again lists empty.
        assert p.returncode == 0 or "table does not exist" in p.stderr, p.stderr
        out[key] = "\n".join(line for line in p.stdout.splitlines() if not line.startswith("#"))
    return out


def test_apply_is_idempotent_and_remove_is_exact(topo: Topo, backend: CaptureBackend) -> None:
    # Foreign state that must survive: a filter rule (iptables-nft) and a native nft table.
    assert run(topo.pod_path, ["/usr/sbin/iptables", "-A", "INPUT", "-p", "udp", "--dport",
                               "9", "-j", "DROP"]).returncode == 0
    assert run(topo.pod_path, ["/usr/sbin/nft", "add table inet foreign; add chain inet "
                               "foreign c { type filter hook input priority 10; }"]
               ).returncode == 0
    spec = topo.spec()
    before = _pod_snapshot(topo.pod_path)
    backend.apply(spec)
    once = _pod_snapshot(topo.pod_path)
    assert once != before
    assert backend.check(spec) == []
    backend.apply(spec)
    assert _pod_snapshot(topo.pod_path) == once  # no duplicates
    assert backend.check(spec) == []
    assert backend.remove(spec) == []
    assert _pod_snapshot(topo.pod_path) == before
    assert backend.remove(spec) == []  # idempotent
    assert _pod_snapshot(topo.pod_path) == before
    with _connect(topo.pod_path, (OUTSIDE_IP, APP_PORT)):  # and traffic flows directly again
        assert topo.outside is not None
        conn, _ = _accept(topo.outside)
        conn.close()


def test_reapply_with_another_variant_replaces_rules(topo: Topo,
                                                     backend: CaptureBackend) -> None:
    backend.apply(topo.spec())
    backend.apply(topo.spec(inbound_capture=False))
    assert backend.check(topo.spec(inbound_capture=False)) == []
    assert backend.check(topo.spec()) != []


def test_remove_tolerates_a_deleted_netns(topo: Topo, backend: CaptureBackend) -> None:
    spec = topo.spec()
    backend.apply(spec)
    for s in topo.listeners.values():
        s.close()
    topo.listeners.clear()
    netlink.delete_netns(topo.pod)
    assert backend.remove(spec) == []
    assert backend.check(spec) == [f"pod netns {spec.netns} does not exist"]


# -- (g) drift --------------------------------------------------------------------------------

def _sabotage_iptables(netns: str) -> str:
    rule = ["-p", "tcp", "-m", "mark", "--mark", "0x111/0xfff", "-j", "ACCEPT"]
    p = run(netns, ["/usr/sbin/iptables", "-t", "nat", "-D", "ISTIO_OUTPUT", *rule])
    assert p.returncode == 0, p.stderr
    return "-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT"


def _sabotage_nftables(netns: str) -> str:
    listing = run(netns, ["/usr/sbin/nft", "-a", "list", "chain", "inet", "istio-ambient-nat",
                          "output"]).stdout
    line = next(r for r in listing.splitlines() if r.strip().startswith('oif "lo"'))
    handle = line.rsplit("# handle ", 1)[1]
    p = run(netns, ["/usr/sbin/nft", "delete", "rule", "inet", "istio-ambient-nat", "output",
                    "handle", handle])
    assert p.returncode == 0, p.stderr
    return 'oif "lo" ip daddr != 127.0.0.1 accept'


def _sabotage_ebpf(netns: str) -> str:
    p = run(netns, ["/usr/sbin/tc", "filter", "del", "dev", "eth0", "ingress"])
    assert p.returncode == 0, p.stderr
    return "tc ingress program on eth0 is missing"


SABOTAGE = {"iptables": _sabotage_iptables, "nftables": _sabotage_nftables,
            "ebpf": _sabotage_ebpf}


def test_check_reports_drift_and_apply_repairs_it(topo: Topo, backend: CaptureBackend) -> None:
    spec = topo.spec()
    backend.apply(spec)
    deleted = SABOTAGE[backend.name](topo.pod_path)
    assert run(topo.pod_path, ["/usr/sbin/ip", "rule", "del", "fwmark", "0x111/0xfff", "pref",
                               "32764", "lookup", "100"]).returncode == 0
    findings = backend.check(spec)
    assert len(findings) == 2, findings
    assert deleted in findings[0]
    assert findings[1] == "ip rule missing: fwmark 0x111/0xfff pref 32764 lookup 100"
    backend.apply(spec)
    assert backend.check(spec) == []
