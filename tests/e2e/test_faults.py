"""Fault tests, end to end: the local mesh from examples/demo.yaml under crashes and outages.

Each test breaks one part of the running mesh the way it breaks in production and asserts
what must survive (issue 8, item 3):

- ztunnel SIGKILLed mid-stream: no byte of the stream leaves the node unencrypted (an
  AF_PACKET sniffer on the node's uplink for the whole episode, with a plaintext control),
  new connections are refused while it is down, and succeed once a new one is up;
- rolling restarts under a steady load: zero failed new connections;
- the control plane stopped for 60 s: new connections, policies and mTLS keep working on the
  last configuration and the certificates held; nothing is refetched when it returns;
- the CA away across a certificate's refresh time: the old certificate is kept, refreshes are
  retried with growing backoff, and rotation happens once the CA is back;
- the CNI agent SIGKILLed and restarted: capture rules identical, none duplicated;
- a pod deleted mid-connection, a pod netns deleted out from under everyone, and finally a
  whole node removed.

One mesh per module (``capture="iptables"``, ``AMBIENT_FAULT_CAPTURE`` overrides).  Tests run
in file order; each leaves the mesh serving (the last one, node removal, removes node-b).
Every wait is bounded and waits on a condition; nothing asserts a duration.  Figures (the
connections made, the seconds of outage) are printed (``pytest -s``) for docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fault_support import (
    SCRIPT,
    Sniffer,
    add_pod,
    app_log,
    capture_rules,
    delete_pod,
    fd_count,
    load_result,
)

from ambient.cluster import demo, netlink
from ambient.cluster.echo import http_get
from ambient.cluster.mesh import AGENT_READY_PORT, LocalMesh
from cni.capture import make_backend
from cni.capture.base import PodCapture

pytestmark = [pytest.mark.e2e, pytest.mark.netns]
REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "examples" / "demo.yaml"
FRONTEND_ID = "spiffe://cluster.local/ns/shop/sa/frontend"
BACKEND_ID = "spiffe://cluster.local/ns/shop/sa/backend"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    root = tmp_path_factory.mktemp("run")
    m = LocalMesh(MANIFESTS, name=f"flt{secrets.token_hex(2)}", run_root=root,
                  capture=os.environ.get("AMBIENT_FAULT_CAPTURE", "iptables"))
    try:
        m.up(progress=lambda _msg: None)
        yield m
    finally:
        cgroup_base = m.cluster.cgroup_base if m.cluster else ""
        keep = os.environ.get("AMBIENT_FAULT_KEEP_LOGS")  # a directory to copy the logs to
        if keep:
            shutil.copytree(m.run_dir / "logs", Path(keep) / m.name, dirs_exist_ok=True)
        errors = m.down()
        assert not errors, errors
    assert not os.path.exists(cgroup_base), cgroup_base
    assert not [ns for ns in os.listdir("/var/run/netns") if ns.startswith(f"{m.name}-")]


# ------------------------------------------------------------------------------ helpers


def wait_for(pred: Callable[[], bool], timeout: float = 20.0, every: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return pred()


def app_env() -> dict[str, str]:
    return {"PYTHONPATH": str(REPO), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "PYTHONUNBUFFERED": "1", "LANG": "C.UTF-8"}


def start_pod_app(mesh: LocalMesh, src: str, args: list[str], name: str) -> tuple[Any, Path]:
    """Run ``fault_support.py <args>`` as one of ``src``'s applications; (process, log)."""
    assert mesh.cluster is not None
    log_name = f"{name}-{secrets.token_hex(3)}"
    proc = mesh.cluster.start_app(mesh.pods[src], [sys.executable, SCRIPT, *args],
                                  env=app_env(), log_name=log_name)
    return proc, Path(mesh.cluster.log_path(log_name))


def serials(mesh: LocalMesh, node: str) -> dict[str, str]:
    """identity -> serial number of the leaf ztunnel on ``node`` holds (Available only)."""
    out = {}
    for c in mesh.config_dump(node).get("certificates", []):
        if c.get("state") == "Available" and c.get("certChain"):
            out[c["identity"]] = c["certChain"][0]["serialNumber"]
    return out


def leaf(mesh: LocalMesh, node: str, identity: str) -> dict[str, Any] | None:
    for c in mesh.config_dump(node).get("certificates", []):
        if c.get("identity") == identity and c.get("state") == "Available" and c["certChain"]:
            return dict(c["certChain"][0])
    return None


