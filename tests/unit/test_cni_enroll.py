"""The agent's enrollment rules, as a table."""

from __future__ import annotations

import pytest

from cni.enroll import PodMeta, decide, pod_meta_from_object

AMB = {"istio.io/dataplane-mode": "ambient"}
NONE = {"istio.io/dataplane-mode": "none"}


@pytest.mark.parametrize(("pod", "ns_labels", "capture", "why"), [
    (PodMeta("a", "default"), AMB, True, "namespace label"),
    (PodMeta("a", "default"), {}, False, "neither"),
    (PodMeta("a", "default", labels=AMB), {}, True, "pod label"),
    (PodMeta("a", "default", labels=NONE), AMB, False, "=none"),
    (PodMeta("a", "kube-system"), AMB, False, "excluded"),
    (PodMeta("a", "istio-system", labels=AMB), {}, False, "excluded"),
    (PodMeta("a", "default", host_network=True), AMB, False, "host network"),
    (PodMeta("a", "default", phase="Succeeded"), AMB, False, "Succeeded"),
    (PodMeta("a", "default", phase="Failed"), AMB, False, "Failed"),
    (PodMeta("a", "default", phase="Pending"), AMB, True, "namespace label"),
    (PodMeta("a", "default", annotations={"sidecar.istio.io/status": "{}"}), AMB, False,
     "sidecar"),
    (PodMeta("a", "default", labels={"istio.io/dataplane-mode": "bogus"}), AMB, True,
     "namespace label"),
    (PodMeta("a", "default"), {"istio.io/dataplane-mode": "none"}, False, "neither"),
])
def test_decide(pod: PodMeta, ns_labels: dict[str, str], capture: bool, why: str) -> None:
    d = decide(pod, ns_labels)
    assert d.capture is capture
    assert why in d.reason


def test_custom_exclusions() -> None:
    assert decide(PodMeta("a", "infra"), AMB, excluded=("infra",)).capture is False
    assert decide(PodMeta("a", "kube-system"), AMB, excluded=()).capture is True


def test_pod_meta_from_object() -> None:
    m = pod_meta_from_object({
        "metadata": {"name": "p", "namespace": "ns", "uid": "u1", "labels": {"app": "x"},
                     "annotations": {"k": "v"}},
        "spec": {"hostNetwork": True, "nodeName": "n1", "serviceAccountName": "sa"},
        "status": {"phase": "Running"},
    })
    assert (m.name, m.namespace, m.uid, m.node, m.service_account) == ("p", "ns", "u1", "n1", "sa")
    assert m.host_network and m.labels == {"app": "x"} and m.annotations == {"k": "v"}
    assert pod_meta_from_object({"metadata": {"name": "q"}}).namespace == "default"
