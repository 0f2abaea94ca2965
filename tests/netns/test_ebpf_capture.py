"""The eBPF capture backend against the real kernel: capture, exclusions, return path,
fail-closed, idempotence and drift, and leak checks (also after a crashed agent)."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest
from ebpf_world import (
    NODE_IP,
    OUTSIDE_IP,
    POD_IP,
    REPO,
    SPOOFED_CLIENT_IP,
    World,
    world,
    ztunnel_listener,
)

from ambient.bpfmap import OrigDstMap
from ambient.netns import socket_in_netns
from bpf import cgroup, loader, tc
from cni.capture.base import PROBE_SNAT_IP
from cni.capture.ebpf import EbpfBackend
from ztunnel.sockets import dial_socket, original_dst

pytestmark = pytest.mark.netns

ALL_CGROUP_ATTACH_TYPES = [p.attach_type for p in loader.CGROUP_PROGS]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with world(str(tmp_path_factory.mktemp("ebpf"))) as w:
        be = EbpfBackend(w.cgroot, pin_dir=w.pin_dir)
        assert be.unavailable_reason() is None
        try:
            be.setup_node()
            be.apply(w.capture())
            w.start_echo(8080)
            yield w, be
        finally:
            errors = be.remove(w.capture())
            errors += be.teardown_node()
            assert errors == []


@pytest.fixture
def ztunnel(env):
    """ztunnel stand-ins on 15001/15006/15008 in the pod (tests may close some)."""
    w, _ = env
    socks = {port: ztunnel_listener(w.pod_netns, port) for port in (15001, 15006, 15008)}
    try:
        yield socks
    finally:
        for s in socks.values():
            s.close()


def _pending(s: socket.socket) -> bool:
    return bool(select.select([s], [], [], 0)[0])


@contextlib.contextmanager
def _client(netns: str, dst: tuple[str, int], *, source: str | None = None,
            timeout: float = 5.0):
    c = socket_in_netns(netns)
    try:
        if source:
            c.bind((source, 0))
        c.settimeout(timeout)
        c.connect(dst)
        yield c
    finally:
        c.close()


def _wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return bool(cond())


# -- (a) outbound -----------------------------------------------------------------------------

def test_outbound_reaches_15001_with_original_destination(env, ztunnel):
    w, _ = env
    origmap = OrigDstMap(w.pin_dir)
    run = w.app_connect(OUTSIDE_IP, 8080)
    conn, peer = ztunnel[15001].accept()
    try:
        assert original_dst(conn, origdst_map=origmap) == (OUTSIDE_IP, 8080)
        assert conn.recv(5) == b"ping\n"
        conn.sendall(b"pong from ztunnel\n")
        res = run.result()
    finally:
        conn.close()
    assert "error" not in res, res
    # The application sees the destination it asked for, and its own pod IP as source.
    assert res["peer"] == [OUTSIDE_IP, 8080]
    assert res["local"] == [POD_IP, peer[1]]
    assert res["reply"] == "pong from ztunnel\n"
    # The map entry goes away with the connection (no leak in amb_origdst).
    assert _wait_for(lambda: origmap.lookup(_cookie(w), (POD_IP, peer[1])) is None)
    origmap.close()


def _cookie(w: World) -> int:
    return loader.netns_cookie_of(w.pod_netns)


def test_outbound_to_own_ip_and_loopback_not_captured(env, ztunnel):
    w, _ = env
    for host in (POD_IP, "127.0.0.1"):
        res = w.app_connect(host, 8080).result()
        assert "error" not in res, res
        assert str(res["reply"]).startswith("hello from app"), res
    assert not _pending(ztunnel[15001])


# -- (b) ztunnel's own sockets ----------------------------------------------------------------

def test_marked_socket_connects_directly(env, ztunnel):
    w, _ = env
    srv = socket_in_netns(w.node_netns)
    try:
        srv.bind((NODE_IP, 9000))
        srv.listen(4)
        srv.settimeout(10)
        run = w.app_connect(NODE_IP, 9000, mark=1337)
        conn, _ = srv.accept()
        with conn:
            assert conn.recv(5) == b"ping\n"
            conn.sendall(b"direct\n")
        res = run.result()
    finally:
        srv.close()
    assert res.get("reply") == "direct\n", res
    assert res["peer"] == [NODE_IP, 9000]
    assert not _pending(ztunnel[15001])


# -- (c) inbound ------------------------------------------------------------------------------

def test_inbound_reaches_15006_with_original_destination(env, ztunnel):
    w, _ = env
    with _client(w.node_netns, (POD_IP, 8080)) as c:
        conn, peer = ztunnel[15006].accept()
        with conn:
            assert peer[0] == NODE_IP
            assert original_dst(conn, listen_port=15006) == (POD_IP, 8080)
            assert original_dst(conn) == (POD_IP, 8080)
            conn.sendall(b"from ztunnel\n")
            # The client talks to ztunnel, not to the echo app (which would greet first).
            assert c.recv(100) == b"from ztunnel\n"


def test_inbound_15008_not_redirected(env, ztunnel):
    w, _ = env
    with _client(w.node_netns, (POD_IP, 15008)):
        conn, _ = ztunnel[15008].accept()
        conn.close()
    assert not _pending(ztunnel[15006])


def test_inbound_from_probe_snat_ip_not_redirected(env, ztunnel):
    w, _ = env
    with _client(w.node_netns, (POD_IP, 8080), source=PROBE_SNAT_IP) as c:
        assert c.recv(100).startswith(b"hello from app; you are 169.254.7.127:")
    assert not _pending(ztunnel[15006])


# -- (d) return path for spoofed sources ------------------------------------------------------

def test_spoofed_source_return_path(env, ztunnel):
    w, _ = env
    s = dial_socket(w.pod_netns, POD_IP, mark=1337, source=(SPOOFED_CLIENT_IP, 0))
    try:
        s.setblocking(True)
        s.settimeout(5)
        s.connect((POD_IP, 8080))
        greeting = b""
        while not greeting.endswith(b"\n"):
            chunk = s.recv(200)
            assert chunk, "connection closed before the greeting"
            greeting += chunk
        assert greeting.startswith(f"hello from app; you are {SPOOFED_CLIENT_IP}:".encode())
        s.sendall(b"round trip\n")
        assert s.recv(100) == b"round trip\n"
    finally:
        s.close()
    assert not _pending(ztunnel[15006])


# -- (e) fail closed --------------------------------------------------------------------------

def test_no_15006_listener_inbound_never_reaches_app(env, ztunnel):
    w, _ = env
    ztunnel.pop(15006).close()
    c = socket_in_netns(w.node_netns)
    try:
        c.settimeout(1.5)
        with pytest.raises(OSError):  # SYNs are dropped: the echo app never sees them
            c.connect((POD_IP, 8080))
    finally:
        c.close()


def test_no_15001_listener_outbound_fails(env, ztunnel):
    w, _ = env
    ztunnel.pop(15001).close()
    res = w.app_connect(OUTSIDE_IP, 8080).result()
    assert "ConnectionRefused" in str(res.get("error")), res


# -- (f) idempotence and drift ----------------------------------------------------------------

def test_apply_twice_is_idempotent_and_check_finds_drift(env):
    w, be = env
    pod = w.capture()
    be.apply(pod)
    be.setup_node()
    be.apply(pod)
    assert be.check(pod) == []
    cg = cgroup.open_cgroup(w.cgroot)
    try:
        names = sorted(a.name for a in cgroup.attached(cg, ALL_CGROUP_ATTACH_TYPES,
                                                       loader.OUR_NAMES))
    finally:
        os.close(cg)
    assert names == sorted(p.name for p in loader.CGROUP_PROGS)
    rules = _ip_json(w.pod_netns, "rule", "show")
    assert sum(1 for r in rules if r.get("priority") == 32764) == 1
    assert _tc_filters(w.pod_netns, "eth0") == 1

    tc.detach(w.pod_netns, "eth0")
    subprocess.run(["/usr/bin/nsenter", f"--net={w.pod_netns}", "/usr/sbin/ip", "rule", "del",
                    "pref", "32764"], check=True)
    findings = be.check(pod)
    assert any("eth0" in f for f in findings), findings
    assert any("ip rule missing" in f for f in findings), findings
    be.apply(pod)
    assert be.check(pod) == []


def _ip_json(netns: str, *args: str) -> list[dict]:
    out = subprocess.run(["/usr/bin/nsenter", f"--net={netns}", "/usr/sbin/ip", "-j", *args],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out) if out.strip() else []


def _tc_filters(netns: str, dev: str) -> int:
    out = subprocess.run(["/usr/bin/nsenter", f"--net={netns}", "/usr/sbin/tc", "-j", "filter",
                          "show", "dev", dev, "ingress"], capture_output=True, text=True,
                         check=False).stdout
    return sum(1 for f in (json.loads(out) if out.strip() else []) if "options" in f)


# -- (g) leak checks --------------------------------------------------------------------------

def _prog_exists(prog_id: int) -> bool:
    try:
        fd = cgroup.prog_fd_by_id(prog_id)
    except OSError:
        return False
    os.close(fd)
    return True


def _assert_nothing_left(w: World, prog_ids: set[int]) -> None:
    # Detached programs are freed after an RCU grace period / deferred work: wait for it.
    _wait_for(lambda: not any(_prog_exists(i) for i in prog_ids), timeout=30)
    leftover = {i for i in prog_ids if _prog_exists(i)}
    assert not leftover, f"programs still loaded: {leftover}"
    out = subprocess.run(["/usr/sbin/bpftool", "-j", "cgroup", "show", w.cgroot],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip() or "[]") == []
    for dev in ("eth0", "lo"):
        assert _tc_filters(w.pod_netns, dev) == 0
        qd = subprocess.run(["/usr/bin/nsenter", f"--net={w.pod_netns}", "/usr/sbin/tc", "qdisc",
                             "show", "dev", dev], capture_output=True, text=True).stdout
        assert "clsact" not in qd
    net = subprocess.run(["/usr/bin/nsenter", f"--net={w.pod_netns}", "/usr/sbin/bpftool",
                          "-j", "net"], capture_output=True, text=True, check=True).stdout
    for section in json.loads(net):
        assert not section.get("tc"), section
    assert not os.path.exists(w.pin_dir)
    assert not [r for r in _ip_json(w.pod_netns, "rule", "show") if r.get("priority") == 32764]
    assert _ip_json(w.pod_netns, "route", "show", "table", "100") == []


def _our_prog_ids(w: World) -> set[int]:
    ids = set()
    cg = cgroup.open_cgroup(w.cgroot)
    try:
        ids |= {a.prog_id for a in cgroup.attached(cg, ALL_CGROUP_ATTACH_TYPES,
                                                   loader.OUR_NAMES)}
    finally:
        os.close(cg)
    out = subprocess.run(["/usr/bin/nsenter", f"--net={w.pod_netns}", "/usr/sbin/bpftool",
                          "-j", "net"], capture_output=True, text=True, check=True).stdout
    for section in json.loads(out):
        ids |= {int(t["id"]) for t in section.get("tc", []) if "id" in t}
    return ids


def test_leak_check_after_remove_and_teardown(tmp_path):
    with world(str(tmp_path)) as w:
        be = EbpfBackend(w.cgroot, pin_dir=w.pin_dir)
        be.setup_node()
        be.apply(w.capture())
        ids = _our_prog_ids(w)
        assert len(ids) == 5
        assert be.remove(w.capture()) == []
        assert be.remove(w.capture()) == []  # idempotent
        assert be.teardown_node() == []
        _assert_nothing_left(w, ids)


CRASHER = r"""
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from cni.capture.base import PodCapture
from cni.capture.ebpf import EbpfBackend
be = EbpfBackend(sys.argv[2], pin_dir=sys.argv[3])
be.setup_node()
be.apply(PodCapture(uid=sys.argv[5], name="app", namespace="default", netns=sys.argv[4],
                    ips=(sys.argv[6],)))
