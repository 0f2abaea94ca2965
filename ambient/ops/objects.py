"""``ambientctl enroll|unenroll`` and ``ambientctl waypoint apply|list|status|delete``.

Both act on cluster objects through a ``Backend``: ``KubeBackend`` (the ``kubernetes`` client;
Namespaces patched with a JSON merge patch, Gateways as custom objects of
``gateway.networking.k8s.io/v1``) or ``LocalBackend`` (a local cluster's
``<run_root>/<cluster>/manifests.yaml``, rewritten atomically like ``LocalMesh.set_labels``
does; its agents and ztunnels pick the change up).

Pure parts: ``waypoint_gateway`` (the Gateway object istioctl would create: class
``istio-waypoint``, listener ``mesh`` on 15008 ``HBONE``, label ``istio.io/waypoint-for``),
``gateway_row`` and ``gateway_status`` (from conditions or, locally, the waypoint pod).

Invariants: applying twice is applying once (apply merges into an existing Gateway); a label
value ``None`` removes the label; every error says which object and what to do.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

__all__ = [
    "DATAPLANE_MODE",
    "GATEWAY_NAME_LABEL",
    "USE_WAYPOINT",
    "WAYPOINT_CLASS",
    "WAYPOINT_FOR",
    "Backend",
    "KubeBackend",
    "LocalBackend",
    "ObjectError",
    "enroll",
    "gateway_row",
    "gateway_status",
    "waypoint_apply",
    "waypoint_delete",
    "waypoint_gateway",
    "waypoint_list",
    "waypoint_status",
]

DATAPLANE_MODE = "istio.io/dataplane-mode"
USE_WAYPOINT = "istio.io/use-waypoint"
WAYPOINT_FOR = "istio.io/waypoint-for"
WAYPOINT_CLASS = "istio-waypoint"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
GW_GROUP, GW_VERSION, GW_PLURAL = "gateway.networking.k8s.io", "v1", "gateways"
FOR_VALUES = ("service", "workload", "all", "none")


class ObjectError(RuntimeError):
    """A cluster object cannot be read or changed; the message says what to do."""


def waypoint_gateway(namespace: str, name: str = "waypoint", for_: str = "service"
                     ) -> dict[str, Any]:
    """The Gateway of a waypoint, as ``istioctl waypoint apply`` creates it."""
    if for_ not in FOR_VALUES:
        raise ObjectError(f"--for {for_!r}: choose one of {', '.join(FOR_VALUES)}")
    return {
        "apiVersion": f"{GW_GROUP}/{GW_VERSION}",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": namespace, "labels": {WAYPOINT_FOR: for_}},
        "spec": {
            "gatewayClassName": WAYPOINT_CLASS,
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    }


def _conditions(gw: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    conds = ((gw.get("status") or {}).get("conditions")) or []
    return {str(c.get("type")): c for c in conds if isinstance(c, Mapping)}


def gateway_status(gw: Mapping[str, Any], pods: Sequence[Mapping[str, Any]] | None = None
                   ) -> tuple[bool, str]:
    """(ready, why): from the Gateway's ``Programmed`` condition (Kubernetes), or, when
    ``pods`` is given (local cluster), from the waypoint pods' readiness."""
    if pods is not None:
        if not pods:
            return False, ("no waypoint proxy pod runs for it (label "
                           f"{GATEWAY_NAME_LABEL}={(gw.get('metadata') or {}).get('name')})")
        ready = [p for p in pods if any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in ((p.get("status") or {}).get("conditions") or []))]
        names = ", ".join(str((p.get("metadata") or {}).get("name")) for p in pods)
        return (len(ready) == len(pods),
                f"{len(ready)}/{len(pods)} waypoint pods ready ({names})")
    conds = _conditions(gw)
    prog = conds.get("Programmed")
    if prog is None:
        return False, "no Programmed condition yet: is the control plane's gateway " \
                      "controller running?"
    ok = prog.get("status") == "True"
    return ok, f"Programmed={prog.get('status')} {prog.get('reason', '')}: " \
               f"{prog.get('message', '')}".rstrip(": ")


def gateway_row(gw: Mapping[str, Any]) -> tuple[str, str, str, str]:
    meta = gw.get("metadata") or {}
    prog = _conditions(gw).get("Programmed")
    return (str(meta.get("namespace", "")), str(meta.get("name", "")),
            str((meta.get("labels") or {}).get(WAYPOINT_FOR, "service")),
            str(prog.get("status")) if prog else "Unknown")


