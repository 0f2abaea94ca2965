"""``ambientctl install`` / ``uninstall``: apply rendered objects with the ``kubernetes`` client.

Role: the thin I/O edge over the pure renderer.  Decisions are pure functions
(:func:`decide`, :func:`is_subset`, :func:`rollout_status`) and table-tested; the
:class:`Kube` wrapper only moves JSON over the client's REST transport (so it works with any
kind, including CRDs and Gateway API objects, without discovery).

Invariants:
- Idempotent: an object whose live state already contains every field we render is not
  written (a second install makes no request that changes anything); anything else is
  created, or merge-patched back to what we render (drift repair).
- Ownership: everything we create carries ``app.kubernetes.io/managed-by: ambientctl``.  A
  same-named object without that label is never adopted: a Namespace or CRD that existed is
  used as is (and survives uninstall); any other kind is an error that says what to do.
- Uninstall deletes exactly the objects carrying our label (plus the ``istio-ca-root-cert``
  ConfigMaps our control plane published), in reverse apply order, after a node clean-up
  pass that removes the CNI chaining and pod captures from every node.
- ``dry_run`` sends no write at all; it reports what would happen.
"""

from __future__ import annotations

import base64
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ambient.install.common import (
    CACERTS_SECRET,
    CONTROLPLANE,
    MANAGED_BY,
    MANAGED_BY_KEY,
    ROOT_CERT_CONFIGMAP,
    Obj,
    meta,
)
from ambient.install.values import Values

CLUSTER_SCOPED = frozenset({"Namespace", "ClusterRole", "ClusterRoleBinding",
                            "CustomResourceDefinition", "GatewayClass"})
SHARED_KINDS = frozenset({"Namespace", "CustomResourceDefinition"})  # used, never adopted
# (apiVersion, kind, plural) of everything install may create; uninstall walks it backwards.
MANAGED_KINDS: tuple[tuple[str, str, str], ...] = (
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition", "customresourcedefinitions"),
    ("v1", "Namespace", "namespaces"),
    ("v1", "ServiceAccount", "serviceaccounts"),
    ("rbac.authorization.k8s.io/v1", "ClusterRole", "clusterroles"),
    ("rbac.authorization.k8s.io/v1", "Role", "roles"),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", "clusterrolebindings"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings"),
    ("v1", "Secret", "secrets"),
    ("v1", "ConfigMap", "configmaps"),
    ("v1", "Service", "services"),
    ("apps/v1", "Deployment", "deployments"),
    ("apps/v1", "DaemonSet", "daemonsets"),
    ("gateway.networking.k8s.io/v1", "Gateway", "gateways"),
    ("gateway.networking.k8s.io/v1", "GatewayClass", "gatewayclasses"),
)
_PLURAL = {kind: plural for _, kind, plural in MANAGED_KINDS}


class InstallError(Exception):
    """The install cannot go on; the message says what is wrong and what to do."""


# ------------------------------------------------------------------ pure decisions


def is_subset(want: Any, live: Any) -> bool:
    """Whether ``live`` holds everything in ``want`` (extra live fields, e.g. defaults, are
    fine; lists must have the same length and match item by item)."""
    if isinstance(want, dict):
        return isinstance(live, dict) and all(
            k in live and is_subset(v, live[k]) for k, v in want.items())
    if isinstance(want, list):
        return (isinstance(live, list) and len(want) == len(live)
                and all(is_subset(w, x) for w, x in zip(want, live, strict=True)))
    if isinstance(want, (int, float)) and not isinstance(want, bool) and isinstance(live, str):
        return str(want) == live  # e.g. quantities and ports the server normalises
    return bool(want == live)


def _ours(obj: Obj | None) -> bool:
    return bool(obj) and ((obj or {}).get("metadata", {}).get("labels") or {}).get(
        MANAGED_BY_KEY) == MANAGED_BY


def decide(want: Obj, live: Obj | None) -> str:
    """``create`` | ``patch`` | ``unchanged`` | ``foreign`` (exists, not ours, shared kind:
    leave it) | ``conflict`` (exists, not ours)."""
    if live is None:
        return "create"
    if not _ours(live):
        return "foreign" if want["kind"] in SHARED_KINDS else "conflict"
    body = {k: v for k, v in want.items() if k not in ("apiVersion", "kind")}
    return "unchanged" if is_subset(body, live) else "patch"


