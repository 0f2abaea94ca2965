"""``ztunnel-config`` formatters on config dumps recorded from the local cluster."""

# ruff: noqa: E501

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from ambient.ops import zconfig
from ambient.ops.zconfig import Filters

DATA = Path(__file__).resolve().parents[1] / "data"
NOW = datetime(2026, 11, 27, 20, 0, tzinfo=UTC)  # inside the recorded leaf certs' validity


@pytest.fixture(scope="module")
def dump() -> dict:
    return json.loads((DATA / "ztunnel_config_dump_node_b.json").read_text())


def rows(text: str) -> list[list[str]]:
    """Split a rendered table on its column starts (columns are separated by 2+ spaces)."""
    lines = text.splitlines()
    header = lines[0]
    starts = [0] + [i for i in range(1, len(header)) if header[i] != " " and header[i - 2:i] == "  "]
    out = []
    for line in lines:
        cells = [line[a:b].strip() for a, b in zip(starts, starts[1:] + [None], strict=True)]
        out.append(cells)
    return out


def test_workloads_table(dump) -> None:
    t = rows(zconfig.workloads_table(dump))
    assert t[0] == ["NAMESPACE", "POD NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL"]
    body = {r[1]: r for r in t[1:]}
    assert body["db"] == ["shop", "db", "10.244.2.3", "node-b", "None", "HBONE"]
    assert body["web"] == ["legacy", "web", "10.244.2.4", "node-b", "None", "TCP"]
    assert len(body) == 6


@pytest.mark.parametrize(("filters", "names"), [
    (Filters(namespace="legacy"), {"client", "web"}),
    (Filters(address="10.244.1.2"), {"frontend"}),
    (Filters(node="node-a"), {"frontend", "backend-2", "client"}),
    (Filters(namespace="shop", node="node-b"), {"backend-1", "db"}),
    (Filters(namespace="nope"), set()),
])
def test_workload_filters(dump, filters, names) -> None:
    assert {r[1] for r in rows(zconfig.workloads_table(dump, filters))[1:]} == names


def test_services_table_counts_healthy_endpoints(dump) -> None:
    t = rows(zconfig.services_table(dump))
    assert t[0] == ["NAMESPACE", "SERVICE NAME", "SERVICE VIP", "WAYPOINT", "ENDPOINTS"]
    assert t[1:] == [["shop", "backend", "10.96.0.10", "None", "2/2"],
                     ["shop", "db", "10.96.0.20", "None", "1/1"]]
    sick = json.loads(json.dumps(dump))
    for w in sick["workloads"]:
        if w["name"] == "backend-2":
            w["status"] = "Unhealthy"
    assert rows(zconfig.services_table(sick))[1][4] == "1/2"


def test_policies_table(dump) -> None:
    t = rows(zconfig.policies_table(dump))
    assert t[0] == ["NAMESPACE", "POLICY NAME", "ACTION", "SCOPE"]
    assert t[1:] == [["istio-system", "istio_converted_static_strict", "Deny", "WorkloadSelector"],
                     ["shop", "db-allow-backend", "Allow", "WorkloadSelector"]]


@pytest.mark.parametrize(("now", "valid"), [
    (NOW, "true"),
    (datetime(2030, 1, 1, tzinfo=UTC), "false"),  # the leaf expired (the root has not)
    (datetime(2020, 1, 1, tzinfo=UTC), "false"),  # not yet valid
])
def test_certificates_table(dump, now, valid) -> None:
    t = rows(zconfig.certificates_table(dump, now=now))
    assert t[0] == ["CERTIFICATE NAME", "TYPE", "STATUS", "VALID CERT", "SERIAL NUMBER", "NOT AFTER", "NOT BEFORE"]
    leaves = [r for r in t[1:] if r[1] == "Leaf"]
    assert {r[0] for r in leaves} == {"spiffe://cluster.local/ns/shop/sa/backend",
                                      "spiffe://cluster.local/ns/shop/sa/db"}
    assert {r[3] for r in leaves} == {valid}
    assert all(r[2] == "Available" for r in t[1:])
    raw = dump["certificates"][0]["certChain"][0]
    first = next(r for r in leaves if r[0] == dump["certificates"][0]["identity"])
    assert int(first[4], 16) == int(raw["serialNumber"]) and first[5] == raw["expirationTime"]
    assert sum(r[1] == "ROOT" for r in t[1:]) == 2


