"""The pure install renderer: ``render(values) -> list of Kubernetes objects``.

Role: the one place that says what an ambient installation is.  ``ambientctl manifest
generate`` prints it, ``ambientctl install`` applies it, ``daemonset/*.yaml`` is its output
for the default values (a unit test keeps them equal).

Invariants:
- Deterministic: the same values give byte-identical YAML (no timestamps, no random data;
  the CA Secret is made by ``ambientctl install`` at apply time, never rendered).
- Ordered for apply: CRDs, Namespace, ServiceAccounts, RBAC, ConfigMaps, Services,
  workloads, GatewayClass; uninstall walks the list backwards.
- Least privilege: no wildcard verbs, resources or API groups; ztunnel gets no Kubernetes
  API access at all; each rule lists only what the component's code calls.
"""

from __future__ import annotations

from typing import Any

import yaml

from ambient.install.common import (
    CACERTS_SECRET,
    CNI,
    CONTROLPLANE,
    ZTUNNEL,
    Obj,
    meta,
    pod_labels,
)
from ambient.install.crds import crds
from ambient.install.nodes import cni_configmap, cni_daemonset, ztunnel_daemonset
from ambient.install.values import Values

__all__ = ["render", "render_parts", "to_yaml", "rbac_rules"]

WAYPOINT_CLASS = "istio-waypoint"
WAYPOINT_ROLE = "ambient-waypoint"
WAYPOINT_CONTROLLER = "istio.io/mesh-controller"


def _rule(groups: list[str], resources: list[str], verbs: list[str]) -> Obj:
    return {"apiGroups": groups, "resources": resources, "verbs": verbs}


def watch_rules() -> list[Obj]:
    """list/watch on every kind the object source reads (``controlplane.objects.KINDS``,
    resolved through ``controlplane.k8s_source.KIND_APIS``), one rule per API group."""
    from controlplane.k8s_source import KIND_APIS
    from controlplane.objects import KINDS

    groups: dict[str, list[str]] = {}
    for kind in KINDS:
        api = KIND_APIS.get(kind)
        if api is not None:
            groups.setdefault(api.api_version.rpartition("/")[0], []).append(api.plural)
    return [_rule([g], plurals, ["list", "watch"]) for g, plurals in groups.items()]


def rbac_rules() -> dict[str, list[Obj]]:
    """Cluster-wide rules per component (ztunnel has none)."""
    return {
        CONTROLPLANE: [
            *watch_rules(),  # the object source (controlplane/k8s_source.py)
            # callers of xDS and the CA prove their ServiceAccount by TokenReview:
            _rule(["authentication.k8s.io"], ["tokenreviews"], ["create"]),
            # the mesh root is published as ConfigMap istio-ca-root-cert in every namespace:
            _rule([""], ["configmaps"], ["get", "create", "patch"]),
        ],
        CNI: [
            # enrollment: pod and namespace labels (list/watch), the redirection annotation
            _rule([""], ["pods"], ["get", "list", "watch", "patch"]),
            _rule([""], ["namespaces"], ["get", "list", "watch"]),
            _rule([""], ["nodes"], ["get"]),
        ],
        # waypoints watch the same objects (routes, L7 policies); bound per waypoint by
        # ambient.install.waypoint
        WAYPOINT_ROLE: watch_rules(),
    }


def _service_accounts(ns: str) -> list[Obj]:
    return [{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(name, name, ns)}
            for name in (CONTROLPLANE, ZTUNNEL, CNI)]


def _rbac(ns: str) -> list[Obj]:
    roles, bindings = [], []
    for name, rules in rbac_rules().items():
        roles.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                      "metadata": meta(name, name), "rules": rules})
        if name == WAYPOINT_ROLE:
            continue  # bound to each waypoint's ServiceAccount by its template
        bindings.append({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": meta(name, name),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
        })
    return roles + bindings


def _controlplane_service(v: Values) -> Obj:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": meta(CONTROLPLANE, CONTROLPLANE, v.namespace),
        "spec": {
            "selector": {"app": CONTROLPLANE},
            "ports": [
                {"name": "grpc-xds", "port": 15010, "targetPort": 15010, "protocol": "TCP",
                 "appProtocol": "grpc"},
                {"name": "https-xds-ca", "port": 15012, "targetPort": 15012,
                 "protocol": "TCP"},
            ],
        },
    }


