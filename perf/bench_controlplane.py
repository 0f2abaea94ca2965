"""Control-plane translation benchmark: 10k pods in 1k services across 100 namespaces.

Measures the pipeline (``controlplane.pipeline.Pipeline``): the initial full translation, and
the median time and number of pushed resources for one pod change, one service change and
one policy change.  The baseline is the full translation measured in the same run: the ratio
says how much cheaper an incremental change is than re-translating everything.  The push
column is what follows a translation on the way to a proxy: the snapshot cache update, the
delta computed for one wildcard-subscribed xDS stream (``controlplane.xds.DeltaStream``) and
the serialized response bytes (no network).

Run: ``python perf/bench_controlplane.py [--pods N --services N --namespaces N --repeat N]``.
Prints a table and writes ``perf/results/controlplane.json``.
"""

# Generated object shapes are kept one per line for readability.
# ruff: noqa: E501

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ambient.api.envoy.config.core.v3 import base_pb2  # noqa: E402
from ambient.api.envoy.service.discovery.v3 import discovery_pb2  # noqa: E402
from controlplane.cache import SnapshotCache  # noqa: E402
from controlplane.objects import Update, object_key  # noqa: E402
from controlplane.pipeline import Changes, Pipeline  # noqa: E402
from controlplane.xds import DeltaStream  # noqa: E402

TYPES = ("type.googleapis.com/istio.workload.Address",
         "type.googleapis.com/istio.security.Authorization")
NODE = "ztunnel~10.0.0.1~ztunnel-x.istio-system~istio-system.svc.cluster.local"


class Pusher:
    """A snapshot cache with one wildcard-subscribed stream; ``push`` returns (s, bytes)."""

    def __init__(self) -> None:
        self.cache = SnapshotCache()
        self.stream = DeltaStream(self.cache)

    def subscribe(self) -> tuple[float, int]:
        t0 = time.perf_counter()
        size = 0
        for i, type_url in enumerate(TYPES):
            req = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url,
                                                      resource_names_subscribe=["*"])
            if i == 0:
                req.node.CopyFrom(base_pb2.Node(id=NODE))
            for resp in self.stream.handle_request(req):
                size += len(resp.SerializeToString())
                ack = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url,
                                                          response_nonce=resp.nonce)
                self.stream.handle_request(ack)
        return time.perf_counter() - t0, size

    def push(self, changes: Changes) -> tuple[float, int]:
        t0 = time.perf_counter()
        size = 0
        for type_url, names in self.cache.apply_changes(changes).items():
            for resp in self.stream.on_change(type_url, names):
                size += len(resp.SerializeToString())
                self.stream.handle_request(discovery_pb2.DeltaDiscoveryRequest(
                    type_url=type_url, response_nonce=resp.nonce))
        return time.perf_counter() - t0, size


def _pod(ns: str, name: str, app: str, ip: str, version: str = "v1") -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": app, "version": version}},
        "spec": {"nodeName": "node-a", "serviceAccountName": app,
                 "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIPs": [{"ip": ip}],
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }  # fmt: skip


def _svc(ns: str, name: str, ip: str, selector: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": ip, "selector": selector,
                 "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    }  # fmt: skip


def _policy(ns: str, app: str, sa: str) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": f"allow-{app}", "namespace": ns},
        "spec": {"selector": {"matchLabels": {"app": app}},
                 "rules": [{"from": [{"source": {"principals": [f"cluster.local/ns/{ns}/sa/{sa}"]}}]}]},
    }  # fmt: skip


