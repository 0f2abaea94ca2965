"""Small pure builders shared by the install renderers (labels, metadata, env, volumes).

Invariants: every object we render carries ``MANAGED_BY`` (uninstall finds exactly these);
pod templates carry ``istio.io/dataplane-mode: none`` (mesh infrastructure is never
captured) and ``sidecar.istio.io/inject: "false"``.  Builders return fresh dicts.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ambient import __version__

Obj = dict[str, Any]

MANAGED_BY_KEY = "app.kubernetes.io/managed-by"
MANAGED_BY = "ambientctl"
PART_OF = "ambient"
CONTROLPLANE = "ambient-controlplane"
ZTUNNEL = "ztunnel"
CNI = "ambient-cni"
CNI_CONFIGMAP = "ambient-cni-config"
CACERTS_SECRET = "cacerts"
ROOT_CERT_CONFIGMAP = "istio-ca-root-cert"
# The control plane's serving certificate has istiod's DNS SAN (controlplane/server.py);
# clients dial the ambient-controlplane Service and verify this name instead.
CONTROLPLANE_TLS_NAME = "istiod.istio-system.svc"
ZDS_DIR = "/var/run/ztunnel"
CNI_RUN_DIR = "/var/run/ambient-cni"
BPF_PIN_DIR = "/sys/fs/bpf/ambient"
TOKEN_DIR = "/var/run/secrets/tokens"
ROOT_CERT_DIR = "/var/run/secrets/istio"


def labels(component: str) -> dict[str, str]:
    """Labels on every object of ``component`` (selectors use only ``app``)."""
    return {"app": component, "app.kubernetes.io/name": component,
            "app.kubernetes.io/part-of": PART_OF, "app.kubernetes.io/version": __version__,
            MANAGED_BY_KEY: MANAGED_BY}


def meta(name: str, component: str, namespace: str | None = None,
         **extra_labels: str) -> Obj:
    m: Obj = {"name": name, "labels": {**labels(component), **extra_labels}}
    if namespace is not None:
        m["namespace"] = namespace
    return m


def pod_labels(component: str) -> dict[str, str]:
    return {**labels(component), "istio.io/dataplane-mode": "none",
            "sidecar.istio.io/inject": "false"}


def env(name: str, value: str) -> Obj:
    return {"name": name, "value": value}


def field_env(name: str, path: str) -> Obj:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def downward_env() -> list[Obj]:
    """NODE_NAME, POD_NAME, POD_NAMESPACE, INSTANCE_IP, SERVICE_ACCOUNT from the pod."""
    return [field_env("NODE_NAME", "spec.nodeName"), field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
            field_env("INSTANCE_IP", "status.podIP"),
            field_env("SERVICE_ACCOUNT", "spec.serviceAccountName")]


def host_path(name: str, path: str, type_: str = "DirectoryOrCreate") -> Obj:
    return {"name": name, "hostPath": {"path": path, "type": type_}}


def mount(name: str, path: str, read_only: bool = False, propagation: str | None = None) -> Obj:
    m: Obj = {"name": name, "mountPath": path}
    if read_only:
        m["readOnly"] = True
    if propagation:
        m["mountPropagation"] = propagation
    return m


def controlplane_address(namespace: str) -> str:
    return f"https://{CONTROLPLANE}.{namespace}.svc:15012"


def mesh_client_env(namespace: str, trust_domain: str, cluster_id: str,
                    log_level: str) -> list[Obj]:
    """How a mesh proxy (ztunnel, waypoint) reaches the control plane's xDS and CA."""
    addr = controlplane_address(namespace)
    root = f"{ROOT_CERT_DIR}/root-cert.pem"
    return [env("XDS_ADDRESS", addr), env("CA_ADDRESS", addr),
            env("XDS_ROOT_CA", root), env("CA_ROOT_CA", root),
            env("ALT_XDS_HOSTNAME", CONTROLPLANE_TLS_NAME),
            env("ALT_CA_HOSTNAME", CONTROLPLANE_TLS_NAME),
            env("AUTH_TOKEN", f"{TOKEN_DIR}/istio-token"),
            env("TRUST_DOMAIN", trust_domain), env("CLUSTER_ID", cluster_id),
            env("ROOT_NAMESPACE", namespace), env("RUST_LOG", log_level)]


def mesh_client_volumes() -> list[Obj]:
    """The mesh root (ConfigMap the control plane publishes) and an ``istio-ca`` token."""
    return [
        {"name": "istiod-ca-cert", "configMap": {"name": ROOT_CERT_CONFIGMAP}},
        {"name": "istio-token", "projected": {"sources": [{"serviceAccountToken": {
            "audience": "istio-ca", "expirationSeconds": 43200, "path": "istio-token"}}]}},
    ]


def mesh_client_mounts() -> list[Obj]:
    return [mount("istiod-ca-cert", ROOT_CERT_DIR, read_only=True),
            mount("istio-token", TOKEN_DIR, read_only=True)]


def checksum(obj: Any) -> str:
    """A stable digest of ``obj`` (pod-template annotation: config changes roll the pods)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
