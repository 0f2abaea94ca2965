"""``enroll`` and ``waypoint`` against the in-process Kubernetes API server with the real
client: objects created, patched idempotently, removed."""

# ruff: noqa: E501

from __future__ import annotations

import pytest
from k8s_apiserver import FakeApiServer

from ambient.ops import objects
from ambient.ops.objects import KubeBackend, ObjectError


def test_enroll_and_waypoint_on_kubernetes() -> None:
    with FakeApiServer() as api:
        api.create({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": "shop", "labels": {"team": "a"}}})
        b = KubeBackend(api.api_client())
        objects.enroll(b, "shop")
        assert api.get("Namespace", "shop")["metadata"]["labels"] == {
            "team": "a", "istio.io/dataplane-mode": "ambient"}
        objects.enroll(b, "shop", on=False)
        assert api.get("Namespace", "shop")["metadata"]["labels"] == {"team": "a"}
        with pytest.raises(ObjectError, match="does not exist"):
            objects.enroll(b, "nope")

        out = objects.waypoint_apply(b, "shop", "waypoint", "workload", enroll_namespace=True)
        assert out == ["waypoint shop/waypoint created (for workload)",
                       "namespace shop labelled istio.io/use-waypoint=waypoint"]
        gw = api.get("Gateway", "waypoint", "shop")
        assert gw["spec"]["gatewayClassName"] == "istio-waypoint"
        assert gw["spec"]["listeners"] == [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]
        rv = gw["metadata"]["resourceVersion"]
        assert objects.waypoint_apply(b, "shop", "waypoint", "workload")[0].endswith("unchanged "
                                                                                    "(for workload)")
        assert api.get("Gateway", "waypoint", "shop")["metadata"]["resourceVersion"] == rv
        assert "configured" in objects.waypoint_apply(b, "shop", "waypoint", "all")[0]
        assert api.get("Gateway", "waypoint", "shop")["metadata"]["labels"] == {
            "istio.io/waypoint-for": "all"}

        ok, why = objects.waypoint_status(b, "shop", "waypoint")
        assert not ok and "no Programmed condition" in why
        api.patch("Gateway", "waypoint", {"status": {"conditions": [
            {"type": "Programmed", "status": "True", "reason": "Programmed", "message": "ok"}]}},
            "shop")
        ok, why = objects.waypoint_status(b, "shop", "waypoint")
        assert ok and "Programmed=True" in why
        assert objects.waypoint_list(b, None) == [("shop", "waypoint", "all", "True")]
        assert objects.waypoint_list(b, "default") == []

        assert objects.waypoint_delete(b, "shop", "waypoint") == "waypoint shop/waypoint deleted"
        assert api.get("Gateway", "waypoint", "shop") is None
        assert "not found" in objects.waypoint_delete(b, "shop", "waypoint")
