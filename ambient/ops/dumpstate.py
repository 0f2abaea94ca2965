"""A ztunnel config dump back into the mesh model, so operator tools can run ztunnel's own
decision code (routing, ``policies_for``, ``authz``) on what a ztunnel holds.

The dump's sections (``workloads``, ``services``, ``policies``) are ztunnel's local-config
shapes plus a few rendering differences, which are undone here: a workload's ``services`` is a
list of keys (the port maps live in each service's ``endpoints``), and upstream dumps carry
fields our local-config parser does not know (dropped). Then the same parser and store the
ztunnel uses build a ``MeshState``.

Invariant: never raises on a malformed entry; each one becomes an error string and the rest
is still loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ambient.config.local import parse_local_data
from ambient.store import MeshState, MeshStore

__all__ = ["state_from_dump"]

_WORKLOAD_KEYS = frozenset({
    "uid", "name", "namespace", "trustDomain", "serviceAccount", "network", "workloadName",
    "canonicalName", "canonicalRevision", "hostname", "node", "clusterId", "workloadIps",
    "protocol", "services", "waypoint", "networkGateway", "workloadType", "nativeTunnel",
    "applicationTunnel", "authorizationPolicies", "status", "locality", "capacity",
    "networkMode",
})
_SERVICE_KEYS = frozenset({"name", "namespace", "hostname", "vips", "ports", "subjectAltNames",
                           "waypoint", "loadBalancer", "ipFamilies", "canonical"})
_POLICY_KEYS = frozenset({"name", "namespace", "scope", "action", "dryRun", "rules", "groups"})


def _ports(raw: Any) -> dict[int, int]:
    out: dict[int, int] = {}
    if isinstance(raw, Mapping):
        for k, v in raw.items():
            try:
                out[int(k)] = int(v)
            except (TypeError, ValueError):
                continue
    return out


def state_from_dump(dump: Mapping[str, Any]) -> tuple[MeshState, list[str]]:
    """(state, errors) for a ``/config_dump`` body."""
    services = [s for s in dump.get("services") or [] if isinstance(s, Mapping)]
    # workload uid -> {"ns/hostname": {service port: target port}}, from service endpoints.
    svc_ports: dict[str, dict[str, dict[int, int]]] = {}
    for s in services:
        key = f"{s.get('namespace')}/{s.get('hostname')}"
        for uid, ep in (s.get("endpoints") or {}).items():
            ep = ep if isinstance(ep, Mapping) else {}
            wuid = str(ep.get("workloadUid") or uid)
            svc_ports.setdefault(wuid, {})[key] = _ports(ep.get("port"))
    workloads = []
    for w in dump.get("workloads") or []:
        if not isinstance(w, Mapping):
            continue
        w2 = {k: v for k, v in w.items() if k in _WORKLOAD_KEYS}
        listed = w2.pop("services", None)
        ports = dict(svc_ports.get(str(w.get("uid")), {}))
        if isinstance(listed, Mapping):
            ports.update({str(k): _ports(v) for k, v in listed.items()})
        elif isinstance(listed, list):
            for key in listed:
                ports.setdefault(str(key), {})
        w2["services"] = ports
        if isinstance(w2.get("workloadType"), str):
            w2["workloadType"] = w2["workloadType"].lower()
        workloads.append(w2)
    data = {
        "workloads": workloads,
        "services": [{k: v for k, v in s.items() if k in _SERVICE_KEYS} for s in services],
        "policies": [{k: v for k, v in p.items() if k in _POLICY_KEYS}
                     for p in dump.get("policies") or [] if isinstance(p, Mapping)],
    }
    parsed = parse_local_data(data)
    config = dump.get("config") if isinstance(dump.get("config"), Mapping) else {}
    root = config.get("root_namespace") if isinstance(config, Mapping) else None
    store = MeshStore(root_namespace=str(root) if root else None)
    errors = list(parsed.errors)
    errors += [f"{r.key}: {r.message}" for r in store.apply(m for _, m in parsed.resources)]
    return store.snapshot, errors
