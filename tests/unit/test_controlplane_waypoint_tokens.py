"""Local mode: the control plane mints a token per waypoint Gateway, and the CA gives its
holder exactly the waypoint's own identity (never another one)."""

# Case tables are kept one case per line for readability.
# ruff: noqa: E501

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import grpc
import pytest

from ambient.identity import SpiffeId
from controlplane.ca_service import Denied, LocalTokenAuthenticator, authorize
from controlplane.main import mint_waypoint_tokens, waypoints_of
from controlplane.objects import ObjectStore, Update

TRUSTED = frozenset({("istio-system", "ztunnel")})


def gateway(name: str, ns: str = "shop", cls: str = "istio-waypoint") -> dict:
    return {"kind": "Gateway", "metadata": {"name": name, "namespace": ns},
            "spec": {"gatewayClassName": cls,
                     "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}


def pod(name: str, ns: str, labels: dict, sa: str | None) -> dict:
    spec = {"nodeName": "node-a"} | ({"serviceAccountName": sa} if sa else {})
    return {"kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": spec}


def store(*objs: dict) -> ObjectStore:
    s = ObjectStore()
    s.apply(Update(upserts={f"{o['kind']}/{o['metadata']['namespace']}/{o['metadata']['name']}": o
                            for o in objs}, resync=True))
    return s


GW_LABEL = "gateway.networking.k8s.io/gateway-name"

# (id, objects, expected (ns, gateway, service account))
CASES = [
    ("service account defaults to the gateway name", [gateway("waypoint")], {("shop", "waypoint", "waypoint")}),
    ("a pod of the gateway names another account", [gateway("waypoint"), pod("wp-0", "shop", {GW_LABEL: "waypoint"}, "custom")], {("shop", "waypoint", "custom")}),
    ("a pod without an account keeps the default", [gateway("waypoint"), pod("wp-0", "shop", {GW_LABEL: "waypoint"}, None)], {("shop", "waypoint", "waypoint")}),
    ("a pod of a same-named gateway elsewhere does not count", [gateway("waypoint"), pod("wp-0", "other", {GW_LABEL: "waypoint"}, "x")], {("shop", "waypoint", "waypoint")}),
    ("other gateway classes are not waypoints", [gateway("ingress", cls="istio")], set()),
    ("several waypoints", [gateway("a"), gateway("b", ns="infra")], {("shop", "a", "a"), ("infra", "b", "b")}),
]  # fmt: skip


@pytest.mark.parametrize("objs,want", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_waypoints_of(objs: list[dict], want: set[tuple[str, str, str]]) -> None:
    assert waypoints_of(store(*objs)) == want


def test_minted_token_gives_the_waypoint_its_own_identity_only(tmp_path: Path) -> None:
    auth = LocalTokenAuthenticator(b"k" * 32)
    mint_waypoint_tokens(auth, tmp_path, {("shop", "waypoint", "waypoint")})
    path = tmp_path / "waypoint.shop.waypoint"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text()
    caller = asyncio.run(auth.authenticate({"authorization": f"Bearer {token}"}, None))
    assert (caller.namespace, caller.service_account, caller.node) == ("shop", "waypoint", None)
    own = SpiffeId("cluster.local", "shop", "waypoint")
    assert authorize(caller, own, None, trusted_node_accounts=TRUSTED,
                     pods_on_node=lambda _n: set()) == own
    other = SpiffeId("cluster.local", "shop", "frontend")
    with pytest.raises(Denied) as e:
        authorize(caller, other, None, trusted_node_accounts=TRUSTED,
                  pods_on_node=lambda _n: {other})
    assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(Denied):  # and it may not impersonate: it is no node proxy
        authorize(caller, other, str(other), trusted_node_accounts=TRUSTED,
                  pods_on_node=lambda _n: {other})


def test_existing_token_is_kept(tmp_path: Path) -> None:
    auth = LocalTokenAuthenticator(b"k" * 32)
    (tmp_path / "waypoint.shop.waypoint").write_text("old")
    mint_waypoint_tokens(auth, tmp_path, {("shop", "waypoint", "waypoint")})
    assert (tmp_path / "waypoint.shop.waypoint").read_text() == "old"
