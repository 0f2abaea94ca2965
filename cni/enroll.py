"""Enrollment: which pods the node agent captures, decided by a pure function.

Role: one table-tested place for Istio's ambient enrollment rules, so the CNI ADD path, the
late (re-)enrollment on label changes and the reconciliation after an agent restart all
decide the same way.

Rules, in order (the first that applies wins):

1. A pod in a terminal phase (Succeeded, Failed) is not captured.
2. A pod in an excluded namespace (``kube-system``, ``istio-system`` by default) is not.
3. A host-network pod is not (it shares the node's netns: capturing it would capture the
   node).
4. A pod with the label ``istio.io/dataplane-mode=none`` is not (the opt-out).
5. A pod that already has a sidecar (annotation ``sidecar.istio.io/status``) is not.
6. A pod with ``istio.io/dataplane-mode=ambient`` is captured (pod-level opt-in).
7. A pod whose namespace has ``istio.io/dataplane-mode=ambient`` is captured.
8. Otherwise not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

DATAPLANE_MODE = "istio.io/dataplane-mode"
AMBIENT = "ambient"
NONE = "none"
SIDECAR_STATUS = "sidecar.istio.io/status"
REDIRECTION_ANNOTATION = "ambient.istio.io/redirection"
BYPASS_INBOUND = "ambient.istio.io/bypass-inbound-capture"
DEFAULT_EXCLUDED = ("istio-system", "kube-system")
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True)
class PodMeta:
    """What the agent knows about a pod from the cluster (Kubernetes or manifests)."""

    name: str
    namespace: str
    uid: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    host_network: bool = False
    phase: str = "Running"
    node: str = ""
    service_account: str = "default"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Decision:
    capture: bool
    reason: str


def decide(pod: PodMeta, namespace_labels: Mapping[str, str],
           excluded: frozenset[str] | tuple[str, ...] = DEFAULT_EXCLUDED) -> Decision:
    """Should ``pod`` be captured?  See the module docstring for the rules."""
    if pod.phase in TERMINAL_PHASES:
        return Decision(False, f"pod is {pod.phase}")
    if pod.namespace in excluded:
        return Decision(False, f"namespace {pod.namespace} is excluded")
    if pod.host_network:
        return Decision(False, "pod uses the host network")
    mode = pod.labels.get(DATAPLANE_MODE)
    if mode == NONE:
        return Decision(False, f"pod label {DATAPLANE_MODE}={NONE}")
    if SIDECAR_STATUS in pod.annotations:
        return Decision(False, "pod has a sidecar")
    if mode == AMBIENT:
        return Decision(True, f"pod label {DATAPLANE_MODE}={AMBIENT}")
    if namespace_labels.get(DATAPLANE_MODE) == AMBIENT:
        return Decision(True, f"namespace label {DATAPLANE_MODE}={AMBIENT}")
    return Decision(False, "neither the pod nor its namespace is enrolled")


def pod_meta_from_object(obj: Mapping[str, object]) -> PodMeta:
    """A :class:`PodMeta` from a Kubernetes Pod object dict (missing fields get defaults)."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    assert isinstance(meta, Mapping) and isinstance(spec, Mapping) and isinstance(status, Mapping)
    return PodMeta(
        name=str(meta.get("name", "")),
        namespace=str(meta.get("namespace") or "default"),
        uid=str(meta.get("uid") or ""),
        labels={str(k): str(v) for k, v in (meta.get("labels") or {}).items()},
        annotations={str(k): str(v) for k, v in (meta.get("annotations") or {}).items()},
        host_network=bool(spec.get("hostNetwork", False)),
        phase=str(status.get("phase") or "Running"),
        node=str(spec.get("nodeName") or ""),
        service_account=str(spec.get("serviceAccountName") or "default"),
    )