def rollout_status(obj: Obj) -> tuple[bool, str]:
    """(done, what we wait for) for a Deployment or DaemonSet, from its live status."""
    spec, st = obj.get("spec") or {}, obj.get("status") or {}
    gen = (obj.get("metadata") or {}).get("generation", 0)
    name = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
    if st.get("observedGeneration", 0) < gen:
        return False, f"{name}: the controller has not seen the latest spec yet"
    if obj.get("kind") == "Deployment":
        want = spec.get("replicas", 1)
        upd, avail = st.get("updatedReplicas", 0), st.get("availableReplicas", 0)
        if upd < want or avail < want:
            return False, f"{name}: {avail}/{want} available, {upd}/{want} updated"
        return True, f"{name}: {avail}/{want} available"
    want = st.get("desiredNumberScheduled")
    if want is None:
        return False, f"{name}: not scheduled yet"
    upd, avail = st.get("updatedNumberScheduled", 0), st.get("numberAvailable", 0)
    if upd < want or avail < want:
        return False, f"{name}: {avail}/{want} nodes available, {upd}/{want} updated"
    return True, f"{name}: {avail}/{want} nodes available"


def object_path(obj_or_kind: Obj | str, name: str | None = None,
                namespace: str | None = None, api_version: str | None = None,
                collection: bool = False) -> str:
    """The REST path of an object (or its collection)."""
    if isinstance(obj_or_kind, dict):
        kind, api_version = obj_or_kind["kind"], obj_or_kind["apiVersion"]
        name = obj_or_kind["metadata"]["name"]
        namespace = obj_or_kind["metadata"].get("namespace")
    else:
        kind = obj_or_kind
    if kind not in _PLURAL or api_version is None:
        raise InstallError(f"don't know how to apply kind {kind}")
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    ns = "" if kind in CLUSTER_SCOPED or not namespace else f"/namespaces/{namespace}"
    path = f"{base}{ns}/{_PLURAL[kind]}"
    return path if collection else f"{path}/{name}"


# ------------------------------------------------------------------ I/O edge


class Kube:
    """JSON over the ``kubernetes`` client's transport (auth, TLS, proxies as configured)."""

    def __init__(self, api_client: Any) -> None:
        self.api = api_client
        self.writes = 0

    def request(self, method: str, path: str, body: Any = None,
                content_type: str = "application/json",
                query: dict[str, str] | None = None) -> tuple[int, Obj]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        m, url, hdrs, data, _ = self.api.param_serialize(
            method=method, resource_path=path, header_params=headers, body=body,
            query_params=list((query or {}).items()) or None, auth_settings=["BearerToken"])
        resp = self.api.call_api(m, url, header_params=hdrs, body=data)
        resp.read()
        try:
            out = json.loads(resp.data or b"{}")
        except ValueError:
            out = {"message": (resp.data or b"")[:200].decode(errors="replace")}
        if method != "GET":
            self.writes += 1
        return resp.status, out

    def get(self, path: str) -> Obj | None:
        code, obj = self.request("GET", path)
        if code == 404:
            return None
        _check(code, obj, f"GET {path}")
        return obj

    def list(self, path: str, selector: str) -> list[Obj]:
        code, obj = self.request("GET", path, query={"labelSelector": selector})
        if code == 404:
            return []  # the kind is not served (e.g. no Gateway API CRDs): nothing of ours
        _check(code, obj, f"list {path}")
        return list(obj.get("items") or [])


def _check(code: int, obj: Obj, what: str) -> None:
    if code == 403:
        raise InstallError(f"{what}: forbidden ({obj.get('message')}); ambientctl needs "
                           "cluster-admin rights (install creates ClusterRoles and CRDs)")
    if code >= 400:
        raise InstallError(f"{what}: {code} {obj.get('reason', '')}: {obj.get('message')}")


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    changed: int = 0

    def add(self, line: str, changed: bool = True) -> None:
        self.lines.append(line)
        self.changed += int(changed)


def _name(obj: Obj) -> str:
    m = obj["metadata"]
    return f"{obj['kind']} {m['namespace'] + '/' if m.get('namespace') else ''}{m['name']}"