def agent_pods(mesh: LocalMesh, node: str) -> list[dict[str, Any]]:
    status, body = http_get(mesh.node_netns(node), "127.0.0.1", AGENT_READY_PORT,
                            "/debug/pods", timeout=5)
    assert status == 200, body
    pods = body.get("pods")
    assert isinstance(pods, list)
    return pods


def workload_names(mesh: LocalMesh, node: str) -> set[str]:
    return {s["info"]["name"] for s in mesh.config_dump(node)["workloadState"].values()}


def wait_served(mesh: LocalMesh, name: str) -> None:
    """Wait until the new pod ``name`` is served by its ztunnel (ZDS) and every ztunnel
    knows it speaks HBONE (xDS), then check a connection to it works."""
    key = next(k for k in mesh.pods if k.endswith(f"/{name}"))
    pod = mesh.pods[key]
    assert wait_for(lambda: name in workload_names(mesh, pod.node))
    for node in mesh.ztunnels:  # the pod's IP, once the status with it is published
        assert wait_for(lambda n=node: any(
            w.get("name") == name and w.get("protocol") == "HBONE"
            and any(a.split("/")[-1] == pod.ip for a in w.get("workloadIps", []))
            for w in mesh.config_dump(n)["workloads"]), timeout=30), node
    offsets = {n: log_size(mesh.log_path(n)) for n in mesh.ztunnels}
    r = demo.probe(mesh, "shop/frontend", pod.ip, 8080)
    assert r.ok, (r, {n: log_since(mesh.log_path(n), off)[-2000:] for n, off in offsets.items()})


def ready(mesh: LocalMesh, node: str) -> bool:
    try:
        status, _ = http_get(mesh.node_netns(node), "127.0.0.1", mesh.port(node, 15021),
                             "/healthz/ready", timeout=3)
    except OSError:
        return False
    return status == 200


def sigkill(mesh: LocalMesh, proc: Any) -> None:
    """SIGKILL one process we started, reap it and forget it."""
    assert mesh.cluster is not None and proc.popen is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.popen.wait(timeout=30)
    mesh.cluster.stop_process(proc)


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def log_since(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def ztunnel_errors(mesh: LocalMesh, offsets: dict[str, int]) -> dict[str, list[str]]:
    """Warning and error lines each ztunnel logged since ``offsets`` (for failure messages)."""
    return {n: [ln for ln in log_since(mesh.log_path(n), off).splitlines()
                if "\terror\t" in ln or "\twarn" in ln][-20:] for n, off in offsets.items()}


def report(**figures: Any) -> None:
    print("FAULT-FIGURES " + json.dumps(figures, sort_keys=True))


# ------------------------------------------------------------------------------ the tests


def test_control_plane_stopped_60s_traffic_flows_on_last_config(mesh: LocalMesh) -> None:
    """Control plane (xDS + CA) down for a full minute: every few seconds a new cross-node
    mTLS connection succeeds, the db policy still denies frontend and allows backend, and the
    ztunnels stay ready.  When it returns the ztunnels reconnect, and no certificate is
    fetched again (same serials, no CreateCertificate call from a ztunnel)."""
    assert mesh.cluster is not None
    fe, be = "shop/frontend", mesh.pods["shop/backend-1"]
    assert demo.probe(mesh, fe, be.ip, 8080).ok  # both ends hold their certificates
    assert demo.probe(mesh, "shop/backend-2", "10.96.0.20", 5432).ok
    before = {n: serials(mesh, n) for n in mesh.ztunnels}
    assert FRONTEND_ID in before["node-a"] and BACKEND_ID in before["node-b"], before
    cp_log = mesh.controlplane_log_path
    mesh.cluster.stop_process(mesh.controlplane)
    stopped = time.monotonic()
    samples: list[tuple[float, bool, bool, bool, bool]] = []
    while time.monotonic() - stopped < 60 and len(samples) < 100:
        t = time.monotonic() - stopped
        samples.append((
            round(t, 1),
            demo.probe(mesh, fe, be.ip, 8080).ok,  # new mTLS connection, cross node
            not demo.probe(mesh, fe, "10.96.0.20", 5432, timeout=3).ok,  # still denied
            demo.probe(mesh, "shop/backend-2", "10.96.0.20", 5432).ok,  # still allowed
            all(ready(mesh, n) for n in mesh.ztunnels),
        ))
        time.sleep(max(0.0, min(4.0, 60 - (time.monotonic() - stopped))))
    outage = time.monotonic() - stopped
    bad = [s for s in samples if not all(s[1:])]
    assert len(samples) >= 10 and not bad, bad
    offset = log_size(cp_log)
    logs = {n: mesh.log_path(n) for n in mesh.ztunnels}
    streams = {n: log_size(p) for n, p in logs.items()}
    mesh.start_controlplane(sorted(mesh.ztunnels))
    back = time.monotonic()
    assert wait_for(lambda: all("xDS stream to" in log_since(p, streams[n])
                                for n, p in logs.items()), timeout=60)
    reconnect = time.monotonic() - back
    assert demo.probe(mesh, fe, be.ip, 8080).ok
    # Configuration changes flow again: a new policy reaches node-a's ztunnel.
    probe_policy = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                    "metadata": {"name": "fault-cp-back", "namespace": "shop"},
                    "spec": {"selector": {"matchLabels": {"app": "no-such-app"}},
                             "action": "DENY", "rules": [{}]}}
    mesh.apply_object(probe_policy)
    try:
        assert wait_for(lambda: any(p.get("name") == "fault-cp-back"
                                    for p in mesh.config_dump("node-a")["policies"]), timeout=30)
    finally:
        mesh.delete_object("AuthorizationPolicy", "shop", "fault-cp-back", missing_ok=True)
    after = {n: serials(mesh, n) for n in mesh.ztunnels}
    for n in mesh.ztunnels:
        for ident, serial in before[n].items():
            assert after[n].get(ident) == serial, (n, ident, before[n], after[n])
    signed = [ln for ln in log_since(cp_log, offset).splitlines()
              if "CA: signed" in ln and "ztunnel" in ln]
    assert not signed, signed
    report(test="control plane 60s", samples=len(samples), outage_s=round(outage, 1),
           failed=len(bad), reconnect_s=round(reconnect, 1),
           certs_kept=sum(len(v) for v in before.values()))


