"""End to end: the local mesh from examples/demo.yaml, driven the way a user would.

The whole module runs once per capture backend (iptables, nftables, eBPF): pods are created
by CNI ADD through the reference plugins and our chained plugin, the node agents capture
them and hand them to ztunnel over ZDS.  Every demo scenario is asserted (enrollment by
label, late enrollment and release of a running pod, a ztunnel rolling restart under
traffic), plus what an operator relies on: the config dump, access logs, hot reload with
per-entry rejection, and graceful drain.
"""

from __future__ import annotations

import copy
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ambient.cluster import demo
from ambient.cluster.echo import tcp_probe
from ambient.cluster.mesh import LocalMesh

pytestmark = [pytest.mark.e2e, pytest.mark.netns]
MANIFESTS = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"


@pytest.fixture(scope="module", params=["iptables", "nftables", "ebpf"])
def mesh(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    root = tmp_path_factory.mktemp("run")
    m = LocalMesh(MANIFESTS, name=f"e2e{secrets.token_hex(2)}", run_root=root,
                  capture=request.param)
    try:
        m.up(progress=lambda _msg: None)
        yield m
    finally:
        cgroup_base = m.cluster.cgroup_base if m.cluster else ""
        errors = m.down()
        assert not errors, errors
    # Leak check: nothing of the cluster is left in the kernel or on bpffs.
    assert not os.path.exists(cgroup_base), cgroup_base
    assert not [p for p in Path("/sys/fs/bpf/ambient").glob(f"{m.name}-*")]
    assert not [ns for ns in os.listdir("/var/run/netns") if ns.startswith(f"{m.name}-")]


def _wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return pred()


@pytest.mark.parametrize("scenario", demo.SCENARIOS, ids=lambda f: f.__name__)
def test_demo_scenario(mesh: LocalMesh, scenario: Callable[[LocalMesh], demo.Scenario]) -> None:
    result = scenario(mesh)
    assert result.passed, f"{result.title}: {result.detail}"


def test_config_dump_lists_workloads_policies_and_certificates(mesh: LocalMesh) -> None:
    # Make sure node-b holds a certificate for backend (served on its 15008).
    assert demo.probe(mesh, "shop/frontend", mesh.pods["shop/backend-1"].ip, 8080).ok
    dump = mesh.config_dump("node-b")
    names = {w["name"] for w in dump["workloads"]}
    assert {"frontend", "backend-1", "backend-2", "db", "client", "web"} <= names
    assert any(p["name"] == "db-allow-backend" for p in dump["policies"])
    ids = {c["identity"] for c in dump["certificates"]}
    assert "spiffe://cluster.local/ns/shop/sa/backend" in ids
    assert {s["info"]["name"] for s in dump["workloadState"].values()} == {
        "backend-1", "db", "reviews-v2"}


def test_proxies_never_load_cryptography(mesh: LocalMesh) -> None:
    """The node proxies read certificates through the libcrypto ``ssl`` already maps
    (ambient.x509lite); ``cryptography`` (~10 MB of RSS each) stays with the CA.  Checked after
    traffic, so certificates were fetched and peers verified."""
    assert demo.probe(mesh, "shop/frontend", mesh.pods["shop/backend-1"].ip, 8080).ok
    procs = {**{f"ztunnel {n}": p for n, p in mesh.ztunnels.items()},
             **{f"waypoint {k}": p for k, p in mesh.waypoints.items()}}
    assert len(procs) >= 3, procs
    for name, proc in procs.items():
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "libcrypto.so" in maps, name  # the check would see a mapped library
        assert "/cryptography/" not in maps, f"{name} mapped the cryptography package"


def test_access_log_has_one_line_per_connection(mesh: LocalMesh) -> None:
    dst = mesh.pods["shop/backend-1"]
    log_path = mesh.log_path(dst.node)

    def inbound_lines() -> list[str]:
        return [ln for ln in log_path.read_text().splitlines()
                if "connection complete" in ln and 'direction="inbound"' in ln]

    before = len(inbound_lines())
    r = demo.probe(mesh, "shop/backend-2", dst.ip, 8080)
    assert r.ok, r.error
    assert _wait_for(lambda: len(inbound_lines()) > before)
    new = inbound_lines()[before:]
    assert len(new) == 1, new
    assert 'src.identity="spiffe://cluster.local/ns/shop/sa/backend"' in new[0]


def test_kubelet_probes_reach_strict_pods_through_probe_snat(mesh: LocalMesh) -> None:
    """A node-local health probe (the kubelet's) is SNATed to 169.254.7.127, which capture
    lets through, so STRICT does not break probes; a pod on another node still cannot."""
    be = mesh.pods["shop/backend-1"]
    r = tcp_probe(mesh.node_netns(be.node), be.ip, 8080)
    assert r.ok, r.error
    assert r.seen_client is not None and r.seen_client[0] == "169.254.7.127"
    other = next(n for n in mesh.ztunnels if n != be.node)
    assert not tcp_probe(mesh.node_netns(other), be.ip, 8080, timeout=3).ok


def test_bad_config_entry_is_rejected_and_last_good_stays(mesh: LocalMesh) -> None:
    path = mesh.run_dir / "manifests.yaml"
    original = path.read_text()
    docs = list(yaml.safe_load_all(original))
    for d in docs:  # break the db policy with an invalid port
        if d.get("kind") == "AuthorizationPolicy" and d["metadata"]["name"] == "db-allow-backend":
            d["spec"]["rules"][0]["to"][0]["operation"]["ports"] = ["not-a-port"]
    try:
        path.write_text(yaml.safe_dump_all(docs))
        # The control plane rejects the object and keeps pushing its last good translation.
        assert _wait_for(lambda: "not-a-port" in mesh.controlplane_log_path.read_text())
        # The last good policy still applies: frontend is still denied, backend allowed.
        assert not demo.probe(mesh, "shop/frontend", "10.96.0.20", 5432).ok
        assert demo.probe(mesh, "shop/backend-2", "10.96.0.20", 5432).ok
    finally:
        path.write_text(original + "\n")


def test_control_plane_outage_keeps_traffic_on_the_last_good_state(mesh: LocalMesh) -> None:
    """With the control plane gone, ztunnels keep their configuration and certificates;
    when it returns they reconnect (resuming with their resource versions)."""
    assert mesh.cluster is not None and mesh.controlplane is not None
    fe, be = "shop/frontend", mesh.pods["shop/backend-1"]
    mesh.cluster.stop_process(mesh.controlplane)
    assert demo.probe(mesh, fe, be.ip, 8080).ok  # mTLS with the certificates held
    assert not demo.probe(mesh, fe, "10.96.0.20", 5432, timeout=3).ok  # policy still enforced
    assert demo.probe(mesh, "shop/backend-2", "10.96.0.20", 5432).ok
    for node in mesh.ztunnels:  # still ready: readiness waits only for the *first* sync
        assert mesh.config_dump(node)["workloads"]
    log = mesh.log_path("node-a")
    before = log.read_text().count("xDS stream to")
    mesh.start_controlplane(sorted(mesh.ztunnels))
    assert _wait_for(lambda: log.read_text().count("xDS stream to") > before, timeout=30)
    assert demo.probe(mesh, fe, be.ip, 8080).ok


def test_agent_restart_keeps_capture_and_resyncs_ztunnel(mesh: LocalMesh) -> None:
    """The data path does not depend on the agent; a new agent restores its checkpoint,
    re-applies the rules and gives the reconnecting ztunnel a complete snapshot."""
    assert mesh.cluster is not None
    backend_ip = mesh.pods["shop/backend-1"].ip
    mesh.cluster.stop_process(mesh.agents["node-a"])
    assert demo.probe(mesh, "shop/frontend", backend_ip, 8080).ok  # ztunnel still serves
    assert demo.strict_refuses_plaintext(mesh).passed  # and capture is still in place
    mesh.start_agent("node-a")
    log = mesh.agent_log_path("node-a")
    # every pod sandbox of node-a: frontend, backend-2, reviews-v1 (captured) and
    # legacy/client (not)
    assert _wait_for(lambda: "restored 4 pods" in log.read_text()), log.read_text()[-2000:]
    assert _wait_for(lambda: log.read_text().count("snapshot delivered") >= 2)
    mesh.refresh_enrolled()
    assert {"shop/frontend", "shop/backend-2"} <= mesh.enrolled
    assert demo.probe(mesh, "shop/frontend", backend_ip, 8080).ok
    states = mesh.config_dump("node-a")["workloadState"].values()
    assert {s["info"]["name"] for s in states} == {"frontend", "backend-2", "reviews-v1"}


def test_waypoint_routing_faults_and_rate_limits_in_the_mesh(mesh: LocalMesh) -> None:
    """HTTPRoute redirects, rewrites and header modifiers, and an HTTPTrafficPolicy's fault and
    rate limit, applied by editing the cluster's objects and enforced by the waypoint on
    traffic from a mesh pod."""
    route = next(o for o in mesh.objects if o.get("kind") == "HTTPRoute"
                 and o["metadata"]["name"] == "reviews")
    original = copy.deepcopy(route)
    v1 = [{"name": "reviews-v1", "port": 80}]
    rules = [
        {"matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
         "filters": [{"type": "RequestRedirect",
                      "requestRedirect": {"path": {"type": "ReplaceFullPath",
                                                   "replaceFullPath": "/api/new"},
                                          "statusCode": 301}}]},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/v1only"}}],
         "filters": [{"type": "RequestHeaderModifier",
                      "requestHeaderModifier": {"set": [{"name": "x-mesh", "value": "yes"}]}},
                     {"type": "URLRewrite",
                      "urlRewrite": {"path": {"type": "ReplacePrefixMatch",
                                              "replacePrefixMatch": "/api"}}}],
         "backendRefs": v1},
        {"name": "faulty", "matches": [{"path": {"type": "PathPrefix", "value": "/faulty"}}],
         "backendRefs": v1},
        {"name": "limited", "matches": [{"path": {"type": "PathPrefix", "value": "/limited"}}],
         "backendRefs": v1},
        *original["spec"]["rules"],
    ]
    policy = {"apiVersion": "ambient.io/v1alpha1", "kind": "HTTPTrafficPolicy",
              "metadata": {"name": "reviews-faults", "namespace": "shop"},
              "spec": {"targetRefs": [{"group": "gateway.networking.k8s.io",
                                       "kind": "HTTPRoute", "name": "reviews",
                                       "sectionName": "faulty"}],
                       "fault": {"abort": {"httpStatus": 418, "percentage": 100}}}}
    limit = {"apiVersion": "ambient.io/v1alpha1", "kind": "HTTPTrafficPolicy",
             "metadata": {"name": "reviews-limit", "namespace": "shop"},
             "spec": {"targetRefs": [{"group": "gateway.networking.k8s.io",
                                      "kind": "HTTPRoute", "name": "reviews",
                                      "sectionName": "limited"}],
                      "rateLimit": {"requestsPerUnit": 1, "unit": "minute", "burst": 1}}}

    def get(path: str) -> Any:
        return demo.http(mesh, "shop/frontend", demo.REVIEWS_VIP, 80, path)[0]

    try:
        mesh.update_object("HTTPRoute", "shop", "reviews",
                           lambda o: o["spec"].__setitem__("rules", rules))
        mesh.apply_object(policy)
        mesh.apply_object(limit)
        assert _wait_for(lambda: get("/faulty").status == 418, timeout=20)
        redirect = get("/old/page")
        assert redirect.status == 301, redirect
        assert redirect.headers.get("location", "").endswith("/api/new"), redirect.headers
        rewritten = get("/v1only/x")
        assert rewritten.status == 200, rewritten
        echoed = rewritten.json()
        assert echoed.get("pod") == "reviews-v1" and echoed.get("path") == "/api/x", echoed
        assert {k.lower(): v for k, v in echoed.get("headers", {}).items()}.get("x-mesh") == "yes"
        statuses = [get("/limited").status for _ in range(3)]
        assert statuses[0] == 200 and 429 in statuses[1:], statuses
    finally:
        mesh.delete_object("HTTPTrafficPolicy", "shop", "reviews-faults", missing_ok=True)
        mesh.delete_object("HTTPTrafficPolicy", "shop", "reviews-limit", missing_ok=True)
        mesh.update_object("HTTPRoute", "shop", "reviews",
                           lambda o: o["spec"].__setitem__("rules", original["spec"]["rules"]))
    assert _wait_for(lambda: get("/faulty").status == 200, timeout=20)


