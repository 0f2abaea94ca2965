"""``ambientctl demo``: build the local mesh from a manifests file and show it working.

Each scenario sends real traffic between pods and checks what the mesh did, from the
client's reply *and* from what the ztunnels reported (metrics with SPIFFE principals).
The demo prints a verdict per scenario and exits non-zero if any misbehaved.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ambient.cluster.cluster import destroy_from_state, sweep_stale
from ambient.cluster.echo import HttpResult, ProbeResult
from ambient.cluster.mesh import LocalMesh, MeshError, ensure_root, remove_run_dir

SPIFFE = "spiffe://cluster.local/ns/{ns}/sa/{sa}"


@dataclass
class Scenario:
    title: str
    passed: bool
    detail: str


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def _opened(mesh: LocalMesh, node: str, labels: dict[str, str]) -> float:
    return metric_value(mesh.metrics(node), "istio_tcp_connections_opened_total", **labels)


def _wait_metric(mesh: LocalMesh, node: str, before: float, labels: dict[str, str],
                 timeout: float = 5.0) -> float:
    """Wait until the counter grows past ``before`` (metrics are written at close)."""
    deadline = time.monotonic() + timeout
    value = before
    while time.monotonic() < deadline:
        value = _opened(mesh, node, labels)
        if value > before:
            break
        time.sleep(0.1)
    return value


def probe(mesh: LocalMesh, src: str, dst_ip: str, port: int, timeout: float = 5) -> ProbeResult:
    """A connection made by one of ``src``'s applications (in its cgroup and netns, so every
    capture backend sees it as the pod's traffic)."""
    assert mesh.cluster is not None
    return mesh.cluster.probe(mesh.pods[src], dst_ip, port, timeout=timeout)


def _mtls(mesh: LocalMesh, title: str, src: str, dst: str) -> Scenario:
    dst_pod, src_pod = mesh.pods[dst], mesh.pods[src]
    principal = SPIFFE.format(ns=src_pod.namespace, sa=src_pod.service_account)
    labels = {"reporter": "destination", "source_principal": principal,
              "destination_canonical_service": dst_pod.labels.get("app", dst_pod.name),
              "connection_security_policy": "mutual_tls"}
    before = _opened(mesh, dst_pod.node, labels)
    r = probe(mesh, src, dst_pod.ip, 8080)
    after = _wait_metric(mesh, dst_pod.node, before, labels)
    seen = r.seen_client
    ok = r.ok and after > before and seen is not None and seen[0] == src_pod.ip
    detail = (f"{src} ({src_pod.node}) -> {dst} ({dst_pod.node}): reply {r.greeting!r}; "
              f"destination ztunnel saw peer {principal}: {after > before}; "
              f"app saw client IP {seen[0] if seen else '?'}")
    return Scenario(title, ok, detail if ok else f"{detail}; {r.error}")


def mtls_cross_node(mesh: LocalMesh) -> Scenario:
    return _mtls(mesh, "cross-node mTLS (HBONE)", "shop/frontend", "shop/backend-1")


def mtls_same_node(mesh: LocalMesh) -> Scenario:
    return _mtls(mesh, "same-node mTLS (identity + policy, same-node shortcut)", "shop/frontend",
                 "shop/backend-2")


def service_vip(mesh: LocalMesh) -> Scenario:
    names = set()
    results = [probe(mesh, "shop/frontend", "10.96.0.10", 80) for _ in range(6)]
    for r in results:
        if r.server_name:
            names.add(r.server_name)
    ok = all(r.ok for r in results) and bool(names) and names <= {"backend-1", "backend-2"}
    return Scenario("service VIP 10.96.0.10:80 -> backend endpoints", ok,
                    f"6 connections answered by {sorted(names)}"
                    + ("" if ok else f"; errors: {[r.error for r in results if not r.ok]}"))