def test_ca_unavailable_during_rotation_keeps_the_old_certificate(mesh: LocalMesh) -> None:
    """ztunnels with SECRET_TTL=120 s (refresh at half-life: the CA backdates by 60 s, so
    every ~30 s).  The control plane (the CA) stops before frontend's refresh time: the refresh
    fails and is retried with growing backoff, the old certificate (same serial, not expired)
    stays in use and traffic flows; the CA returns and the certificate rotates."""
    assert mesh.cluster is not None
    fe, be = "shop/frontend", mesh.pods["shop/backend-1"]
    log = mesh.log_path("node-a")
    mesh.ztunnel_env["SECRET_TTL"] = "120"
    try:
        for node in sorted(mesh.ztunnels):
            mesh.restart_ztunnel(node)
        assert wait_for(lambda: demo.probe(mesh, fe, be.ip, 8080).ok, timeout=30)
        # Wait for a rotation, so the next refresh is ~30 s away (a known phase).
        first = leaf(mesh, "node-a", FRONTEND_ID)
        assert first is not None
        assert wait_for(lambda: (leaf(mesh, "node-a", FRONTEND_ID) or first)["serialNumber"]
                        != first["serialNumber"], timeout=60), "no rotation with SECRET_TTL=120"
        held = leaf(mesh, "node-a", FRONTEND_ID)
        assert held is not None
        offset = log_size(log)
        mesh.cluster.stop_process(mesh.controlplane)
        stopped = time.monotonic()
        failed = f"certificate fetch for {FRONTEND_ID} failed"
        # The refresh fails, then is retried with a growing delay, keeping the old cert.
        assert wait_for(lambda: log_since(log, offset).count(failed) >= 3, timeout=75, every=1)
        lines = [ln for ln in log_since(log, offset).splitlines() if failed in ln]
        assert all("keeping the current certificate" in ln for ln in lines), lines
        delays = [float(ln.rsplit("retrying in ", 1)[1].rstrip("s")) for ln in lines]
        assert delays == sorted(delays) and delays[-1] > delays[0], delays
        now = leaf(mesh, "node-a", FRONTEND_ID)
        assert now is not None and now["serialNumber"] == held["serialNumber"], (held, now)
        assert demo.probe(mesh, fe, be.ip, 8080).ok  # mTLS with the held certificate
        down_s = time.monotonic() - stopped
        mesh.start_controlplane(sorted(mesh.ztunnels))
        back = time.monotonic()
        assert wait_for(lambda: (leaf(mesh, "node-a", FRONTEND_ID) or held)["serialNumber"]
                        != held["serialNumber"], timeout=90, every=1)
        rotated_after = time.monotonic() - back
        new = leaf(mesh, "node-a", FRONTEND_ID)
        assert new is not None and new["expirationTime"] > held["expirationTime"]
        assert "rotated certificate for " + FRONTEND_ID in log_since(log, offset)
        assert demo.probe(mesh, fe, be.ip, 8080).ok
        report(test="CA unavailable during rotation", ca_down_s=round(down_s, 1),
               failed_refreshes=len(lines), retry_delays_s=delays,
               rotated_after_ca_back_s=round(rotated_after, 1))
    finally:
        mesh.ztunnel_env.pop("SECRET_TTL", None)
        if mesh.controlplane is None or mesh.controlplane.popen.poll() is not None:
            mesh.start_controlplane(sorted(mesh.ztunnels))
        for node in sorted(mesh.ztunnels):
            mesh.restart_ztunnel(node)


