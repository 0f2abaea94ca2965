"""LocalCluster against the real kernel: CNI plugins, cgroups, cross-node routing, cleanup."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ambient.cluster import cgroups, netlink
from ambient.cluster.cluster import ClusterError, LocalCluster, destroy_from_state, load_state
from ambient.cluster.cni import CniError, CniNetwork
from ambient.cluster.echo import http_get, tcp_probe

pytestmark = pytest.mark.netns

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ours(name: str) -> list[str]:
    """Namespaces of cluster ``name`` still listed by ``ip netns list``."""
    out = subprocess.run(["/usr/sbin/ip", "netns", "list"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return [line.split()[0] for line in out.splitlines()
            if line.split() and line.split()[0].startswith(name + "-")]


def _wait(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def _assert_gone(c_name: str, cgroup_base: str, pids: list[tuple[int, int | None]]) -> None:
    assert _ours(c_name) == []
    assert not os.path.exists(cgroup_base)
    for pid, start in pids:
        assert cgroups.process_start_time(pid) != start, f"pid {pid} survived"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(f"amb{secrets.token_hex(3)}", ["a", "b"],
                     str(tmp_path_factory.mktemp("cluster")))
    try:
        c.create()
        for pod, node in (("a1", "a"), ("a2", "a"), ("b1", "b")):
            c.add_pod(pod, "default", node)
            c.start_echo(pod)
        yield c
    finally:
        errors = c.destroy()
        assert errors == []
        assert _ours(c.name) == []


def test_topology(cluster):
    a1, a2, b1 = (cluster.pods[p] for p in ("a1", "a2", "b1"))
    assert a1.ip.startswith("10.244.1.") and a2.ip.startswith("10.244.1.")
    assert b1.ip.startswith("10.244.2.")
    assert len({a1.ip, a2.ip, b1.ip}) == 3
    assert netlink.get_sysctl(cluster.nodes["a"].netns, "net.ipv4.ip_forward") == "1"
    routes = netlink.ip_in(cluster.nodes["a"].netns, "route", "show")
    assert "10.244.2.0/24 via 172.30.0.2" in routes


@pytest.mark.parametrize("src, dst", [("a1", "a2"), ("a1", "b1"), ("b1", "a2")],
                         ids=["same-node", "cross-node", "cross-node-back"])
def test_tcp_probe_sees_client_pod_ip(cluster, src, dst):
    s, d = cluster.pods[src], cluster.pods[dst]
    r = tcp_probe(s.netns, d.ip, 8080, b"hello mesh\n", timeout=5)
    assert r.ok, r.error
    assert r.server_name == dst
    assert r.seen_client is not None and r.seen_client[0] == s.ip


def test_http_get(cluster):
    status, body = http_get(cluster.pods["b1"].netns, cluster.pods["a1"].ip, 8081, "/x?y=1")
    assert status == 200
    assert {k: body.get(k) for k in ("pod", "client", "path", "method")} == {
        "pod": "a1", "client": cluster.pods["b1"].ip, "path": "/x?y=1", "method": "GET"}


def test_apps_live_in_pod_cgroup_and_netns(cluster):
    for proc in cluster.processes:
        assert proc.pid in cgroups.cgroup_pids(proc.cgroup)
        pod = next(p for p in cluster.pods.values() if p.cgroup == proc.cgroup)
        assert os.stat(f"/proc/{proc.pid}/ns/net").st_ino == os.stat(pod.netns_path).st_ino
    a1 = cluster.pods["a1"]
    assert a1.cgroup == os.path.join(cgroups.cgroup2_mount(), "ambient", cluster.name,
                                     f"pods-{a1.node}", "a1")
    assert os.path.dirname(a1.cgroup) == cluster.pods_cgroup(a1.node)


def test_cni_check_passes(cluster):
    for pod in cluster.pods:
        cluster.cni_check(pod)


def test_cni_del_idempotent_and_remove_pod(cluster):
    pod = cluster.add_pod("tmp1", "default", "b")
    try:
        cluster.cni_check(pod)
        cluster.cni_del(pod)
        cluster.cni_del(pod)  # second DEL: nothing left, still success
        with pytest.raises(CniError):
            cluster.cni_check(pod)  # eth0 is gone
        netlink.delete_netns(pod.netns)
        cluster.cni_del(pod)  # DEL with the pod netns gone
    finally:
        assert cluster.remove_pod("tmp1") == []
        assert cluster.remove_pod("tmp1") == []
    assert pod.netns not in netlink.list_netns()
    assert not os.path.exists(pod.cgroup)
    # The address went back to the pool: a new pod on b can still be added.
    again = cluster.add_pod("tmp2", "default", "b")
    assert cluster.remove_pod(again) == []


def test_refuses_live_run_dir_and_taken_names(cluster, tmp_path):
    with pytest.raises(ClusterError, match="in use"):
        LocalCluster(cluster.name, ["a", "b"], cluster.run_dir).create()
    with pytest.raises(ClusterError, match="already exist"):
        LocalCluster(cluster.name, ["a", "b"], str(tmp_path / "other")).create()
    with pytest.raises(ValueError):
        cluster.add_pod("a1", "default", "a")
    squatter = f"{cluster.name}-p-clash"
    netlink.create_netns(squatter)
    try:
        with pytest.raises(ClusterError, match="already exists"):
            cluster.add_pod("clash", "default", "a")
    finally:
        netlink.delete_netns(squatter)
    assert "clash" not in cluster.pods
    assert tcp_probe(cluster.pods["a1"].netns, cluster.pods["b1"].ip, 8080).ok  # untouched


def test_cni_error_json_is_parsed(cluster, tmp_path):
    bad = CniNetwork("bad", [{"type": "host-local", "ipam": {
        "type": "host-local", "ranges": [[{"subnet": "nope"}]], "dataDir": str(tmp_path)}}])
    with pytest.raises(CniError) as exc:
        cluster.cni_runtime("a").add(bad, "bad-1", cluster.pods["a1"].netns_path)
    assert exc.value.plugin == "host-local" and exc.value.command == "ADD"
    assert exc.value.code > 0 and "nope" in exc.value.msg


def test_destroy_leaves_nothing(tmp_path):
    c = LocalCluster(f"amb{secrets.token_hex(3)}", ["a", "b"], str(tmp_path / "run"))
    try:
        c.create()
        for pod, node in (("x1", "a"), ("x2", "a"), ("y1", "b")):
            c.add_pod(pod, "default", node)
        procs = [c.start_echo(p) for p in ("x1", "x2", "y1")]
        assert tcp_probe(c.pods["x1"].netns, c.pods["y1"].ip, 8080).ok
        assert len(_ours(c.name)) == 6
        pids = [(p.pid, p.start_time) for p in procs]
    finally:
        assert c.destroy() == []
    _assert_gone(c.name, c.cgroup_base, pids)
    assert load_state(c.run_dir) is None
    assert c.destroy() == []  # idempotent


def test_destroy_from_state_after_crash(tmp_path):
    """A cluster owner killed with SIGKILL leaves namespaces, cgroups and apps behind;
    destroy_from_state (another process) and a new create() clean them up."""
    name, run_dir = f"amb{secrets.token_hex(3)}", str(tmp_path / "run")
    script = textwrap.dedent(f"""
        import sys, time
        from ambient.cluster.cluster import LocalCluster
        c = LocalCluster({name!r}, ["a", "b"], {run_dir!r}).create()
        c.add_pod("c1", "default", "a"); c.add_pod("c2", "default", "b")
        c.start_echo("c1"); c.start_echo("c2")
        print("ready", flush=True)
        time.sleep(60)
    """)
    owner = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert owner.stdout.readline().strip() == "ready"
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        st = load_state(run_dir)
        pids = [(p["pid"], p["start_time"]) for p in st["processes"]]
        assert len(pids) == 2 and len(_ours(name)) == 5
        # A new cluster with the same name and run dir sweeps the leftovers first.
        c = LocalCluster(name, ["a"], run_dir)
        try:
            c.create()
            assert _wait(lambda: all(cgroups.process_start_time(p) != s for p, s in pids))
            assert sorted(_ours(name)) == sorted([f"{name}-underlay", f"{name}-a"])
        finally:
            assert c.destroy() == []
        _assert_gone(name, c.cgroup_base, pids)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(10)
        destroy_from_state(run_dir)
        assert _ours(name) == []