print("ready", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_crashed_agent_state_is_taken_over_and_cleaned(tmp_path):
    with world(str(tmp_path)) as w:
        pod = w.capture()
        p = subprocess.run([sys.executable, "-c", CRASHER, REPO, w.cgroot, w.pin_dir,
                            w.pod_netns, pod.uid, POD_IP], capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == -signal.SIGKILL, p.stderr
        stale = _our_prog_ids(w)
        assert len(stale) == 5  # attachments outlive the crashed loader

        # Capture keeps working while no agent runs (attached programs + pinned maps).
        with contextlib.closing(ztunnel_listener(w.pod_netns, 15001)) as lis:
            run = w.app_connect(OUTSIDE_IP, 8080)
            conn, _ = lis.accept()
            with conn:
                assert original_dst(conn, origdst_map=OrigDstMap(w.pin_dir)) == (OUTSIDE_IP, 8080)
                conn.sendall(b"ok\n")
            assert run.result().get("reply") == "ok\n"

        be = EbpfBackend(w.cgroot, pin_dir=w.pin_dir)
        be.setup_node()
        cg = cgroup.open_cgroup(w.cgroot)
        try:
            now = cgroup.attached(cg, ALL_CGROUP_ATTACH_TYPES, loader.OUR_NAMES)
        finally:
            os.close(cg)
        assert len(now) == 3
        assert not {a.prog_id for a in now} & stale  # the stale ones were replaced
        assert be.check(pod) == []  # the pinned enrolled entry survived
        new_ids = _our_prog_ids(w)
        assert be.remove(pod) == []
        assert be.teardown_node() == []
        _assert_nothing_left(w, stale | new_ids)