def apply_objects(kube: Kube, objs: list[Obj], dry_run: bool = False) -> Report:
    """Create or repair every object; see the module invariants."""
    report = Report()
    for want in objs:
        path = object_path(want)
        live = kube.get(path)
        action = decide(want, live)
        label = _name(want)
        if action == "unchanged":
            report.add(f"unchanged {label}", changed=False)
        elif action == "foreign":
            report.add(f"kept {label} (exists, not managed by ambientctl)", changed=False)
        elif action == "conflict":
            raise InstallError(f"{label} exists and was not created by ambientctl (no label "
                               f"{MANAGED_BY_KEY}={MANAGED_BY}); another mesh may be "
                               "installed: remove it, or install into another --set namespace")
        elif dry_run:
            report.add(f"would {action} {label}")
        elif action == "create":
            code, obj = kube.request("POST", object_path(want, collection=True), want)
            _check(code, obj, f"create {label}")
            report.add(f"created {label}")
        else:
            code, obj = kube.request("PATCH", path, want, "application/merge-patch+json")
            _check(code, obj, f"patch {label}")
            report.add(f"repaired {label}")
    return report


def ca_secret(v: Values) -> Obj:
    """A new mesh root in Istio's ``cacerts`` layout, as a Secret (made at install time)."""
    from ambient.ca import CertificateAuthority

    ca = CertificateAuthority.generate(v.trust_domain)
    with tempfile.TemporaryDirectory() as d:
        ca.save_dir(d)
        data = {p.name: base64.b64encode(p.read_bytes()).decode()
                for p in sorted(Path(d).iterdir()) if p.suffix == ".pem"}
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": meta(CACERTS_SECRET, CONTROLPLANE, v.namespace), "data": data}


def ensure_ca_secret(kube: Kube, v: Values, dry_run: bool = False) -> str:
    """Bring your own ``cacerts`` (kept as is) or get a generated root (ours)."""
    path = object_path("Secret", CACERTS_SECRET, v.namespace, "v1")
    live = kube.get(path)
    if live is not None:
        owner = "generated by ambientctl" if _ours(live) else "yours"
        return f"unchanged Secret {v.namespace}/{CACERTS_SECRET} ({owner})"
    if dry_run:
        return f"would create Secret {v.namespace}/{CACERTS_SECRET} (a new mesh root CA)"
    secret = ca_secret(v)
    code, obj = kube.request("POST", object_path(secret, collection=True), secret)
    _check(code, obj, "create the cacerts Secret")
    return f"created Secret {v.namespace}/{CACERTS_SECRET} (a new mesh root CA)"


def wait_rollouts(kube: Kube, objs: list[Obj], timeout_s: float,
                  log: Callable[[str], None] = print, poll_s: float = 2.0) -> bool:
    """Wait until every Deployment and DaemonSet in ``objs`` has rolled out (or timeout)."""
    pending = [o for o in objs if o["kind"] in ("Deployment", "DaemonSet")]
    deadline = time.monotonic() + timeout_s
    last: dict[str, str] = {}
    while pending:
        still = []
        for o in pending:
            live = kube.get(object_path(o)) or o
            done, why = rollout_status(live)
            if last.get(_name(o)) != why:
                log(f"  {why}")
                last[_name(o)] = why
            if not done:
                still.append(o)
        pending = still
        if not pending:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
    return True


def managed_objects(kube: Kube) -> list[Obj]:
    """Every object carrying our label, in apply order (all namespaces)."""
    out: list[Obj] = []
    selector = f"{MANAGED_BY_KEY}={MANAGED_BY}"
    for api_version, kind, _ in MANAGED_KINDS:
        for item in kube.list(object_path(kind, api_version=api_version, collection=True),
                              selector):
            item.setdefault("kind", kind)
            item.setdefault("apiVersion", api_version)
            out.append(item)
    return out


def delete_objects(kube: Kube, objs: list[Obj], dry_run: bool = False) -> Report:
    report = Report()
    for obj in reversed(objs):
        label = _name(obj)
        if dry_run:
            report.add(f"would delete {label}")
            continue
        code, body = kube.request("DELETE", object_path(obj), {
            "kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"})
        if code == 404:
            report.add(f"already gone {label}", changed=False)
            continue
        _check(code, body, f"delete {label}")
        report.add(f"deleted {label}")
    return report


def root_configmaps(kube: Kube) -> list[Obj]:
    """The ``istio-ca-root-cert`` ConfigMaps the control plane published."""
    items = kube.list("/api/v1/configmaps", "istio.io/config=true")
    out = []
    for cm in items:
        if cm.get("metadata", {}).get("name") == ROOT_CERT_CONFIGMAP:
            cm.setdefault("kind", "ConfigMap")
            cm.setdefault("apiVersion", "v1")
            out.append(cm)
    return out