def test_rolling_restarts_under_load_fail_no_new_connection(mesh: LocalMesh) -> None:
    """A client app in frontend opens ~25 new connections per second to backend-1 (other
    node) for the whole episode: node-a's ztunnel (source) is replaced twice in a row, then
    node-b's (destination) twice.  Not one connection may fail."""
    fe, be = mesh.pods["shop/frontend"], mesh.pods["shop/backend-1"]
    stop = mesh.run_dir / f"stop-load-{secrets.token_hex(3)}"
    proc, log = start_pod_app(mesh, "shop/frontend", [
        "load", "--host", be.ip, "--port", "8080", "--rate", "25", "--seconds", "280",
        "--stop-file", str(stop)], "load")

    offsets = {n: log_size(mesh.log_path(n)) for n in mesh.ztunnels}

    def progressed() -> int:
        lines = [ln for ln in app_log(log) if ln.startswith("progress ")]
        return int(lines[-1].split()[1].split("=")[1]) if lines else 0

    try:
        assert wait_for(lambda: progressed() >= 20, timeout=30), app_log(log)[-5:]
        for node in (fe.node, fe.node, be.node, be.node):
            mesh.restart_ztunnel(node)
            base = progressed()
            assert wait_for(lambda b=base: progressed() >= b + 60, timeout=30)
    finally:
        stop.touch()
        assert proc.popen is not None
        proc.popen.wait(timeout=60)
        stop.unlink(missing_ok=True)
    result = load_result(log)
    assert result is not None, app_log(log)[-5:]
    report(test="rolling restart x4 under load", connections=result["ok"] + result["failed"],
           failed=result["failed"], seconds=result["seconds"])
    assert result["failed"] == 0, (result["errors"], ztunnel_errors(mesh, offsets))
    assert result["ok"] >= 100, result


