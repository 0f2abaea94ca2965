"""``enroll``/``unenroll`` and ``waypoint`` on a local cluster's manifests file, and the
Gateway object they create."""

# ruff: noqa: E501

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ambient.ops import objects
from ambient.ops.objects import LocalBackend, ObjectError

MANIFESTS = """\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {other: keep}}
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint-1, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
status: {conditions: [{type: Ready, status: "True"}]}
"""


@pytest.fixture
def backend(tmp_path: Path) -> LocalBackend:
    (tmp_path / "c1").mkdir()
    (tmp_path / "c1" / "manifests.yaml").write_text(MANIFESTS)
    return LocalBackend.for_cluster(tmp_path, "c1")


def _docs(b: LocalBackend) -> list[dict]:
    return [d for d in yaml.safe_load_all(b.path.read_text()) if d]


def _ns_labels(b: LocalBackend) -> dict:
    return next(d for d in _docs(b) if d["kind"] == "Namespace")["metadata"]["labels"]


@pytest.mark.parametrize(("for_", "ok"), [("service", True), ("workload", True), ("all", True),
                                          ("none", True), ("pods", False)])
def test_waypoint_gateway(for_: str, ok: bool) -> None:
    if not ok:
        with pytest.raises(ObjectError, match="--for"):
            objects.waypoint_gateway("shop", "wp", for_)
        return
    gw = objects.waypoint_gateway("shop", "wp", for_)
    assert gw["apiVersion"] == "gateway.networking.k8s.io/v1" and gw["kind"] == "Gateway"
    assert gw["metadata"] == {"name": "wp", "namespace": "shop",
                              "labels": {"istio.io/waypoint-for": for_}}
    assert gw["spec"] == {"gatewayClassName": "istio-waypoint",
                          "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}


def test_enroll_and_unenroll_keep_other_labels(backend: LocalBackend) -> None:
    objects.enroll(backend, "shop")
    assert _ns_labels(backend) == {"other": "keep", "istio.io/dataplane-mode": "ambient"}
    objects.enroll(backend, "shop", on=False)
    assert _ns_labels(backend) == {"other": "keep"}
    with pytest.raises(ObjectError, match="no Namespace 'nope'"):
        objects.enroll(backend, "nope")


def test_waypoint_lifecycle(backend: LocalBackend) -> None:
    out = objects.waypoint_apply(backend, "shop", "waypoint", "service", enroll_namespace=True)
    assert out[0] == "waypoint shop/waypoint created (for service)"
    assert _ns_labels(backend)["istio.io/use-waypoint"] == "waypoint"
    assert objects.waypoint_apply(backend, "shop")[0].endswith("unchanged (for service)")
    assert objects.waypoint_apply(backend, "shop", for_="all")[0].endswith("configured (for all)")
    assert [d for d in _docs(backend) if d["kind"] == "Gateway"][0]["metadata"]["labels"] == {
        "istio.io/waypoint-for": "all"}
    assert objects.waypoint_list(backend, None) == [("shop", "waypoint", "all", "Unknown")]
    assert objects.waypoint_list(backend, "other") == []
    ok, why = objects.waypoint_status(backend, "shop", "waypoint")
    assert ok and "1/1 waypoint pods ready (waypoint-1)" in why
    objects.waypoint_apply(backend, "shop", "second")
    ok, why = objects.waypoint_status(backend, "shop", "second")
    assert not ok and "no waypoint proxy pod" in why
    assert objects.waypoint_delete(backend, "shop", "second") == "waypoint shop/second deleted"
    assert "not found" in objects.waypoint_delete(backend, "shop", "second")
    with pytest.raises(ObjectError, match="waypoint apply -n shop --name second"):
        objects.waypoint_status(backend, "shop", "second")


@pytest.mark.parametrize(("gw", "ready", "words"), [
    ({"metadata": {"name": "w"}}, False, "no Programmed condition"),
    ({"status": {"conditions": [{"type": "Programmed", "status": "True", "reason": "Programmed"}]}}, True, "Programmed=True"),
    ({"status": {"conditions": [{"type": "Programmed", "status": "False", "reason": "Invalid", "message": "bad listener"}]}}, False, "bad listener"),
])
def test_gateway_status_from_conditions(gw: dict, ready: bool, words: str) -> None:
    ok, why = objects.gateway_status(gw)
    assert ok is ready and words in why


def test_missing_local_cluster(tmp_path: Path) -> None:
    with pytest.raises(ObjectError, match="demo --keep"):
        LocalBackend.for_cluster(tmp_path, "nope")