def policy_allows_backend(mesh: LocalMesh) -> Scenario:
    r = probe(mesh, "shop/backend-2", "10.96.0.20", 5432)
    return Scenario("AuthorizationPolicy allows backend -> db", r.ok,
                    f"backend-2 -> db:5432 reply {r.greeting!r}" + ("" if r.ok else f" {r.error}"))


def policy_denies_frontend(mesh: LocalMesh) -> Scenario:
    db = mesh.pods["shop/db"]
    labels = {"reporter": "destination", "destination_workload": "db",
              "response_flags": "DENY"}
    before = metric_value(mesh.metrics(db.node), "istio_tcp_connections_closed_total", **labels)
    r = probe(mesh, "shop/frontend", "10.96.0.20", 5432)
    deadline, after = time.monotonic() + 5, before
    while time.monotonic() < deadline and after <= before:
        after = metric_value(mesh.metrics(db.node), "istio_tcp_connections_closed_total", **labels)
        time.sleep(0.1)
    ok = not r.ok and not r.greeting and after > before
    return Scenario("AuthorizationPolicy denies frontend -> db", ok,
                    f"frontend -> db:5432: {'refused' if not r.ok else 'ANSWERED'}; "
                    f"db's ztunnel recorded a DENY: {after > before}")


def strict_refuses_plaintext(mesh: LocalMesh) -> Scenario:
    target = mesh.pods["shop/backend-1"]
    r = probe(mesh, "legacy/client", target.ip, 8080)
    ok = not r.ok and not r.greeting
    return Scenario("PeerAuthentication STRICT refuses plaintext", ok,
                    f"legacy/client -> backend-1:8080 without mTLS: "
                    f"{'refused' if ok else 'ANSWERED ' + repr(r.greeting)}")


def unenrolled_bypass(mesh: LocalMesh) -> Scenario:
    web = mesh.pods["legacy/web"]
    before = _opened(mesh, web.node, {"destination_workload": "web"})
    r = probe(mesh, "legacy/client", web.ip, 8080)
    after = _opened(mesh, web.node, {"destination_workload": "web"})
    ok = r.ok and after == before
    return Scenario("unlabelled namespace bypasses the mesh", ok,
                    f"legacy/client -> legacy/web: reply {r.greeting!r}; "
                    f"no ztunnel saw it: {after == before}")


def passthrough_to_unenrolled(mesh: LocalMesh) -> Scenario:
    web, fe = mesh.pods["legacy/web"], mesh.pods["shop/frontend"]
    labels = {"reporter": "source", "destination_workload": "web",
              "connection_security_policy": "unknown"}
    before = _opened(mesh, fe.node, labels)
    r = probe(mesh, "shop/frontend", web.ip, 8080)
    after = _wait_metric(mesh, fe.node, before, labels)
    ok = r.ok and after > before
    return Scenario("mesh pod reaches a pod outside the mesh (plain TCP passthrough)", ok,
                    f"frontend -> legacy/web: reply {r.greeting!r}; frontend's ztunnel passed "
                    f"it through without mTLS: {after > before}")