def test_ztunnel_sigkill_mid_stream_never_leaks_and_fails_closed(mesh: LocalMesh) -> None:
    """frontend streams marker lines to backend-1 (node-b) while node-a's ztunnel is
    SIGKILLed.  A sniffer on node-a's uplink (ul0) sees the HBONE traffic but never the
    marker; it does see an unenrolled pod's marker (control).  While ztunnel is down, new
    connections from node-a's captured pods, and into them, are refused; once a new ztunnel
    is ready they succeed."""
    assert mesh.cluster is not None
    fe, be = mesh.pods["shop/frontend"], mesh.pods["shop/backend-1"]
    web, node = mesh.pods["legacy/web"], fe.node
    marker = f"MESH-SECRET-{secrets.token_hex(8)}"
    control = f"PLAIN-CONTROL-{secrets.token_hex(8)}"
    with Sniffer(mesh.node_netns(node), "ul0", (marker.encode(), control.encode())) as sniff:
        # Control: legacy/client -> legacy/web is not captured; its bytes cross ul0 in clear.
        mesh.cluster.run_in_pod(mesh.pods["legacy/client"], [
            sys.executable, SCRIPT, "stream", "--host", web.ip, "--marker", control,
            "--seconds", "1"], timeout=30)
        assert wait_for(lambda: sniff.hits[control.encode()] > 0, timeout=10), sniff
        proc, log = start_pod_app(mesh, "shop/frontend", [
            "stream", "--host", be.ip, "--marker", marker, "--seconds", "120"], "stream")
        try:
            assert wait_for(lambda: any(ln.startswith("echoed 20") for ln in app_log(log)),
                            timeout=30), app_log(log)[-5:]
            assert sniff.tls_frames > 0, "the sniffer saw no HBONE frame on ul0"
            zt = mesh.ztunnels[node]
            slot = mesh.ztunnel_slot[node]
            sigkill(mesh, zt)
            killed = time.monotonic()
            assert wait_for(lambda: any(ln.startswith("broken") for ln in app_log(log)),
                            timeout=30), app_log(log)[-5:]
            echoed = max((int(ln.split()[1]) for ln in app_log(log)
                          if ln.startswith("echoed ")), default=0)
            # Fail closed: captured traffic has nowhere to go but the dead ztunnel's ports.
            refused = [
                demo.probe(mesh, "shop/frontend", be.ip, 8080, timeout=3),  # out, cross node
                demo.probe(mesh, "shop/frontend", web.ip, 8080, timeout=3),  # out, passthrough
                demo.probe(mesh, "shop/backend-1", mesh.pods["shop/backend-2"].ip, 8080,
                           timeout=3),  # into a pod on the dead node
            ]
            assert not [r for r in refused if r.ok or r.greeting], refused
            assert demo.probe(mesh, "legacy/client", web.ip, 8080).ok  # uncaptured: served
            mesh.start_ztunnel(node, slot)
            mesh.wait_ready(node)
            down_s = time.monotonic() - killed
            assert demo.probe(mesh, "shop/frontend", be.ip, 8080).ok
            assert demo.probe(mesh, "shop/backend-1", mesh.pods["shop/backend-2"].ip, 8080).ok
            # A new stream after the restart carries the marker, encrypted again.
            proc2, log2 = start_pod_app(mesh, "shop/frontend", [
                "stream", "--host", be.ip, "--marker", marker, "--seconds", "3"], "stream")
            assert proc2.popen is not None
            proc2.popen.wait(timeout=60)
            assert any(ln.startswith("echoed 20") for ln in app_log(log2)), app_log(log2)[-5:]
        finally:
            mesh.cluster.stop_process(proc)
    assert not sniff.error, sniff.error
    assert sniff.hits[marker.encode()] == 0, sniff
    report(test="ztunnel SIGKILL mid-stream", frames_sniffed=sniff.frames,
           hbone_frames=sniff.tls_frames, marker_lines_echoed_before_kill=echoed,
           marker_frames_in_clear=sniff.hits[marker.encode()],
           control_frames_in_clear=sniff.hits[control.encode()], ztunnel_down_s=round(down_s, 1))


def test_cni_agent_sigkill_restart_loses_and_duplicates_no_rule(mesh: LocalMesh) -> None:
    """Every node's agent is SIGKILLed and restarted: the capture rules of every enrolled pod
    are byte-for-byte what they were (nothing lost, nothing added twice), the backend's own
    check finds no drift, and the pods are served throughout."""
    assert mesh.cluster is not None
    backend = make_backend(mesh.backend) if mesh.backend != "ebpf" else None
    for node in sorted(mesh.agents):
        captured = [p for p in agent_pods(mesh, node) if p["captured"]]
        assert captured, node
        before = {p["name"]: capture_rules(p["netns"]) for p in captured}
        log = mesh.agent_log_path(node)
        offset = log_size(log)
        sigkill(mesh, mesh.agents[node])
        # The data path does not need the agent.
        assert demo.probe(mesh, "shop/frontend", mesh.pods["shop/backend-1"].ip, 8080).ok
        mesh.start_agent(node)
        assert wait_for(lambda lg=log, o=offset: "snapshot delivered" in log_since(lg, o),
                        timeout=30)
        assert f"restored {len(agent_pods(mesh, node))} pods" in log_since(log, offset)
        after = {p["name"]: capture_rules(p["netns"])
                 for p in agent_pods(mesh, node) if p["captured"]}
        assert after.keys() == before.keys()
        for name, rules in before.items():
            assert after[name] == rules, (node, name)
        if backend is not None:
            for p in captured:
                spec = PodCapture(uid=p["uid"], name=p["name"], namespace=p["namespace"],
                                  netns=p["netns"], ips=tuple(p["ips"]),
                                  interfaces=tuple(p["interfaces"]),
                                  inbound_capture=p["inbound_capture"])
                assert backend.check(spec) == [], (node, p["name"])
        report(test="CNI agent SIGKILL", node=node, pods_checked=len(before),
               rules_lines=sum(r.count("\n") for r in before.values()))
    assert demo.strict_refuses_plaintext(mesh).passed
    assert demo.probe(mesh, "shop/frontend", mesh.pods["shop/backend-1"].ip, 8080).ok


