"""Kubernetes manifests -> the WDS protos istiod would push (Address and Authorization).

Input is multi-document YAML text or already-parsed object dicts: Namespace, Pod, Service,
ServiceAccount, security.istio.io AuthorizationPolicy and PeerAuthentication; other kinds are
ignored with a warning. The translation is pure (dicts in, protos out), so the control plane
reuses it on objects it watches.

Invariants: never raises on any input; a malformed object yields one error naming
kind/namespace/name and what is wrong, and the rest still translate. Every returned proto
passes ``model.from_proto``. Output is deterministic (sorted by key).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ambient.api.istio.workload import workload_pb2 as wpb
from ambient.config import k8s_policy as kp
from ambient.config._common import (
    FieldError,
    as_ip,
    as_list,
    as_map,
    as_port,
    as_str,
    load_yaml_documents,
    short,
)
from ambient.model import ModelError, from_proto

__all__ = ["TranslationResult", "translate_manifests"]

DATAPLANE_MODE = "istio.io/dataplane-mode"
_KINDS = {
    "Namespace",
    "Pod",
    "Service",
    "ServiceAccount",
    "AuthorizationPolicy",
    "PeerAuthentication",
}
_CLUSTER_SCOPED = {"Namespace"}


@dataclass
class TranslationResult:
    resources: list[tuple[str, Any]] = field(default_factory=list)  # (key, Address|Authorization)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass
class _Svc:
    key: str
    proto: Any
    selector: dict[str, str]
    ports: list[tuple[int, int | str]]  # (service port, target port number or name)


def _labels(meta: dict[Any, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in as_map(meta.get("labels"), "metadata.labels").items()}


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _service(obj: dict[Any, Any], cluster_domain: str) -> _Svc | None:
    meta, spec = obj["metadata"], as_map(obj.get("spec"), "spec")
    name, ns = meta["name"], meta["namespace"]
    if spec.get("type") == "ExternalName":
        return None
    hostname = f"{name}.{ns}.svc.{cluster_domain}"
    s = wpb.Service(name=name, namespace=ns, hostname=hostname)
    ips = [as_str(ip, "spec.clusterIPs[]") for ip in as_list(spec.get("clusterIPs"), "clusterIPs")]
    if not ips and spec.get("clusterIP") is not None:
        ips = [as_str(spec["clusterIP"], "spec.clusterIP")]
    for i, ip in enumerate(ips):
        if ip in ("None", ""):
            continue
        s.addresses.add(network="", address=as_ip(ip, f"spec.clusterIPs[{i}]").packed)
    ports: list[tuple[int, int | str]] = []
    for i, p in enumerate(as_list(spec.get("ports"), "spec.ports")):
        p = as_map(p, f"spec.ports[{i}]")
        port = as_port(p.get("port"), f"spec.ports[{i}].port")
        target = p.get("targetPort", port)
        tref: int | str
        if isinstance(target, str) and not target.isdigit():
            tnum, tref = 0, target
        else:
            tnum = as_port(target, f"spec.ports[{i}].targetPort")
            tref = tnum
        s.ports.add(service_port=port, target_port=tnum)
        ports.append((port, tref))
    selector = {str(k): str(v) for k, v in as_map(spec.get("selector"), "spec.selector").items()}
    return _Svc(f"{ns}/{hostname}", s, selector, ports)


def _owner(meta: dict[Any, Any], labels: dict[str, str], pod_name: str) -> tuple[str, str]:
    """(workload_name, workload_type) from ownerReferences, like istiod."""
    for ref in as_list(meta.get("ownerReferences"), "metadata.ownerReferences"):
        ref = as_map(ref, "metadata.ownerReferences[]")
        kind, name = ref.get("kind"), str(ref.get("name", ""))
        if kind == "ReplicaSet" and "-" in name:
            return name.rsplit("-", 1)[0], "DEPLOYMENT"
        if kind in ("Deployment", "ReplicaSet", "StatefulSet", "DaemonSet"):
            return name, "DEPLOYMENT"
        if kind == "Job":
            return name, "JOB"
        if kind == "CronJob":
            return name, "CRONJOB"
    return labels.get("app", pod_name), "POD"


def _container_ports(spec: dict[Any, Any]) -> dict[str, int]:
    named = {}
    for i, c in enumerate(as_list(spec.get("containers"), "spec.containers")):
        c = as_map(c, f"spec.containers[{i}]")
        for j, p in enumerate(as_list(c.get("ports"), f"spec.containers[{i}].ports")):
            p = as_map(p, f"spec.containers[{i}].ports[{j}]")
            port = as_port(p.get("containerPort"), f"spec.containers[{i}].ports[{j}].containerPort")
            if p.get("name"):
                named[str(p["name"])] = port
    return named


@dataclass
class _Ctx:
    cluster_id: str
    trust_domain: str
    root: str
    namespaces: dict[str, dict[str, str]]
    services: list[_Svc]
    selector_policies: list[kp.PolicyOut]
    pas: list[kp.PeerAuthn]


def _pod(obj: dict[Any, Any], ctx: _Ctx) -> Any:
    meta, spec = obj["metadata"], as_map(obj.get("spec"), "spec")
    status = as_map(obj.get("status"), "status")
    name, ns = meta["name"], meta["namespace"]
    labels = _labels(meta)
    w = wpb.Workload(
        uid=f"{ctx.cluster_id}//Pod/{ns}/{name}",
        name=name,
        namespace=ns,
        trust_domain=ctx.trust_domain,
        cluster_id=ctx.cluster_id,
    )
    w.service_account = as_str(spec.get("serviceAccountName") or "default", "serviceAccountName")
    w.node = as_str(spec.get("nodeName") or "", "spec.nodeName")
    ips = [as_map(p, "status.podIPs[]").get("ip") for p in as_list(status.get("podIPs"), "podIPs")]
    if not ips and status.get("podIP"):
        ips = [status["podIP"]]
    for i, ip in enumerate(ips):
        w.addresses.append(as_ip(ip, f"status.podIPs[{i}]").packed)
    host_network = spec.get("hostNetwork") is True
    if host_network:
        w.network_mode = wpb.HOST_NETWORK
    pod_mode = labels.get(DATAPLANE_MODE)
    ns_mode = ctx.namespaces.get(ns, {}).get(DATAPLANE_MODE)
    enrolled = pod_mode != "none" and "ambient" in (pod_mode, ns_mode) and not host_network
    w.tunnel_protocol = wpb.HBONE if enrolled else wpb.NONE
    w.canonical_name = (
        labels.get("service.istio.io/canonical-name")
        or labels.get("app.kubernetes.io/name")
        or labels.get("app")
        or ""
    )
    w.canonical_revision = (
        labels.get("service.istio.io/canonical-revision")
        or labels.get("app.kubernetes.io/version")
        or labels.get("version")
        or "latest"
    )
    wname, wtype = _owner(meta, labels, name)
    w.workload_name = wname
    w.canonical_name = w.canonical_name or wname
    w.workload_type = wpb.WorkloadType.Value(wtype)
    ready = True
    for c in as_list(status.get("conditions"), "status.conditions"):
        c = as_map(c, "status.conditions[]")
        if c.get("type") == "Ready" and str(c.get("status")) == "False":
            ready = False
    if status.get("phase") in ("Succeeded", "Failed") or meta.get("deletionTimestamp"):
        ready = False
    w.status = wpb.HEALTHY if ready else wpb.UNHEALTHY
    named = _container_ports(spec)
    for svc in ctx.services:
        if svc.proto.namespace != ns or not svc.selector or not _selects(svc.selector, labels):
            continue
        plist = w.services[svc.key]
        for sport, target in svc.ports:
            tnum = named.get(target) if isinstance(target, str) else target
            if tnum:
                plist.ports.add(service_port=sport, target_port=tnum)
    keys = {
        p.key
        for p in ctx.selector_policies
        if p.proto.namespace in (ns, ctx.root) and _selects(p.selector or {}, labels)
    }
    mesh, ns_pa, wl_pa = kp.pick_peer_authentications(ctx.pas, ctx.root, ns, labels)
    keys.update(kp.effective_pa_keys(ctx.root, mesh, ns_pa, wl_pa))
    w.authorization_policies.extend(sorted(keys))
    return w


def _objects(source: str | Iterable[Any], res: TranslationResult) -> list[Any]:
    if isinstance(source, str):
        docs, err = load_yaml_documents(source)
        if err:
            res.errors.append(f"manifests: {err}")
    else:
        docs = list(source)
    out: list[Any] = []
    for d in docs:
        if isinstance(d, dict) and d.get("kind") == "List" and isinstance(d.get("items"), list):
            out.extend(d["items"])
        elif d is not None:
            out.append(d)
    return out


def _describe(obj: Any, i: int) -> str:
    if isinstance(obj, dict):
        meta: dict[Any, Any] = obj["metadata"] if isinstance(obj.get("metadata"), dict) else {}
        ns, name = meta.get("namespace", "default"), meta.get("name", f"#{i}")
        return f"{obj.get('kind', '(no kind)')} {ns}/{name}"
    return f"object #{i}"


def _normalise(obj: Any) -> dict[Any, Any]:
    """Check the envelope and fill metadata.namespace; raises FieldError."""
    if not isinstance(obj, dict):
        raise FieldError(f"{short(obj)} is not a mapping")
    kind = obj.get("kind")
    if not isinstance(kind, str) or not kind:
        raise FieldError("kind is missing")
    meta = as_map(obj.get("metadata"), "metadata")
    if not isinstance(meta.get("name"), str) or not meta["name"]:
        raise FieldError("metadata.name is missing")
    ns = meta.get("namespace")
    if kind in _CLUSTER_SCOPED:
        ns = ""
    elif ns is None:
        ns = "default"
    elif not isinstance(ns, str) or not ns:
        raise FieldError(f"metadata.namespace {short(ns)} is not a string")
    return {**obj, "metadata": {**meta, "namespace": ns}}


def translate_manifests(
    source: str | Iterable[Any],
    *,
    cluster_id: str = "Kubernetes",
    trust_domain: str = "cluster.local",
    cluster_domain: str = "cluster.local",
    root_namespace: str = "istio-system",
) -> TranslationResult:
    """Kubernetes objects -> ``TranslationResult(resources=[(key, proto)], warnings, errors)``."""
    res = TranslationResult()
    by_kind: dict[str, list[dict[Any, Any]]] = {k: [] for k in _KINDS}
    for i, raw in enumerate(_objects(source, res)):
        try:
            obj = _normalise(raw)
        except (FieldError, TypeError) as e:
            res.errors.append(f"{_describe(raw, i)}: {e}")
            continue
        if obj["kind"] not in _KINDS:
            res.warnings.append(f"{_describe(obj, i)}: kind {obj['kind']} is ignored")
            continue
        by_kind[obj["kind"]].append(obj)

    out: dict[str, Any] = {}

    def attempt(obj: dict[Any, Any], fn: Any, *args: Any) -> Any:
        try:
            return fn(obj, *args)
        except (FieldError, ModelError, ValueError, TypeError, KeyError) as e:
            res.errors.append(f"{_describe(obj, 0)}: {e}")
            return None

    namespaces: dict[str, dict[str, str]] = {}
    for obj in by_kind["Namespace"]:
        labels = attempt(obj, lambda o: _labels(o["metadata"]))
        if labels is not None:
            namespaces[obj["metadata"]["name"]] = labels

    selector_policies: list[kp.PolicyOut] = []
    for obj in by_kind["AuthorizationPolicy"]:
        got = attempt(obj, kp.authorization_policy, root_namespace)
        if got is None:
            continue
        pol, warns = got
        res.warnings.extend(warns)
        if pol is not None:
            out[pol.key] = pol.proto
            if pol.selector is not None:
                selector_policies.append(pol)

    pas: list[kp.PeerAuthn] = []
    for i, obj in enumerate(by_kind["PeerAuthentication"]):
        pa = attempt(obj, kp.parse_peer_authentication, i)
        if pa is not None:
            pas.append(pa)
    if pas:
        static = kp.static_strict_policy(root_namespace)
        out[static.key] = static.proto
    for pa in pas:
        mesh, ns_pa, _ = kp.pick_peer_authentications(pas, root_namespace, pa.namespace, {})
        conv = kp.convert_peer_authentication(root_namespace, pa, ns_pa, mesh)
        if conv is not None:
            out[conv.key] = conv.proto

    services: list[_Svc] = []
    for obj in by_kind["Service"]:
        svc = attempt(obj, _service, cluster_domain)
        if svc is not None:
            services.append(svc)
            out[svc.key] = wpb.Address(service=svc.proto)

    ctx = _Ctx(
        cluster_id, trust_domain, root_namespace, namespaces, services, selector_policies, pas
    )
    for obj in by_kind["Pod"]:
        w = attempt(obj, _pod, ctx)
        if w is not None:
            out[w.uid] = wpb.Address(workload=w)

    for key in sorted(out):
        msg = out[key]
        try:
            from_proto(msg)
        except ModelError as e:
            res.errors.append(f"{key}: {e}")
            continue
        res.resources.append((key, msg))
    return res