def test_waypoint_timeouts_retries_http2_and_filters_in_the_mesh(mesh: LocalMesh) -> None:
    """Route timeouts and retries, HTTP/2 (h2c, a real nghttp client in a pod) and an
    operator's request filter loaded by configuration, through the mesh's waypoint."""
    assert mesh.cluster is not None
    route = next(o for o in mesh.objects if o.get("kind") == "HTTPRoute"
                 and o["metadata"]["name"] == "reviews")
    original = copy.deepcopy(route["spec"]["rules"])
    v1 = [{"name": "reviews-v1", "port": 80}]
    rules = [
        {"matches": [{"path": {"type": "PathPrefix", "value": "/slow"}}],
         "timeouts": {"request": "500ms"}, "backendRefs": v1},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/status"}}],
         "retry": {"attempts": 3, "codes": [503], "backoff": "10ms"}, "backendRefs": v1},
        *original,
    ]

    def get(path: str, **kw: Any) -> Any:
        return demo.http(mesh, "shop/frontend", demo.REVIEWS_VIP, 80, path, **kw)[0]

    try:
        mesh.update_object("HTTPRoute", "shop", "reviews",
                           lambda o: o["spec"].__setitem__("rules", rules))
        assert _wait_for(lambda: get("/slow/x?delay_ms=3000").status == 504, timeout=30)
        assert get("/slow/x?delay_ms=10").status == 200
        served = get("/status/200").json()["served"]
        assert get("/status/503").status == 503
        # the first try and 3 retries (Gateway API: attempts = retries) reached reviews-v1,
        # then this request
        assert get("/status/200").json()["served"] == served + 5
    finally:
        mesh.update_object("HTTPRoute", "shop", "reviews",
                           lambda o: o["spec"].__setitem__("rules", original))

    # HTTP/2 with prior knowledge from a pod's application, through capture and waypoint.
    cp = mesh.cluster.run_in_pod(mesh.pods["shop/frontend"], [
        "/usr/bin/nghttp", "-v", "-n", "-t", "10", f"http://{demo.REVIEWS_VIP}/api/h2"],
        timeout=60)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert ":status: 200" in cp.stdout and "SETTINGS" in cp.stdout, cp.stdout[-2000:]

    # An operator's filter, loaded by configuration (WAYPOINT_FILTERS) when the waypoint starts.
    mesh.waypoint_extra_env["WAYPOINT_FILTERS"] = "waypoint.examples.add_header:AddHeader"
    try:
        mesh.stop_waypoint(demo.WAYPOINT)
        mesh.start_waypoint(demo.WAYPOINT)
        tagged = get("/api/f")
        assert tagged.status == 200
        echoed = {k.lower(): v for k, v in tagged.json().get("headers", {}).items()}
        assert echoed.get("x-ambient-filter") == "add-header", echoed
    finally:
        mesh.waypoint_extra_env.pop("WAYPOINT_FILTERS", None)
        mesh.stop_waypoint(demo.WAYPOINT)
        mesh.start_waypoint(demo.WAYPOINT)
    assert "x-ambient-filter" not in {k.lower() for k in get("/api/g").json().get("headers", {})}