def test_pod_deleted_mid_connection_is_dropped_without_leaks(mesh: LocalMesh) -> None:
    """A new pod on node-b holds a connection from frontend; the pod is deleted (CNI DEL ->
    agent -> ZDS Del): the connection ends, node-b's ztunnel stops serving it, its fd count
    returns to what it was before the pod existed, and other pods are unaffected."""
    assert mesh.cluster is not None
    node = "node-b"
    be = mesh.pods["shop/backend-1"]
    assert demo.probe(mesh, "shop/frontend", be.ip, 8080).ok  # pools warm
    zt = mesh.ztunnels[node]
    fds_before = fd_count(zt.pid)
    key = add_pod(mesh, "victim-del", "shop", node, "backend", {"app": "victim"})
    victim = mesh.pods[key]
    wait_served(mesh, "victim-del")
    held = mesh.hold("shop/frontend", victim.ip, 8080, max_seconds=120)
    try:
        assert wait_for(lambda: held.state() != "starting") and held.state() == "connected", \
            held.log.read_text()
        fds_during = fd_count(zt.pid)
        assert delete_pod(mesh, key) == []
        assert wait_for(lambda: held.state() == "closed", timeout=30), held.log.read_text()
        assert wait_for(lambda: "victim-del" not in workload_names(mesh, node))
        assert wait_for(lambda: not [c for c in _connections(mesh, node)
                                     if victim.ip in json.dumps(c)], timeout=20)
        assert wait_for(lambda: fd_count(zt.pid) <= fds_before + 2, timeout=30), \
            (fds_before, fds_during, fd_count(zt.pid))
    finally:
        mesh.cluster.stop_process(held.proc)
        if key in mesh.pods:
            delete_pod(mesh, key)
    assert zt.popen is not None and zt.popen.poll() is None
    assert demo.probe(mesh, "shop/frontend", be.ip, 8080).ok
    assert demo.probe(mesh, "shop/backend-2", "10.96.0.20", 5432).ok
    report(test="pod deleted mid-connection", fds_before=fds_before, fds_with_pod=fds_during,
           fds_after=fd_count(zt.pid))


def _connections(mesh: LocalMesh, node: str) -> list[dict[str, Any]]:
    status, body = http_get(mesh.node_netns(node), "127.0.0.1", mesh.port(node, 15000),
                            "/connections", timeout=5)
    assert status == 200
    return list(body) if isinstance(body, list) else []