def generate(pods: int, services: int, namespaces: int) -> list[dict[str, Any]]:
    objs: list[dict[str, Any]] = []
    per_ns_svc = max(1, services // namespaces)
    per_svc_pods = max(1, pods // services)
    n = 0
    for i in range(namespaces):
        ns = f"ns{i}"
        objs.append({"apiVersion": "v1", "kind": "Namespace",
                     "metadata": {"name": ns, "labels": {"istio.io/dataplane-mode": "ambient"}}})
        objs.append({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                     "metadata": {"name": "default", "namespace": ns},
                     "spec": {"mtls": {"mode": "STRICT"}}})  # fmt: skip
        for j in range(per_ns_svc):
            app = f"app{j}"
            objs.append(_svc(ns, app, f"10.{96 + i // 250}.{i % 250}.{j + 1}", {"app": app}))
            objs.append(_policy(ns, app, f"app{(j + 1) % per_ns_svc}"))
            for k in range(per_svc_pods):
                n += 1
                objs.append(_pod(ns, f"{app}-{k}", app, f"10.{1 + n // 65000}.{n // 250 % 250}.{n % 250 + 1}"))
    return objs


def median_of(repeat: int, step: Callable[[int], Changes],
              pusher: Pusher) -> tuple[float, int, float, int]:
    times, pushed, push_times, push_bytes = [], [], [], []
    for i in range(repeat):
        t0 = time.perf_counter()
        ch = step(i)
        times.append(time.perf_counter() - t0)
        pushed.append(ch.count())
        pt, pb = pusher.push(ch)
        push_times.append(pt)
        push_bytes.append(pb)
    return (statistics.median(times), int(statistics.median(pushed)),
            statistics.median(push_times), int(statistics.median(push_bytes)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=10_000)
    ap.add_argument("--services", type=int, default=1_000)
    ap.add_argument("--namespaces", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=21)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "controlplane.json"))
    args = ap.parse_args()
    repeat = max(1, min(args.repeat, 1000))

    objs = generate(args.pods, args.services, args.namespaces)
    by_key = {object_key(o): o for o in objs}
    p = Pipeline()
    t0 = time.perf_counter()
    first = p.apply(Update(upserts=by_key, resync=True))
    initial = time.perf_counter() - t0
    pusher = Pusher()
    pusher.cache.apply_changes(first)
    initial_push, initial_bytes = pusher.subscribe()

    def pod_change(i: int) -> Changes:
        o = _pod("ns7", "app3-2", "app3", "10.200.0.1", version=f"v{i + 2}")
        return p.apply(Update(upserts={object_key(o): o}))

    def service_change(i: int) -> Changes:
        o = _svc("ns8", "app4", f"10.250.0.{i % 200 + 1}", {"app": "app4"})
        return p.apply(Update(upserts={object_key(o): o}))

    def policy_change(i: int) -> Changes:
        o = _policy("ns9", "app5", f"app{i % 10}")
        return p.apply(Update(upserts={object_key(o): o}))

    def policy_selector_change(i: int) -> Changes:
        o = _policy("ns9", "app6", "app0")
        o["spec"]["selector"]["matchLabels"]["app"] = "app6" if i % 2 else "app7"
        return p.apply(Update(upserts={object_key(o): o}))

    rows = [("initial translation", initial, first.count(), initial_push, initial_bytes)]
    for label, fn in (("one pod change", pod_change), ("one service change", service_change),
                      ("one policy change (rules)", policy_change),
                      ("one policy change (selector)", policy_selector_change)):  # fmt: skip
        rows.append((label, *median_of(repeat, fn, pusher)))

    print(f"{len(p.store.objects)} objects: {args.pods} pods, {args.services} services, "
          f"{args.namespaces} namespaces; medians of {repeat}")  # fmt: skip
    print(f"{'case':32} {'translate s':>11} {'pushed':>8} {'x faster than full':>19} "
          f"{'push s':>9} {'push bytes':>11}")
    results = []
    for label, secs, pushed, push_s, push_b in rows:
        ratio = initial / secs if secs > 0 else float("inf")
        print(f"{label:32} {secs:11.5f} {pushed:8d} {ratio:19.1f} {push_s:9.5f} {push_b:11d}")
        results.append({"case": label, "seconds": secs, "resources_pushed": pushed,
                        "speedup_vs_full": ratio, "push_seconds": push_s,
                        "push_bytes": push_b})  # fmt: skip
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"pods": args.pods, "services": args.services, "namespaces": args.namespaces,
                   "objects": len(p.store.objects), "repeat": repeat, "results": results}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
