"""The same-node shortcut's decision: which routes may skip the tunnel (ztunnel/samenode.py)."""

from __future__ import annotations

import ipaddress

import pytest

from ambient.model import TunnelProtocol, Workload
from ztunnel.route import Hbone, NoRoute, Passthrough, Route
from ztunnel.samenode import local_target


def _wl(uid: str, ip: str) -> Workload:
    return Workload(uid=uid, name=uid, namespace="apps", addresses=(ipaddress.ip_address(ip),),
                    tunnel_protocol=TunnelProtocol.HBONE, service_account="sa", node="n1")


LOCAL = _wl("local", "10.0.0.5")
REMOTE = _wl("remote", "10.0.1.5")
SERVED = {"local": "pod-local"}


def _hbone(wl: Workload, *, port: int = 15008, authority: str = "10.0.0.5:8080",
           waypoint: bool = False) -> Hbone:
    return Hbone((str(wl.addresses[0]), port), authority, wl, None,
                 frozenset({wl.identity()}), waypoint)


CASES: list[tuple[str, Route, tuple[str, tuple[str, int]] | None]] = [
    ("served pod, direct", _hbone(LOCAL), ("pod-local", ("10.0.0.5", 8080))),
    ("pod on another node", _hbone(REMOTE, authority="10.0.1.5:8080"), None),
    ("to a waypoint, even a served one", _hbone(LOCAL, waypoint=True), None),
    ("not the HBONE port", _hbone(LOCAL, port=15009), None),
    ("authority that does not parse", _hbone(LOCAL, authority="nonsense"), None),
    ("passthrough", Passthrough(("10.0.0.5", 8080), LOCAL, None), None),
    ("no route", NoRoute("denied"), None),
]


@pytest.mark.parametrize(("route", "want"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_local_target(route: Route, want: tuple[str, tuple[str, int]] | None) -> None:
    assert local_target(route, SERVED) == want