# ---------------------------------------------------------------------------------------------
# backends


class Backend(Protocol):
    def patch_namespace_labels(self, namespace: str, labels: Mapping[str, str | None]) -> None:
        ...

    def get_gateway(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def list_gateways(self, namespace: str | None) -> list[dict[str, Any]]: ...

    def apply_gateway(self, gw: dict[str, Any]) -> str: ...

    def delete_gateway(self, namespace: str, name: str) -> bool: ...

    def waypoint_pods(self, namespace: str, name: str) -> list[dict[str, Any]] | None: ...


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 merge patch (``None`` deletes)."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, Mapping) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge(out.get(k), v)
    return out


@dataclass
class LocalBackend:
    """A local cluster's manifests file (what ``LocalMesh`` writes and its parts watch)."""

    path: Path
    objects: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def for_cluster(cls, run_root: Path, cluster: str) -> LocalBackend:
        path = run_root / cluster / "manifests.yaml"
        if not path.exists():
            raise ObjectError(f"local cluster {cluster!r} has no {path}; is it running "
                              "(`ambientctl demo --keep`)?")
        return cls(path)

    def _load(self) -> list[dict[str, Any]]:
        try:
            docs = list(yaml.safe_load_all(self.path.read_text(encoding="utf-8")))
        except (OSError, yaml.YAMLError) as e:
            raise ObjectError(f"cannot read {self.path}: {e}") from e
        self.objects = [d for d in docs if isinstance(d, dict)]
        return self.objects

    def _save(self) -> None:
        tmp = self.path.with_suffix(".ops.tmp")
        tmp.write_text(yaml.safe_dump_all(self.objects), encoding="utf-8")
        os.replace(tmp, self.path)

    def _find(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        for o in self._load():
            meta = o.get("metadata") or {}
            if o.get("kind") == kind and meta.get("name") == name and (
                    namespace is None or meta.get("namespace", "default") == namespace):
                return o
        return None

    def patch_namespace_labels(self, namespace: str, labels: Mapping[str, str | None]) -> None:
        ns = self._find("Namespace", None, namespace)
        if ns is None:
            raise ObjectError(f"no Namespace {namespace!r} in {self.path}")
        meta = ns.setdefault("metadata", {})
        meta["labels"] = _merge(meta.get("labels") or {}, labels)
        self._save()

    def get_gateway(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._find("Gateway", namespace, name)

    def list_gateways(self, namespace: str | None) -> list[dict[str, Any]]:
        return [o for o in self._load() if o.get("kind") == "Gateway"
                and (namespace is None or (o.get("metadata") or {}).get("namespace") == namespace)
                and (o.get("spec") or {}).get("gatewayClassName") == WAYPOINT_CLASS]

    def apply_gateway(self, gw: dict[str, Any]) -> str:
        meta = gw["metadata"]
        cur = self._find("Gateway", meta["namespace"], meta["name"])
        if cur is None:
            self.objects.append(copy.deepcopy(gw))
            self._save()
            return "created"
        merged = _merge(cur, gw)
        if merged == cur:
            return "unchanged"
        self.objects[self.objects.index(cur)] = merged
        self._save()
        return "configured"

    def delete_gateway(self, namespace: str, name: str) -> bool:
        cur = self._find("Gateway", namespace, name)
        if cur is None:
            return False
        self.objects.remove(cur)
        self._save()
        return True

    def waypoint_pods(self, namespace: str, name: str) -> list[dict[str, Any]] | None:
        return [o for o in self._load() if o.get("kind") == "Pod"
                and (o.get("metadata") or {}).get("namespace") == namespace
                and ((o.get("metadata") or {}).get("labels") or {}).get(GATEWAY_NAME_LABEL)
                == name]


class KubeBackend:
    """The Kubernetes API through the official client (kubeconfig or in-cluster config)."""

    def __init__(self, api_client: Any = None, *, context: str | None = None) -> None:
        from kubernetes import client, config

        if api_client is None:
            try:
                config.load_kube_config(context=context)
            except Exception:
                try:
                    config.load_incluster_config()
                except Exception as e:
                    raise ObjectError(f"no Kubernetes credentials: {e}; set KUBECONFIG, or use "
                                      "--cluster NAME for a local cluster") from e
            api_client = client.ApiClient()
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self._api_exc = client.exceptions.ApiException

    def _call(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except self._api_exc as e:
            if e.status == 404:
                raise
            hint = " (is the Gateway API CRD installed?)" if "gateway" in what else ""
            raise ObjectError(f"{what}: Kubernetes answered {e.status} {e.reason}{hint}") from e

    def patch_namespace_labels(self, namespace: str, labels: Mapping[str, str | None]) -> None:
        try:
            self._call(f"patch namespace {namespace}", self.core.patch_namespace, namespace,
                       {"metadata": {"labels": dict(labels)}})
        except self._api_exc as e:
            raise ObjectError(f"namespace {namespace!r} does not exist") from e

    def get_gateway(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call(f"get gateway {namespace}/{name}",  # type: ignore[no-any-return]
                              self.custom.get_namespaced_custom_object, GW_GROUP, GW_VERSION,
                              namespace, GW_PLURAL, name)
        except self._api_exc:
            return None

    def list_gateways(self, namespace: str | None) -> list[dict[str, Any]]:
        if namespace is None:
            res = self._call("list gateways", self.custom.list_cluster_custom_object,
                             GW_GROUP, GW_VERSION, GW_PLURAL)
        else:
            res = self._call("list gateways", self.custom.list_namespaced_custom_object,
                             GW_GROUP, GW_VERSION, namespace, GW_PLURAL)
        return [g for g in res.get("items", [])
                if (g.get("spec") or {}).get("gatewayClassName") == WAYPOINT_CLASS]

    def apply_gateway(self, gw: dict[str, Any]) -> str:
        meta = gw["metadata"]
        ns, name = meta["namespace"], meta["name"]
        cur = self.get_gateway(ns, name)
        if cur is None:
            self._call(f"create gateway {ns}/{name}",
                       self.custom.create_namespaced_custom_object, GW_GROUP, GW_VERSION, ns,
                       GW_PLURAL, gw)
            return "created"
        if _merge(cur, gw) == cur:
            return "unchanged"
        self._call(f"patch gateway {ns}/{name}", self.custom.patch_namespaced_custom_object,
                   GW_GROUP, GW_VERSION, ns, GW_PLURAL, name,
                   {"metadata": {"labels": meta.get("labels", {})}, "spec": gw["spec"]})
        return "configured"

    def delete_gateway(self, namespace: str, name: str) -> bool:
        try:
            self._call(f"delete gateway {namespace}/{name}",
                       self.custom.delete_namespaced_custom_object, GW_GROUP, GW_VERSION,
                       namespace, GW_PLURAL, name)
        except self._api_exc:
            return False
        return True

    def waypoint_pods(self, namespace: str, name: str) -> list[dict[str, Any]] | None:
        return None  # on Kubernetes the Gateway's own conditions are authoritative


# ---------------------------------------------------------------------------------------------
# verbs


def enroll(backend: Backend, namespace: str, on: bool = True) -> str:
    backend.patch_namespace_labels(namespace, {DATAPLANE_MODE: "ambient" if on else None})
    if on:
        return f"namespace {namespace} labelled {DATAPLANE_MODE}=ambient: its pods are captured"
    return f"namespace {namespace}: label {DATAPLANE_MODE} removed: its pods leave the mesh"


def waypoint_apply(backend: Backend, namespace: str, name: str = "waypoint",
                   for_: str = "service", enroll_namespace: bool = False) -> list[str]:
    gw = waypoint_gateway(namespace, name, for_)
    out = [f"waypoint {namespace}/{name} {backend.apply_gateway(gw)} (for {for_})"]
    if enroll_namespace:
        backend.patch_namespace_labels(namespace, {USE_WAYPOINT: name})
        out.append(f"namespace {namespace} labelled {USE_WAYPOINT}={name}")
    return out


def waypoint_list(backend: Backend, namespace: str | None) -> list[tuple[str, str, str, str]]:
    return sorted(gateway_row(g) for g in backend.list_gateways(namespace))


def waypoint_status(backend: Backend, namespace: str, name: str) -> tuple[bool, str]:
    gw = backend.get_gateway(namespace, name)
    if gw is None:
        raise ObjectError(f"no waypoint {namespace}/{name}; create it with `ambientctl "
                          f"waypoint apply -n {namespace} --name {name}`")
    return gateway_status(gw, backend.waypoint_pods(namespace, name))


def waypoint_delete(backend: Backend, namespace: str, name: str) -> str:
    if not backend.delete_gateway(namespace, name):
        return f"waypoint {namespace}/{name} not found (nothing to delete)"
    return f"waypoint {namespace}/{name} deleted"
