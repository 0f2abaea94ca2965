"""ConnectionResult: label derivation (table-driven), exactly-once close, byte accounting,
failure flags and the live-connection tracker."""

from __future__ import annotations

import ssl

import pytest

from ambient.hbone.aio import HboneConnectError
from ambient.identity import SpiffeId
from ambient.model import Locality, Service, Workload
from ztunnel.metrics import COMMON_TRAFFIC_LABELS, TRAFFIC_LABELS, Metrics
from ztunnel.result import (
    FAILURE_FLAGS,
    ConnectionResult,
    ConnectionTracker,
    Failure,
    ResponseFlags,
    flag_for_error,
    traffic_labels,
)

FRONTEND = Workload(
    uid="Kubernetes//Pod/shop/frontend-7d9f-abcde",
    name="frontend-7d9f-abcde",
    namespace="shop",
    service_account="frontend",
    canonical_name="frontend",
    canonical_revision="v1",
    workload_name="frontend",
    cluster_id="cluster-a",
    locality=Locality(region="eu-west1", zone="eu-west1-b"),
)
BACKEND = Workload(
    uid="Kubernetes//Pod/shop/backend-1",
    name="backend-1",
    namespace="shop",
    service_account="backend",
    canonical_name="backend",
    canonical_revision="v2",
    workload_name="backend",
)
BACKEND_SVC = Service(name="backend", namespace="shop", hostname="backend.shop.svc.cluster.local")
FRONTEND_ID = SpiffeId("cluster.local", "shop", "frontend")
BACKEND_ID = "spiffe://cluster.local/ns/shop/sa/backend"
SRC = ("10.244.1.2", 41234)
DST = ("10.244.2.3", 15008)

ALL_UNKNOWN = {name: "unknown" for name in TRAFFIC_LABELS}
FULL_OUTBOUND = {
    "reporter": "source",
    "source_workload": "frontend",
    "source_canonical_service": "frontend",
    "source_canonical_revision": "v1",
    "source_workload_namespace": "shop",
    "source_principal": "spiffe://cluster.local/ns/shop/sa/frontend",
    "source_app": "frontend",
    "source_version": "v1",
    "source_cluster": "cluster-a",
    "destination_service": "backend.shop.svc.cluster.local",
    "destination_service_namespace": "shop",
    "destination_service_name": "backend",
    "destination_workload": "backend",
    "destination_canonical_service": "backend",
    "destination_canonical_revision": "v2",
    "destination_workload_namespace": "shop",
    "destination_principal": "spiffe://cluster.local/ns/shop/sa/backend",
    "destination_app": "backend",
    "destination_version": "v2",
    "destination_cluster": "Kubernetes",
    "request_protocol": "tcp",
    "response_flags": "-",
    "connection_security_policy": "mutual_tls",
    "source_region": "eu-west1",
    "source_zone": "eu-west1-b",
    "destination_region": "unknown",
    "destination_zone": "unknown",
}


def _result(**kw) -> ConnectionResult:
    base = dict(reporter="source", src=SRC, dst=DST)
    base.update(kw)
    return ConnectionResult(**base)