def test_certificate_not_yet_issued() -> None:
    d = {"certificates": [{"identity": "spiffe://cluster.local/ns/a/sa/b", "state": "Unavailable: CA down", "certChain": [], "rootCerts": []}]}
    assert rows(zconfig.certificates_table(d, now=NOW))[1] == [
        "spiffe://cluster.local/ns/a/sa/b", "None", "Unavailable", "false", "None", "None", "None"]


def test_connections_table() -> None:
    conns = [
        {"direction": "inbound", "src": "10.244.1.2:4000", "dst": "10.244.2.3:8080", "hboneTarget": "10.244.2.3:8080", "srcWorkload": "frontend", "dstWorkload": "db", "securityPolicy": "mutual_tls"},
        {"direction": "outbound", "src": "10.244.1.2:4001", "dst": "10.244.2.4:8080", "hboneTarget": None, "srcWorkload": "frontend", "dstWorkload": "web", "securityPolicy": "unknown"},
    ]
    t = rows(zconfig.connections_table(conns))
    assert t[0] == ["WORKLOAD", "DIRECTION", "LOCAL", "REMOTE", "REMOTE TARGET", "PROTOCOL"]
    assert t[1] == ["db", "inbound", "10.244.2.3:8080", "10.244.1.2:4000", "10.244.2.3:8080", "HBONE"]
    assert t[2] == ["frontend", "outbound", "10.244.1.2:4001", "10.244.2.4:8080", "None", "TCP"]
    assert len(rows(zconfig.connections_table(conns, Filters(address="10.244.2.4")))) == 2


def test_upstream_shaped_dump_with_waypoint() -> None:
    # Fields an upstream ztunnel adds, and a waypoint by hostname and by address.
    d = {"workloads": [{"uid": "c//Pod/ns/p", "name": "p", "namespace": "ns", "workloadIps": ["10.0.0.1"],
                        "protocol": "HBONE", "node": "n1", "extraField": {"x": 1},
                        "waypoint": {"destination": "ns/waypoint.ns.svc.cluster.local", "hboneMtlsPort": 15008}}],
         "services": [{"name": "s", "namespace": "ns", "hostname": "s.ns.svc.cluster.local", "vips": ["net1/10.96.0.1"],
                       "waypoint": {"destination": "/10.96.0.99"}, "endpoints": {}}]}
    assert rows(zconfig.workloads_table(d))[1] == ["ns", "p", "10.0.0.1", "n1", "waypoint", "HBONE"]
    assert rows(zconfig.services_table(d))[1] == ["ns", "s", "10.96.0.1", "10.96.0.99", "0/0"]


@pytest.mark.parametrize("section", ["workloads", "services", "policies", "certificates"])
def test_json_and_yaml_are_the_section(dump, section) -> None:
    assert json.loads(zconfig.render(section, dump, "json")) == dump[section]
    assert yaml.safe_load(zconfig.render(section, dump, "yaml")) == dump[section]


def test_all_has_every_section(dump) -> None:
    text = zconfig.render("all", dump, "table", now=NOW)
    for title in ("WORKLOADS", "SERVICES", "POLICIES", "CERTIFICATES", "CONNECTIONS"):
        assert f"{title}\n" in text
    assert json.loads(zconfig.render("all", dump, "json", connections=[{"id": 1}]))["connections"] == [{"id": 1}]
    with pytest.raises(ValueError, match="unknown section"):
        zconfig.render("pods", dump)