def _wait_captured(mesh: LocalMesh, key: str, want: bool, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        mesh.refresh_enrolled()
        if (key in mesh.enrolled) == want:
            return True
        time.sleep(0.2)
    return False


def late_enrollment(mesh: LocalMesh) -> Scenario:
    web = mesh.pods["legacy/web"]
    mesh.set_labels("Pod", "legacy", "web", {"istio.io/dataplane-mode": "ambient"})
    captured = _wait_captured(mesh, "legacy/web", True)
    # The client's ztunnel learns from the control plane that web now speaks HBONE.
    fe_node = mesh.pods["shop/frontend"].node
    _until(lambda: any(w.get("name") == "web" and w.get("protocol") == "HBONE"
                       for w in mesh.config_dump(fe_node).get("workloads", [])), timeout=20)
    labels = {"reporter": "destination", "destination_workload": "web",
              "connection_security_policy": "mutual_tls"}
    before = _opened(mesh, web.node, labels)
    r = probe(mesh, "shop/frontend", web.ip, 8080)
    after = _wait_metric(mesh, web.node, before, labels)
    ok = captured and r.ok and after > before
    return Scenario("late enrollment: labelling a running pod puts it in the mesh", ok,
                    f"kubectl label pod legacy/web istio.io/dataplane-mode=ambient: captured "
                    f"by the agent: {captured}; frontend -> web now over mTLS: {after > before}"
                    + ("" if r.ok else f"; {r.error}"))


def unenrollment(mesh: LocalMesh) -> Scenario:
    web = mesh.pods["legacy/web"]
    mesh.set_labels("Pod", "legacy", "web", {"istio.io/dataplane-mode": None})
    released = _wait_captured(mesh, "legacy/web", False)
    before = _opened(mesh, web.node, {"destination_workload": "web", "reporter": "destination"})
    r = probe(mesh, "legacy/client", web.ip, 8080)
    after = _opened(mesh, web.node, {"destination_workload": "web", "reporter": "destination"})
    ok = released and r.ok and after == before
    return Scenario("un-enrollment: removing the label releases the running pod", ok,
                    f"label removed: released by the agent: {released}; legacy/client -> web "
                    f"answered without any ztunnel: {r.ok and after == before}"
                    + ("" if r.ok else f"; {r.error}"))


def policy_change_live(mesh: LocalMesh) -> Scenario:
    """Editing a policy in the manifests reaches the ztunnels through the control plane and
    closes an open connection the new policy denies (late rejection); restoring reopens."""
    db = mesh.pods["shop/db"]
    held = mesh.hold("shop/backend-2", "10.96.0.20", 5432)
    connected = _until(lambda: held.state() != "starting") and held.state() == "connected"
    old: list[str] = []

    def set_principals(principals: list[str]) -> Callable[[dict[str, Any]], None]:
        def change(o: dict[str, Any]) -> None:
            src = o["spec"]["rules"][0]["from"][0]["source"]
            old[:] = old or src["principals"]
            src["principals"] = principals
        return change

    labels = {"reporter": "destination", "destination_workload": "db",
              "response_flags": "DENY", "source_principal": SPIFFE.format(ns="shop", sa="backend")}
    before = metric_value(mesh.metrics(db.node), "istio_tcp_connections_closed_total", **labels)
    try:
        mesh.update_object("AuthorizationPolicy", "shop", "db-allow-backend",
                           set_principals(["cluster.local/ns/shop/sa/nobody"]))
        cut = _until(lambda: held.state() == "closed", timeout=20)
        refused = not probe(mesh, "shop/backend-2", "10.96.0.20", 5432, timeout=3).ok
        after = metric_value(mesh.metrics(db.node), "istio_tcp_connections_closed_total",
                             **labels)
    finally:
        mesh.update_object("AuthorizationPolicy", "shop", "db-allow-backend",
                           set_principals(old or ["cluster.local/ns/shop/sa/backend"]))
        assert mesh.cluster is not None
        mesh.cluster.stop_process(held.proc)
    restored = _until(lambda: probe(mesh, "shop/backend-2", "10.96.0.20", 5432).ok, timeout=20)
    ok = connected and cut and refused and after > before and restored
    return Scenario("policy edited live: the open connection it now denies is closed", ok,
                    f"backend-2 -> db held open: {connected}; after the edit the control plane "
                    f"pushed it and db's ztunnel closed the connection: {cut} (DENY recorded: "
                    f"{after > before}), new ones refused: {refused}; policy restored and "
                    f"traffic back: {restored}")


def _until(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.2)
    return pred()


def ztunnel_restart(mesh: LocalMesh) -> Scenario:
    """New connections keep succeeding while node-a's ztunnel is replaced."""
    fe, be = mesh.pods["shop/frontend"], mesh.pods["shop/backend-1"]
    results: list[ProbeResult] = []
    stop = threading.Event()

    def traffic() -> None:
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline and len(results) < 500:
            results.append(probe(mesh, "shop/frontend", be.ip, 8080))

    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    try:
        time.sleep(1.0)
        mesh.restart_ztunnel(fe.node)
        time.sleep(1.0)
    finally:
        stop.set()
        t.join(timeout=30)
    failed = [r for r in results if not r.ok]
    ok = bool(results) and not failed
    return Scenario("ztunnel rolling restart under traffic: no new connection fails", ok,
                    f"{len(results)} connections frontend -> backend-1 while {fe.node}'s "
                    f"ztunnel was replaced: {len(failed)} failed"
                    + (f" ({failed[0].error})" if failed else ""))


# -- the waypoint (L7) ----------------------------------------------------------------------

WAYPOINT = "shop/waypoint"
REVIEWS_VIP = "10.96.0.30"
REVIEWS_HOST = "reviews.shop.svc.cluster.local"


def http(mesh: LocalMesh, src: str, host: str, port: int, path: str = "/", *,
         method: str = "GET", count: int = 1, timeout: float = 5) -> list[HttpResult]:
    """``count`` HTTP requests made by one of ``src``'s applications (``echo http``)."""
    assert mesh.cluster is not None
    cp = mesh.cluster.run_in_pod(
        mesh.pods[src], [sys.executable, "-m", "ambient.cluster.echo", "http", "--host", host,
                         "--port", str(port), "--path", path, "--method", method, "--count",
                         str(count), "--timeout", str(timeout)],
        timeout=count * timeout + 30)
    try:
        results = json.loads(cp.stdout.strip().splitlines()[-1])["results"]
        return [HttpResult.from_json(r) for r in results]
    except (ValueError, IndexError, KeyError, TypeError):
        return [HttpResult(error=f"http client failed: {cp.stderr.strip()[-500:]}")]


def _requests_total(mesh: LocalMesh, **labels: str) -> float:
    return metric_value(mesh.waypoint_metrics(WAYPOINT), "istio_requests_total", **labels)


def waypoint_l7_policy(mesh: LocalMesh) -> Scenario:
    """The waypoint enforces an L7 AuthorizationPolicy: /admin is denied (403), /api allowed."""
    labels = {"response_code": "403", "destination_service_name": "reviews"}
    before = _requests_total(mesh, **labels)
    ok_r = http(mesh, "shop/frontend", REVIEWS_VIP, 80, "/api/reviews")[0]
    deny_r = http(mesh, "shop/frontend", REVIEWS_VIP, 80, "/admin/config")[0]
    recorded = _until(lambda: _requests_total(mesh, **labels) > before, timeout=5)
    ok = (ok_r.status == 200 and ok_r.json().get("path") == "/api/reviews"
          and deny_r.status == 403 and "RBAC: access denied" in deny_r.text and recorded)
    return Scenario("waypoint: L7 policy denies a path, allows another on the same service", ok,
                    f"frontend -> reviews GET /api/reviews: {ok_r.status or ok_r.error} (from "
                    f"{ok_r.json().get('pod', '?')}); GET /admin/config: {deny_r.status} "
                    f"{deny_r.text.strip()!r}; the waypoint recorded istio_requests_total"
                    f"{{response_code=\"403\"}}: {recorded}")


def waypoint_traffic_split(mesh: LocalMesh, n: int = 200) -> Scenario:
    """The HTTPRoute's 90/10 split, observed over ``n`` requests (per request, not per
    connection: the waypoint balances each request)."""
    results = http(mesh, "shop/frontend", REVIEWS_VIP, 80, "/api/reviews", count=n)
    by_pod: dict[str, int] = {}
    for r in results:
        pod = str(r.json().get("pod", f"error {r.status or r.error}"))
        by_pod[pod] = by_pod.get(pod, 0) + 1
    v1, v2 = by_pod.get("reviews-v1", 0), by_pod.get("reviews-v2", 0)
    share = v2 / max(1, len(results))
    ok = len(results) == n and v1 + v2 == n and 0.02 <= share <= 0.25
    return Scenario("waypoint: HTTPRoute splits reviews 90/10 between v1 and v2", ok,
                    f"{n} requests frontend -> reviews: v1 {v1}, v2 {v2} (v2 share "
                    f"{100 * share:.1f}%, route weight 10%)"
                    + ("" if v1 + v2 == n else f"; others: {by_pod}"))


def waypoint_cannot_be_skipped(mesh: LocalMesh) -> Scenario:
    """A mesh pod that connects straight to a reviews pod (its IP, the port the reviews
    Service targets) is refused by the destination ztunnel: only the waypoint may come in."""
    target = mesh.pods["shop/reviews-v1"]
    labels = {"reporter": "destination", "destination_workload": "reviews",  # the app label
              "response_flags": "DENY",
              "source_principal": SPIFFE.format(ns="shop", sa="frontend")}
    before = metric_value(mesh.metrics(target.node), "istio_tcp_connections_closed_total",
                          **labels)
    r = http(mesh, "shop/frontend", target.ip, 8081, "/admin/config", timeout=3)[0]
    denied = _until(lambda: metric_value(mesh.metrics(target.node),
                                         "istio_tcp_connections_closed_total", **labels) > before,
                    timeout=5)
    via = http(mesh, "shop/frontend", REVIEWS_VIP, 80, "/api/reviews")[0]
    ok = r.status == 0 and denied and via.status == 200
    return Scenario("waypoint cannot be skipped: direct pod traffic to reviews is refused", ok,
                    f"frontend -> reviews-v1 {target.ip}:8081 directly: "
                    f"{'refused' if r.status == 0 else f'ANSWERED {r.status}'}; its ztunnel "
                    f"recorded DENY for frontend's principal: {denied}; through the service "
                    f"(and so the waypoint): {via.status or via.error}")


def waypoint_down_fails_closed(mesh: LocalMesh) -> Scenario:
    """With the waypoint's process stopped, reviews is unreachable (never reached around the
    waypoint); once it is back, traffic flows again."""
    fe = mesh.pods["shop/frontend"]
    labels = {"reporter": "source", "destination_service": REVIEWS_HOST,
              "response_flags": "CONNECT"}
    before = metric_value(mesh.metrics(fe.node), "istio_tcp_connections_closed_total", **labels)
    mesh.stop_waypoint(WAYPOINT)
    try:
        down = http(mesh, "shop/frontend", REVIEWS_VIP, 80, "/api/reviews", timeout=3)[0]
        recorded = _until(lambda: metric_value(
            mesh.metrics(fe.node), "istio_tcp_connections_closed_total", **labels) > before,
            timeout=5)
    finally:
        mesh.start_waypoint(WAYPOINT)
    back = _until(lambda: http(mesh, "shop/frontend", REVIEWS_VIP, 80, "/api/reviews")[0]
                  .status == 200, timeout=20)
    ok = down.status == 0 and recorded and back
    return Scenario("waypoint down: traffic that needs it fails closed", ok,
                    f"waypoint stopped: frontend -> reviews "
                    f"{'refused' if down.status == 0 else f'ANSWERED {down.status}'}, "
                    f"frontend's ztunnel recorded a CONNECT failure: {recorded}; waypoint "
                    f"restarted, traffic back: {back}")


SCENARIOS: list[Callable[[LocalMesh], Scenario]] = [
    mtls_cross_node, mtls_same_node, service_vip, policy_allows_backend,
    policy_denies_frontend, strict_refuses_plaintext, unenrolled_bypass,
    passthrough_to_unenrolled, late_enrollment, unenrollment, policy_change_live,
    ztunnel_restart, waypoint_l7_policy, waypoint_traffic_split, waypoint_cannot_be_skipped,
    waypoint_down_fails_closed,
]


def show_metrics(mesh: LocalMesh) -> None:
    print("\nistio_tcp_connections_closed_total{reporter=\"destination\"} on each node's "
          "ztunnel (:15020/metrics):")
    for node in sorted(mesh.ztunnels):
        for fam in text_string_to_metric_families(mesh.metrics(node)):
            for s in fam.samples:
                if s.name == "istio_tcp_connections_closed_total" and \
                        s.labels.get("reporter") == "destination":
                    print(f"  [{node}] source_principal={s.labels['source_principal']} "
                          f"destination_workload={s.labels['destination_workload']} "
                          f"response_flags={s.labels['response_flags']}: {int(s.value)}")
    for key in sorted(mesh.waypoints):
        print(f"\nistio_requests_total on waypoint {key} (:15020/stats/prometheus):")
        for fam in text_string_to_metric_families(mesh.waypoint_metrics(key)):
            for s in fam.samples:
                if s.name == "istio_requests_total":
                    print(f"  source_principal={s.labels.get('source_principal')} "
                          f"destination_service_name={s.labels.get('destination_service_name')} "
                          f"destination_version={s.labels.get('destination_version')} "
                          f"response_code={s.labels.get('response_code')}: {int(s.value)}")
    lines = [ln for ln in mesh.log_path("node-b").read_text().splitlines()
             if "connection complete" in ln and 'direction="inbound"' in ln]
    if lines:
        print(f"\nan access-log line from node-b's ztunnel ({mesh.log_path('node-b')}):\n"
              f"  {lines[0]}")


def run_demo(manifests: Path, *, name: str, run_dir: Path, keep: bool,
             capture: str = "auto") -> int:
    try:
        ensure_root()
    except MeshError as e:
        print(f"demo: {e}")
        return 1
    for stale, errors in sweep_stale(str(run_dir)).items():
        print(f"removed leftovers of a previous run in {stale}" + (f": {errors}" if errors else ""))
    mesh = LocalMesh(manifests, name=name, run_root=run_dir, capture=capture)
    results: list[Scenario] = []
    try:
        mesh.up()
        print(f"\nscenarios (capture backend: {mesh.backend}):")
        for fn in SCENARIOS:
            try:
                sc = fn(mesh)
            except Exception as e:  # a scenario that crashes is a failed scenario
                sc = Scenario(fn.__name__, False, f"error: {e}")
            results.append(sc)
            print(f"  [{'PASS' if sc.passed else 'FAIL'}] {sc.title}\n         {sc.detail}")
        show_metrics(mesh)
    except MeshError as e:
        print(f"demo: {e}")
        results.append(Scenario("build the local mesh", False, str(e)))
    finally:
        if keep and mesh.cluster is not None:
            print(f"\ncluster {name} kept; ztunnel logs in {mesh.run_dir}/logs; "
                  "remove it with `ambientctl down`")
        else:
            errors = mesh.down()
            if errors:
                print(f"cleanup problems: {errors}")
    failed = [s for s in results if not s.passed]
    print(f"\nverdict ({mesh.backend or capture} capture): {len(results) - len(failed)} of "
          f"{len(results)} scenarios behaved as expected"
          + (f"; FAILED: {', '.join(s.title for s in failed)}" if failed else ""))
    return 1 if failed else 0


def down(run_dir: Path, name: str | None) -> int:
    targets = [run_dir / name] if name else sorted(p for p in run_dir.glob("*") if p.is_dir())
    status = 0
    for d in targets:
        errors = destroy_from_state(str(d))
        if not errors:
            remove_run_dir(d)
        print(f"removed {d.name}" + (f" with errors: {errors}" if errors else ""))
        status |= bool(errors)
    if not targets:
        print("nothing to remove")
    return status