CASES = [
    pytest.param(
        dict(
            src_workload=FRONTEND,
            dst_workload=BACKEND,
            dst_service=BACKEND_SVC,
            src_identity=FRONTEND_ID,
            security_policy="mutual_tls",
        ),
        "-",
        FULL_OUTBOUND,
        id="full-outbound-mtls",
    ),
    pytest.param(
        dict(security_policy="mutual_tls"),
        "-",
        {
            **ALL_UNKNOWN,
            "reporter": "source",
            "request_protocol": "tcp",
            "response_flags": "-",
            "connection_security_policy": "mutual_tls",
        },
        id="no-workloads-all-unknown",
    ),
    pytest.param(
        dict(
            src_workload=FRONTEND,
            dst_service=BACKEND_SVC,
            src_identity=FRONTEND_ID,
            security_policy="mutual_tls",
        ),
        "CONNECT",
        {
            **FULL_OUTBOUND,
            "response_flags": "CONNECT",
            **{
                k: "unknown"
                for k in FULL_OUTBOUND
                if k.startswith("destination_") and not k.startswith("destination_service")
            },
        },
        id="missing-destination-workload",
    ),
    pytest.param(
        # Plaintext passthrough: a claimed identity is not a proven principal.
        dict(src_workload=FRONTEND, src_identity=FRONTEND_ID, security_policy="unknown"),
        "-",
        {
            **ALL_UNKNOWN,
            **{k: v for k, v in FULL_OUTBOUND.items() if k.startswith("source_")},
            "reporter": "source",
            "source_principal": "unknown",
            "request_protocol": "tcp",
            "response_flags": "-",
            "connection_security_policy": "unknown",
        },
        id="plaintext-unknown-principal",
    ),
    pytest.param(
        # Inbound mTLS: the destination principal given explicitly wins over the workload's.
        dict(
            reporter="destination",
            dst_workload=BACKEND,
            src_identity=FRONTEND_ID,
            dst_identity=BACKEND_ID,
            security_policy="mutual_tls",
        ),
        "DENY",
        {
            **ALL_UNKNOWN,
            **{
                k: v
                for k, v in FULL_OUTBOUND.items()
                if k.startswith("destination_") and not k.startswith("destination_service")
            },
            "reporter": "destination",
            "source_principal": "spiffe://cluster.local/ns/shop/sa/frontend",
            "request_protocol": "tcp",
            "response_flags": "DENY",
            "connection_security_policy": "mutual_tls",
        },
        id="inbound-unknown-source-workload",
    ),
]


@pytest.mark.parametrize("fields,flags,expected", CASES)
def test_traffic_labels(fields, flags, expected):
    labels = traffic_labels(_result(**fields), flags)
    assert labels == expected
    assert tuple(labels) == TRAFFIC_LABELS  # order is upstream's exposition order
    assert set(COMMON_TRAFFIC_LABELS) <= set(labels)


def test_empty_strings_are_unknown():
    wl = Workload(uid="u", name="p", namespace="ns", canonical_name="", workload_name="")
    labels = traffic_labels(_result(src_workload=wl))
    assert labels["source_workload"] == "unknown"
    assert labels["source_app"] == "unknown"
    assert labels["source_workload_namespace"] == "ns"


def test_direction_follows_reporter():
    assert _result(reporter="source").direction == "outbound"
    assert _result(reporter="destination").direction == "inbound"
    with pytest.raises(ValueError):
        _result(reporter="sideways")


def test_hbone_target_tuple_is_formatted():
    assert _result(hbone_target=("fd00::1", 8080)).hbone_target == "[fd00::1]:8080"


def _key(labels: dict[str, str]) -> tuple[str, ...]:
    return tuple(labels[n] for n in TRAFFIC_LABELS)


def _open(m: Metrics, tracker=None, **kw) -> ConnectionResult:
    base = dict(
        reporter="source",
        src=SRC,
        dst=DST,
        hbone_target="10.244.2.3:8080",
        src_workload=FRONTEND,
        dst_workload=BACKEND,
        dst_service=BACKEND_SVC,
        src_identity=FRONTEND_ID,
        security_policy="mutual_tls",
    )
    base.update(kw)
    return ConnectionResult.open(m, tracker=tracker, **base)


def test_close_exactly_once():
    m = Metrics()
    r = _open(m)
    key = _key(r.labels())
    assert m.connections_opened.value(*key) == 1
    assert m.sockets_open.value("source") == 1
    assert r.close(12, 34) is True
    assert r.close(100, 100, error="again") is False  # ignored
    assert m.connections_closed.value(*key) == 1
    assert m.received_bytes.value(*key) == 12  # request direction (src -> dst)
    assert m.sent_bytes.value(*key) == 34  # response direction
    assert m.sockets_open.value("source") == 0
    assert r.error is None and r.response_flags == "-"
    assert sum(m.connections_failed.series().values()) == 0


