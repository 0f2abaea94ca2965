"""The benchmark's pure parts: percentiles, medians, added latency, ratios, targets, the
latest.json shape, and the peers' configs (what makes the comparison fair)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from perf import peers, report
from perf.apps import nginx_config
from perf.report import ModeResult, RunSample, Target


@pytest.mark.parametrize("values, q, want", [
    ([5.0], 50, 5.0),
    ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
    ([4.0, 1.0, 3.0, 2.0], 0, 1.0),
    ([4.0, 1.0, 3.0, 2.0], 100, 4.0),
    ([float(i) for i in range(1, 101)], 90, 90.1),
    ([float(i) for i in range(1, 101)], 99, 99.01),
])
def test_percentile_interpolates_between_ranks(values: list[float], q: float,
                                               want: float) -> None:
    assert report.percentile(values, q) == pytest.approx(want)


@pytest.mark.parametrize("values, q", [([], 50), ([1.0], 101), ([1.0], -1)])
def test_percentile_rejects_bad_input(values: list[float], q: float) -> None:
    with pytest.raises(ValueError):
        report.percentile(values, q)


def test_vcpu_per_krps() -> None:
    # 0.5 CPU-seconds for 5000 requests = 0.1 vCPU at 1000 req/s.
    assert report.vcpu_per_krps(0.5, 5000) == pytest.approx(0.1)
    assert report.vcpu_per_krps(None, 5000) is None
    assert report.vcpu_per_krps(0.5, 0) is None


def _runs(*samples: dict[str, float | None]) -> list[RunSample]:
    return [RunSample(**s) for s in samples]  # type: ignore[arg-type]


def _results() -> dict[str, ModeResult]:
    return {
        "direct": ModeResult("direct", _runs(
            {"gbps": 10.0, "rps": 40000.0, "p50_ms": 0.10, "conn_per_s": 9000.0},
            {"gbps": 14.0, "rps": 44000.0, "p50_ms": 0.12, "conn_per_s": 9500.0},
            {"gbps": 12.0, "rps": 42000.0, "p50_ms": 0.11, "conn_per_s": 9200.0})),
        "direct-same-node": ModeResult("direct-same-node", _runs(
            {"gbps": 20.0, "rps": 60000.0, "p50_ms": 0.05})),
        "ambient": ModeResult("ambient", _runs(
            {"gbps": 6.0, "rps": 20000.0, "p50_ms": 0.40, "vcpu_per_krps": 0.2, "rss_mb": 80.0},
            {"gbps": 5.0, "rps": 22000.0, "p50_ms": 0.50, "vcpu_per_krps": None,
             "rss_mb": 82.0}), idle_1000_rss_mb=55.04),
        "ambient-same-node": ModeResult("ambient-same-node", _runs(
            {"gbps": 15.0, "p50_ms": 0.30})),
        "ambient-waypoint": ModeResult("ambient-waypoint", note="not built"),
        "envoy-hbone": ModeResult("envoy-hbone", _runs(
            {"gbps": 5.0, "rps": 24000.0, "p50_ms": 0.35, "vcpu_per_krps": 0.1,
             "rss_mb": 160.0})),
    }


def test_figures_are_medians_and_added_latency_uses_the_right_baseline() -> None:
    figs = report.figures(_results())
    d, amb, same = figs["direct"], figs["ambient"], figs["ambient-same-node"]
    assert (d["gbps"], d["rps"], d["p50_ms"]) == (12.0, 42000.0, 0.11)
    assert d["added_p50_ms"] == 0.0
    assert amb["gbps"] == 5.5 and amb["p50_ms"] == 0.45
    assert amb["added_p50_ms"] == pytest.approx(0.34)  # against direct
    assert same["added_p50_ms"] == pytest.approx(0.25)  # against direct-same-node
    assert amb["vcpu_per_krps"] == 0.2  # the run without a CPU figure is left out
    assert amb["idle_1000_rss_mb"] == 55.0
    assert d["vcpu_per_krps"] is None and d["rss_mb"] is None  # no proxy: null, not 0
    wp = figs["ambient-waypoint"]
    assert wp["note"] == "not built" and all(wp[f] is None for f in report.FIELDS)


def test_ratios_against_envoy_and_the_modes_own_direct() -> None:
    rat = report.ratios(report.figures(_results()))
    assert rat["ambient"]["gbps_x_envoy"] == pytest.approx(1.1)
    assert rat["ambient"]["gbps_x_direct"] == pytest.approx(5.5 / 12.0)
    assert rat["ambient-same-node"]["gbps_x_direct"] == pytest.approx(0.75)
    assert rat["ambient"]["rss_mb_x_envoy"] == pytest.approx(81.0 / 160.0)
    assert rat["direct"]["vcpu_per_krps_x_envoy"] is None
    assert "vcpu_per_krps_x_direct" not in rat["ambient"]
    assert report.ratio(1.0, 0.0) is None and report.ratio(None, 1.0) is None


def test_targets_evaluated_as_the_issue_states_them() -> None:
    got = {t.text: t.met for t in report.targets(report.figures(_results()))}
    assert got == {
        "ambient throughput vs Envoy HBONE": True,  # 5.5 vs 5.0
        "ambient req/s vs Envoy HBONE": False,  # 21k vs 24k
        "ambient added p50 vs Envoy HBONE": False,  # +0.34 vs +0.24
        "ambient vCPU per 1000 req/s vs Envoy HBONE": False,  # 0.2 vs 0.1
        "ztunnel RSS with 1000 connections, MB": True,  # 55.0 <= 60
        "same-node ambient throughput vs direct same-node": False,  # 0.75 < 0.8
    }


@pytest.mark.parametrize("target, met", [
    (Target("t", None, 1.0, True), None),
    (Target("t", 1.0, 1.0, True), True),
    (Target("t", 0.99, 1.0, True), False),
    (Target("t", 1.0, 1.0, False), True),
    (Target("t", math.inf, 1.0, False), False),
])
def test_target_verdicts(target: Target, met: bool | None) -> None:
    assert target.met is met
    assert target.verdict().startswith({None: "not measured", True: "MET",
                                        False: "NOT MET"}[met])


def test_document_has_the_issues_shape_and_round_trips_through_json() -> None:
    figs = report.figures(_results())
    doc = report.document(figs, {"cores": 2, "kernel": "6.1", "python": "3.11",
                                 "capture_backend": "ebpf"}, "2026-11-27T00:00:00+00:00")
    assert list(doc) == ["modes", "machine", "date"]
    assert list(doc["modes"]) == [m for m in report.MODES if m in figs]  # report order
    back: dict[str, Any] = json.loads(json.dumps(doc))
    for row in back["modes"].values():
        assert set(report.FIELDS) <= set(row) <= set(report.FIELDS) | set(report.EXTRAS)
    assert back["modes"]["direct"]["vcpu_per_krps"] is None


@pytest.mark.parametrize("doc, words", [
    ({"modes": {}, "machine": {}}, "top-level"),
    ({"modes": {"x": {"gbps": 1}}, "machine": {}, "date": ""}, "lacks"),
    ({"modes": {"x": {f: "1" for f in report.FIELDS}}, "machine": {}, "date": ""},
     "not a number"),
])
def test_check_document_rejects_other_shapes(doc: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        report.check_document(doc)


def test_tables_show_every_measured_mode_and_the_reason_for_the_others() -> None:
    figs = report.figures(_results())
    table = report.figures_table(figs)
    assert "| ambient | 5.50 | 21.0k | 0.450 |" in table
    assert "(not built)" in table
    ratios = report.ratios_table(figs)
    assert "ambient-waypoint" not in ratios
    assert "| envoy-hbone | 1.00 |" in ratios


def test_baselines() -> None:
    assert report.baseline_of("ambient-same-node") == "direct-same-node"
    assert report.baseline_of("envoy-hbone") == "direct"


# -------------------------------------------------------------------------- peer configs

PKI = peers.PkiFiles("/p/key.pem", "/p/chain.pem", "/p/root.pem", "/p/combined.pem")


def test_envoy_client_tunnels_the_original_destination_over_mtls_h2() -> None:
    cfg = peers.envoy_client_config("10.244.2.4", PKI, "spiffe://cluster.local/ns/n/sa/s")
    lis = cfg["static_resources"]["listeners"][0]
    assert lis["address"]["socket_address"]["port_value"] == peers.ENVOY_OUTBOUND_PORT
    assert lis["listener_filters"][0]["name"] == "envoy.filters.listener.original_dst"
    tcp = lis["filter_chains"][0]["filters"][0]["typed_config"]
    assert tcp["tunneling_config"]["hostname"] == "%DOWNSTREAM_LOCAL_ADDRESS%"
    cluster = cfg["static_resources"]["clusters"][0]
    ep = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert ep["socket_address"] == {"address": "10.244.2.4", "port_value": peers.HBONE_PORT}
    tls = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["alpn_protocols"] == ["h2"]
    assert tls["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_3"
    assert tls["validation_context"]["match_typed_subject_alt_names"][0]["matcher"] == {
        "exact": "spiffe://cluster.local/ns/n/sa/s"}


def test_envoy_server_routes_each_authority_to_its_port_and_requires_client_certs() -> None:
    cfg = peers.envoy_server_config("10.244.2.4", PKI, "cluster.local")
    lis = cfg["static_resources"]["listeners"][0]
    chain = lis["filter_chains"][0]
    assert chain["transport_socket"]["typed_config"]["require_client_certificate"] is True
    hcm = chain["filters"][0]["typed_config"]
    assert hcm["http2_protocol_options"] == {"allow_connect": True}
    domains = {vh["domains"][0]: vh["routes"][0]["route"]["cluster"]
               for vh in hcm["route_config"]["virtual_hosts"]}
    assert domains == {"10.244.2.4:80": "app80", "10.244.2.4:5201": "app5201"}


def test_tunnel_peers_pair_ports_and_pin_tls13() -> None:
    st_c = peers.stunnel_config("client", "10.0.0.9", PKI)
    st_s = peers.stunnel_config("server", "10.0.0.9", PKI)
    assert "accept = 127.0.0.1:15100\nconnect = 10.0.0.9:15200" in st_c
    assert "accept = 10.0.0.9:15201\nconnect = 10.0.0.9:5201" in st_s
    assert st_s.count("sslVersionMin = TLSv1.3") == 2 and "verifyChain = yes" in st_s
    hp_c = peers.haproxy_config("client", "10.0.0.9", PKI)
    hp_s = peers.haproxy_config("server", "10.0.0.9", PKI)
    assert "server s 10.0.0.9:15200 ssl crt /p/combined.pem ca-file /p/root.pem " \
           "verify required" in hp_c
    assert "bind 10.0.0.9:15201 ssl crt /p/combined.pem ca-file /p/root.pem " \
           "verify required" in hp_s
    assert "nbthread 1" in hp_c


def test_redirect_rules_leave_the_proxies_own_ports_alone() -> None:
    rules = peers.redirect_rules("10.0.0.9", [(80, 15001), (5201, 15001)])
    assert [r[r.index("--dport") + 1] for r in rules] == ["80", "5201"]
    assert all(r[r.index("-d") + 1] == "10.0.0.9/32" for r in rules)


def test_nginx_config_serves_1k_and_keeps_connections(tmp_path: Path) -> None:
    conf = nginx_config(tmp_path)
    assert "master_process off;" in conf and "keepalive_timeout 300s;" in conf
    body = conf.split('location = /1k {', 1)[1].split('"')[1]
    assert len(body.replace("\\n", "\n")) == 1024
    assert str(tmp_path) in conf


def test_readme_sections_are_replaced_in_place() -> None:
    text = "a\n<!-- X:BEGIN -->\nold\n<!-- X:END -->\nb\n"
    assert report.replace_section(text, "X", "new\n") == (
        "a\n<!-- X:BEGIN -->\nnew\n<!-- X:END -->\nb\n")
    with pytest.raises(ValueError, match="Y:BEGIN"):
        report.replace_section(text, "Y", "new")
    doc = report.document(report.figures(_results()), {"cores": 2}, "2026-11-27")
    sections = report.readme_sections(doc)
    assert "| ambient | 5.50 |" in sections["LATEST-RESULTS"]
    assert "NOT MET: ambient req/s vs Envoy HBONE" in sections["TARGETS"]
