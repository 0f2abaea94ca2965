"""The waypoint template: what runs for one ``Gateway`` of class ``istio-waypoint``.

Pure: ``render_waypoint(name, namespace, values)`` returns the Gateway itself plus the
ServiceAccount (and its ClusterRoleBinding), Deployment and Service that istiod's gateway
controller would create for it (ambient has no gateway controller: ``ambientctl waypoint
apply`` or ``kubectl apply`` of this output creates them).

Invariants (what the control plane's translation relies on, ``ambient/config``):
- The Service has the Gateway's name, port 15008 (``mesh``), and the label
  ``gateway.istio.io/managed: istio.io-mesh-controller``; without a Gateway status address,
  the control plane resolves the waypoint through that Service.
- Waypoint pods carry ``gateway.networking.k8s.io/gateway-name: <name>`` (so they are known
  as the waypoint and never sent to a waypoint themselves) and ``istio.io/dataplane-mode:
  none``; their identity is ``spiffe://<td>/ns/<namespace>/sa/<name>``.
"""

from __future__ import annotations

from ambient.install.common import (
    Obj,
    downward_env,
    env,
    mesh_client_env,
    mesh_client_mounts,
    mesh_client_volumes,
    meta,
    pod_labels,
)
from ambient.install.values import Values

GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
MANAGED_LABEL = "gateway.istio.io/managed"
MANAGED_VALUE = "istio.io-mesh-controller"
WAYPOINT_FOR = ("service", "workload", "all", "none")


def render_waypoint(name: str = "waypoint", namespace: str = "default",
                    values: Values | None = None, waypoint_for: str = "service") -> list[Obj]:
    """Gateway, ServiceAccount, its ClusterRoleBinding (to ClusterRole ambient-waypoint:
    list/watch of the mesh objects), Deployment and Service of one waypoint."""
    v = values or Values()
    if waypoint_for not in WAYPOINT_FOR:
        raise ValueError(f"waypoint-for {waypoint_for!r}: choose one of "
                         f"{', '.join(WAYPOINT_FOR)}")
    component = "waypoint"
    gateway = {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": meta(name, component, namespace,
                         **{"istio.io/waypoint-for": waypoint_for}),
        "spec": {"gatewayClassName": "istio-waypoint",
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
    }
    sa = {"apiVersion": "v1", "kind": "ServiceAccount",
          "metadata": meta(name, component, namespace)}
    pod_lbl = {**pod_labels(component), GATEWAY_NAME_LABEL: name}
    container = {
        "name": "istio-proxy",
        "image": v.image,
        "imagePullPolicy": v.pull_policy,
        "command": ["python", "-m", "waypoint"],
        "env": [env("WAYPOINT_NAME", name),
                *mesh_client_env(v.namespace, v.trust_domain, v.cluster_id, v.log_level),
                *downward_env()],
        "ports": [{"name": "mesh", "containerPort": 15008, "protocol": "TCP"},
                  {"name": "http-envoy-prom", "containerPort": 15020, "protocol": "TCP"},
                  {"name": "status-port", "containerPort": 15021, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": 15021},
                           "periodSeconds": 5},
        "resources": v.resources.waypoint.to_k8s(),
        "securityContext": {"allowPrivilegeEscalation": False, "privileged": False,
                            "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                            "runAsUser": 1337, "runAsGroup": 1337,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [*mesh_client_mounts(), {"name": "tmp", "mountPath": "/tmp"}],
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": meta(name, component, namespace, **{GATEWAY_NAME_LABEL: name}),
        "spec": {
            "selector": {"matchLabels": {GATEWAY_NAME_LABEL: name}},
            "template": {
                "metadata": {"labels": pod_lbl,
                             "annotations": {"prometheus.io/scrape": "true",
                                             "prometheus.io/port": "15020",
                                             "prometheus.io/path": "/stats/prometheus"}},
                "spec": {
                    "serviceAccountName": name,
                    "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                    "terminationGracePeriodSeconds": 30,
                    "containers": [container],
                    "volumes": [*mesh_client_volumes(), {"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": meta(name, component, namespace,
                         **{MANAGED_LABEL: MANAGED_VALUE, GATEWAY_NAME_LABEL: name}),
        "spec": {
            "selector": {GATEWAY_NAME_LABEL: name},
            "ports": [{"name": "mesh", "port": 15008, "targetPort": 15008, "protocol": "TCP"},
                      {"name": "status-port", "port": 15021, "targetPort": 15021,
                       "protocol": "TCP"}],
        },
    }
    # the waypoint watches routes and L7 policies cluster-wide (waypoint/main.py)
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": meta(f"ambient-waypoint-{namespace}-{name}", component),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": "ambient-waypoint"},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
    }
    return [gateway, sa, binding, deployment, service]
