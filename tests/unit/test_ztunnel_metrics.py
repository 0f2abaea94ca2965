"""The Prometheus exposition: exact metric names and label sets after a few connections."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

from ambient.model import Service, Workload
from ztunnel.metrics import CONTENT_TYPE, TRAFFIC_LABELS, Metrics
from ztunnel.result import ConnectionResult, Failure

WL = Workload(
    uid="u", name="a-1", namespace="ns", canonical_name="a", canonical_revision="v1",
    workload_name="a",
)  # fmt: skip
SVC = Service(name="b", namespace="ns", hostname="b.ns.svc.cluster.local")

COMMON = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
]


def _samples(m: Metrics) -> dict[str, list]:
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def _traffic(m: Metrics) -> None:
    ok = ConnectionResult.open(
        m, reporter="source", src=("10.0.0.1", 1), dst=("10.0.0.2", 15008),
        src_workload=WL, dst_service=SVC, src_identity="spiffe://cluster.local/ns/ns/sa/default",
        security_policy="mutual_tls",
    )  # fmt: skip
    ok.close(100, 200)
    bad = ConnectionResult.open(
        m, reporter="destination", src=("10.0.0.1", 2), dst=("10.0.0.3", 80)
    )
    bad.close(error=Failure("DENY", "denied"))


def test_names_and_labels():
    assert list(TRAFFIC_LABELS[: len(COMMON)]) == COMMON
    m = Metrics()
    _traffic(m)
    samples = _samples(m)
    for name in (
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
        "istio_tcp_connections_failed_total",
    ):
        assert name in samples, name
        for s in samples[name]:
            assert set(s.labels) == set(TRAFFIC_LABELS), name
            assert all(v for v in s.labels.values())
    assert not [n for n in samples if n.endswith("_created")]

    closed = {s.labels["response_flags"]: s for s in samples["istio_tcp_connections_closed_total"]}
    assert closed["-"].value == 1 and closed["DENY"].value == 1
    assert closed["-"].labels["source_app"] == "a"
    assert closed["-"].labels["destination_service"] == "b.ns.svc.cluster.local"
    assert closed["-"].labels["destination_service_name"] == "b"
    assert closed["-"].labels["source_principal"] == "spiffe://cluster.local/ns/ns/sa/default"
    assert closed["DENY"].labels["reporter"] == "destination"
    assert closed["DENY"].labels["source_workload"] == "unknown"
    (failed,) = samples["istio_tcp_connections_failed_total"]
    assert failed.labels["response_flags"] == "DENY"
    recv = {s.labels["reporter"]: s.value for s in samples["istio_tcp_received_bytes_total"]}
    sent = {s.labels["reporter"]: s.value for s in samples["istio_tcp_sent_bytes_total"]}
    assert recv["source"] == 100 and sent["source"] == 200

    sockets = {s.labels["reporter"]: s.value for s in samples["istio_tcp_sockets_open"]}
    assert sockets == {"source": 0, "destination": 0}
    (build,) = samples["istio_build"]
    assert build.labels["component"] == "ztunnel" and build.value == 1
    assert build.labels["tag"]
    for name in (
        "workload_manager_active_proxy_count",
        "workload_manager_pending_proxy_count",
        "workload_manager_proxies_started_total",
        "workload_manager_proxies_stopped_total",
    ):
        assert name in samples


def test_text_exposition_shape():
    m = Metrics(version="1.2.3")
    _traffic(m)
    text = m.render().decode()
    assert "# TYPE istio_tcp_connections_opened_total counter" in text
    assert "# TYPE istio_tcp_sockets_open gauge" in text
    assert 'istio_build{component="ztunnel",tag="1.2.3"} 1.0' in text
    assert re.search(r'istio_tcp_connections_failed_total\{[^}]*response_flags="DENY"', text)
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")


def test_metrics_are_isolated():
    a, b = Metrics(), Metrics()
    _traffic(a)
    assert "istio_tcp_connections_opened_total{" in a.render().decode()
    assert "istio_tcp_connections_opened_total{" not in b.render().decode()


def test_openmetrics_on_request():
    m = Metrics()
    _traffic(m)
    body, ctype = m.exposition("application/openmetrics-text;version=1.0.0,text/plain;q=0.5")
    assert ctype.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")
    assert b"istio_tcp_connections_opened_total{" in body
    body, ctype = m.exposition(None)
    assert ctype == CONTENT_TYPE and body == m.render()


def test_gauges_and_workload_manager():
    m = Metrics()
    m.active_proxy_count.labels().set(3)
    m.proxies_started.labels().inc()
    samples = _samples(m)
    assert samples["workload_manager_active_proxy_count"][0].value == 3
    assert samples["workload_manager_proxies_started_total"][0].value == 1