def _controlplane_deployment(v: Values) -> Obj:
    ns = v.namespace
    args = ["python", "-m", "ambient.cli", "controlplane", "--kubernetes",
            "--xds-plain", "0.0.0.0:15010", "--xds-tls", "0.0.0.0:15012",
            "--ca-dir", "/etc/cacerts", "--trust-domain", v.trust_domain,
            "--cluster-id", v.cluster_id, "--trusted-node-accounts", f"{ns}/{ZTUNNEL}",
            "--root-namespace", ns, "--log-level", v.log_level]
    container = {
        "name": "discovery",
        "image": v.image,
        "imagePullPolicy": v.pull_policy,
        "command": args,
        "ports": [{"name": "grpc-xds", "containerPort": 15010, "protocol": "TCP"},
                  {"name": "https-xds-ca", "containerPort": 15012, "protocol": "TCP"}],
        # the server listens only once the first complete object set is translated
        "readinessProbe": {"tcpSocket": {"port": 15012}, "periodSeconds": 5},
        "resources": v.resources.controlplane.to_k8s(),
        "securityContext": {"allowPrivilegeEscalation": False, "privileged": False,
                            "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                            "runAsUser": 1337, "runAsGroup": 1337,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "cacerts", "mountPath": "/etc/cacerts", "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}],
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": meta(CONTROLPLANE, CONTROLPLANE, ns),
        "spec": {
            "replicas": v.controlplane_replicas,
            "selector": {"matchLabels": {"app": CONTROLPLANE}},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": pod_labels(CONTROLPLANE)},
                "spec": {
                    "serviceAccountName": CONTROLPLANE,
                    "securityContext": {"fsGroup": 1337,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "nodeSelector": {"kubernetes.io/os": "linux"},
                    "containers": [container],
                    "volumes": [
                        # Istio's cacerts layout: ca-cert.pem, ca-key.pem, root-cert.pem,
                        # cert-chain.pem.  `ambientctl install` creates it when absent.
                        {"name": "cacerts", "secret": {"secretName": CACERTS_SECRET,
                                                       "defaultMode": 0o440}},
                        {"name": "tmp", "emptyDir": {}},
                    ],
                },
            },
        },
    }


def _gateway_class() -> Obj:
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
            "metadata": meta(WAYPOINT_CLASS, "waypoint"),
            "spec": {"controllerName": WAYPOINT_CONTROLLER,
                     "description": "ambient waypoints (L7 proxies for a namespace or "
                                    "service); see daemonset/waypoint.yaml"}}


def render_parts(v: Values) -> dict[str, list[Obj]]:
    """The objects grouped as the files of ``daemonset/``: ``crds`` and ``ambient``."""
    ns = v.namespace
    core: list[Obj] = []
    if v.create_namespace:
        core.append({"apiVersion": "v1", "kind": "Namespace",
                     "metadata": meta(ns, "ambient", None,
                                      **{"istio.io/dataplane-mode": "none"})})
    core += _service_accounts(ns)
    core += _rbac(ns)
    core.append(cni_configmap(v))
    core.append(_controlplane_service(v))
    core.append(_controlplane_deployment(v))
    core.append(ztunnel_daemonset(v))
    core.append(cni_daemonset(v))
    if v.gateway_class:
        core.append(_gateway_class())
    labelled = []
    for crd in crds():
        crd["metadata"]["labels"] = meta(crd["metadata"]["name"], "crds")["labels"]
        labelled.append(crd)
    return {"crds": labelled, "ambient": core}


def render(v: Values | None = None) -> list[Obj]:
    """Every object of an installation, in apply order."""
    parts = render_parts(v or Values())
    return parts["crds"] + parts["ambient"]


class _Dumper(yaml.SafeDumper):
    """Block style; no aliases (Kubernetes tools dislike anchors)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_yaml(objs: list[Obj], header: str = "") -> str:
    docs = [yaml.dump(o, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
            for o in objs]
    return header + "---\n".join(docs)