def test_unready_waypoint_fails_closed_then_recovers(mesh: LocalMesh) -> None:
    """The waypoint pod turns unready (Ready=False in the cluster's objects): the control
    plane publishes it UNHEALTHY and ztunnel refuses traffic that needs it (never sends it
    around the waypoint); Ready again, traffic flows.  (The demo scenario stops the waypoint's
    process instead.)"""
    fe = mesh.pods["shop/frontend"]
    path = mesh.run_dir / "manifests.yaml"
    original = path.read_text()
    docs = list(yaml.safe_load_all(original))
    for d in docs:
        if d.get("kind") == "Pod" and d["metadata"]["name"] == "waypoint":
            d["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    labels = {"reporter": "source", "destination_service": demo.REVIEWS_HOST,
              "response_flags": "CONNECT"}

    def refused() -> float:
        return demo.metric_value(mesh.metrics(fe.node), "istio_tcp_connections_closed_total",
                                 **labels)

    before = refused()
    try:
        path.write_text(yaml.safe_dump_all(docs))
        assert _wait_for(lambda: any(
            w["name"] == "waypoint" and w["status"] == "Unhealthy"
            for w in mesh.config_dump(fe.node)["workloads"]), timeout=20)
        r = demo.http(mesh, "shop/frontend", demo.REVIEWS_VIP, 80, "/api/reviews", timeout=3)[0]
        assert r.status == 0, r  # refused, not answered around the waypoint
        assert _wait_for(lambda: refused() > before)
        assert "has no ready proxy" in mesh.log_path(fe.node).read_text()
    finally:
        path.write_text(original + "\n")
    assert _wait_for(lambda: demo.http(mesh, "shop/frontend", demo.REVIEWS_VIP, 80,
                                       "/api/reviews")[0].status == 200, timeout=20)


def test_sigterm_drains_and_captured_traffic_then_fails_closed(mesh: LocalMesh) -> None:
    """Runs last in this module: it stops node-a's ztunnel."""
    proc = mesh.ztunnels["node-a"]
    assert proc.popen is not None
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.popen.wait(timeout=30) == 0
    # frontend's traffic is still captured, but nothing serves 15001: it is refused,
    # never sent in plaintext.
    r = demo.probe(mesh, "shop/frontend", mesh.pods["shop/backend-1"].ip, 8080, timeout=3)
    assert not r.ok and not r.greeting