def test_live_bytes_then_totals_are_not_double_counted():
    m = Metrics()
    r = _open(m)
    key = _key(r.labels())
    r.add_sent(5)
    r.add_recv(7)
    assert m.received_bytes.value(*key) == 5  # visible before close
    r.close(bytes_sent=8)  # total 8: 3 more; recv stays at the tracked 7
    assert m.received_bytes.value(*key) == 8
    assert m.sent_bytes.value(*key) == 7
    assert (r.bytes_sent, r.bytes_recv) == (8, 7)


@pytest.mark.parametrize("flag", sorted(FAILURE_FLAGS))
def test_failure_counts_closed_and_failed_with_flag(flag):
    m = Metrics()
    r = _open(m)
    r.close(0, 0, error=Failure(flag, "boom"))
    labels = dict(r.labels(), response_flags=flag)
    assert m.connections_closed.value(*_key(labels)) == 1
    assert m.connections_failed.value(*_key(labels)) == 1
    assert r.error == "boom"
    # The opened and byte series keep response_flags "-" (as upstream).
    assert m.connections_opened.value(*_key(r.labels())) == 1


def test_error_string_without_flag_is_connect():
    m = Metrics()
    r = _open(m)
    r.close(error="connection refused")
    assert r.response_flags == ResponseFlags.CONNECT


def test_explicit_flag_wins_and_none_flag_is_not_failure():
    m = Metrics()
    r = _open(m)
    r.close(error="closed from drain", response_flags="NETWORK_POLICY")
    assert r.response_flags == "NETWORK_POLICY"
    r2 = _open(m)
    r2.close()
    assert sum(m.connections_failed.series().values()) == 1


@pytest.mark.parametrize(
    "exc,flag",
    [
        (Failure("DENY", "no"), "DENY"),
        (ssl.SSLError(1, "bad cert"), "TLS_FAILURE"),
        (ConnectionRefusedError(111, "refused"), "CONNECT"),
        (TimeoutError(), "CONNECT"),
        (ValueError("x"), "CONNECT"),
        (HboneConnectError(401, "denied by the peer's policy"), "DENY"),
        (HboneConnectError(503, "no upstream"), "CONNECT"),
    ],
)
def test_flag_for_error(exc, flag):
    assert flag_for_error(exc) == flag


def test_identity_error_flag():
    from ambient.identity import IdentityError

    assert flag_for_error(IdentityError("bad san")) == "IDENTITY_ERROR"


def test_failure_rejects_unknown_flag():
    with pytest.raises(ValueError):
        Failure("NOPE", "x")


def test_context_manager_closes_with_exception():
    m = Metrics()
    with pytest.raises(ConnectionResetError):
        with _open(m) as r:
            raise ConnectionResetError("reset by peer")
    assert r.closed and r.error == "reset by peer" and r.response_flags == "CONNECT"


def test_without_metrics_records_nothing_but_logs():
    r = ConnectionResult.open(None, reporter="destination", src=SRC, dst=DST)
    assert r.close(1, 2) is True
    assert r.close() is False


def test_tracker_lists_live_connections():
    m = Metrics()
    t = ConnectionTracker()
    a = _open(m, tracker=t)
    b = _open(m, tracker=t, reporter="destination", dst_identity=BACKEND_ID)
    a.add_sent(10)
    items = t.list()
    assert [i["id"] for i in items] == [a.id, b.id]
    first = items[0]
    assert first["src"] == "10.244.1.2:41234"
    assert first["dst"] == "10.244.2.3:15008"
    assert first["srcIdentity"] == "spiffe://cluster.local/ns/shop/sa/frontend"
    assert first["dstIdentity"] == BACKEND_ID
    assert first["bytesSent"] == 10 and first["direction"] == "outbound"
    assert first["startTime"].endswith("Z")
    a.close()
    assert len(t) == 1 and a not in t and b in t
    b.close()
    assert t.list() == []