def test_pod_netns_deleted_out_from_under_everyone(mesh: LocalMesh) -> None:
    """``ip netns del`` of a served pod's netns, no CNI DEL: ztunnel keeps running (and
    ready); the agent notices within its retry interval (no cluster event needed), forgets the
    pod and tells ztunnel (ZDS Del), which closes its listeners and the netns fd (fd count back
    to before the pod); a later CNI DEL still succeeds; other pods are unaffected."""
    assert mesh.cluster is not None
    node = "node-b"
    zt = mesh.ztunnels[node]
    fds_before = fd_count(zt.pid)
    key = add_pod(mesh, "victim-ns", "shop", node, "backend", {"app": "victim"})
    victim = mesh.pods[key]
    wait_served(mesh, "victim-ns")
    log = mesh.agent_log_path(node)
    offset = log_size(log)
    try:
        netlink.delete_netns(victim.netns)
        assert not netlink.netns_exists(victim.netns)
        # ztunnel does not notice or mind: it keeps running and stays ready.
        assert zt.popen is not None and zt.popen.poll() is None and ready(mesh, node)
        # The netns itself lives on while ztunnel (and the app) hold it: whether this
        # connection is still served depends on whether the agent noticed yet (observed).
        still_served = demo.probe(mesh, "shop/frontend", victim.ip, 8080, timeout=3).ok
        # No cluster event is needed: the agent's retry loop notices the netns is gone.
        assert wait_for(lambda: "victim-ns" not in {p["name"] for p in agent_pods(mesh, node)},
                        timeout=30), log_since(log, offset)[-2000:]
        assert "netns of shop/victim-ns is gone; forgetting it" in log_since(log, offset)
        assert wait_for(lambda: "victim-ns" not in workload_names(mesh, node))
        assert zt.popen.poll() is None and ready(mesh, node)
        # The runtime's CNI DEL comes later, for a netns that no longer exists: it succeeds.
        assert delete_pod(mesh, key) == []
        assert wait_for(lambda: fd_count(zt.pid) <= fds_before + 2, timeout=30), \
            (fds_before, fd_count(zt.pid))
    finally:
        if key in mesh.pods:
            delete_pod(mesh, key)
    assert demo.probe(mesh, "shop/frontend", mesh.pods["shop/backend-1"].ip, 8080).ok
    assert not demo.probe(mesh, "shop/frontend", victim.ip, 8080, timeout=3).ok
    report(test="pod netns deleted", served_while_held=still_served, fds_before=fds_before,
           fds_after=fd_count(zt.pid))


def test_whole_node_removed(mesh: LocalMesh) -> None:
    """Runs last: node-b disappears (its ztunnel, agent and pods SIGKILLed, its netns
    deleted, no CNI DEL, as when a machine dies).  node-a's ztunnel keeps running and serving
    same-node traffic; traffic to node-b's pods fails (never in plaintext); when the node's pods
    are deleted from the cluster (what the node lifecycle controller does), the control plane
    withdraws them and the backend Service answers from node-a only."""
    assert mesh.cluster is not None
    gone = "node-b"
    gone_pods = sorted(k for k, p in mesh.pods.items() if p.node == gone)
    be1 = mesh.pods["shop/backend-1"]
    marker = f"NODE-GONE-{secrets.token_hex(8)}"
    with Sniffer(mesh.node_netns("node-a"), "ul0", (marker.encode(),)) as sniff:
        for proc in [mesh.ztunnels.pop(gone), mesh.agents.pop(gone)]:
            sigkill(mesh, proc)
        for key in gone_pods:
            pod = mesh.pods[key]
            for proc in [p for p in mesh.cluster.processes
                         if mesh.cluster._proc_owner.get(p.pid) == pod.name]:
                sigkill(mesh, proc)
        for key in gone_pods:
            netlink.delete_netns(mesh.pods[key].netns)
        netlink.delete_netns(mesh.cluster.nodes[gone].netns)
        # With nothing left inside it, the node netns is freed: its uplink's bridge port goes.
        port = f"n{mesh.cluster.nodes[gone].index}"
        assert wait_for(lambda: port not in netlink.ip_in(mesh.cluster.underlay, "-o", "link"),
                        timeout=10)
        a = mesh.ztunnels["node-a"]
        assert a.popen is not None and a.popen.poll() is None and ready(mesh, "node-a")
        assert demo.probe(mesh, "shop/frontend", mesh.pods["shop/backend-2"].ip, 8080).ok
        r = mesh.cluster.run_in_pod(mesh.pods["shop/frontend"], [
            sys.executable, SCRIPT, "stream", "--host", be1.ip, "--marker", marker,
            "--seconds", "1"], timeout=60)
        assert "connected" not in r.stdout, r.stdout
        # The node lifecycle controller deletes the dead node's pods.
        for key in gone_pods:
            ns, name = key.split("/")
            mesh.delete_object("Pod", ns, name, missing_ok=True)
        assert wait_for(lambda: not {"backend-1", "db"} & {
            w["name"] for w in mesh.config_dump("node-a")["workloads"]}, timeout=30)
        results = [demo.probe(mesh, "shop/frontend", "10.96.0.10", 80) for _ in range(6)]
        assert all(r.ok and r.server_name == "backend-2" for r in results), results
    assert sniff.hits[marker.encode()] == 0
    for key in gone_pods:  # kubelet is gone with the node: only the sandboxes' leftovers
        assert mesh.cluster.remove_pod(mesh.pods.pop(key).name) == []
    report(test="node removed", pods_lost=len(gone_pods), vip_after=len(results))
