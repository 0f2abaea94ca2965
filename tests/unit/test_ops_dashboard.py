"""The Grafana dashboard (``daemonset/grafana-dashboard.json``): Grafana's dashboard JSON
essentials, and PromQL that names only metrics and labels ztunnel and the waypoint export."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from waypoint.telemetry import WaypointMetrics
from ztunnel.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "daemonset" / "grafana-dashboard.json"
PANEL_TYPES = {"row", "stat", "timeseries", "gauge", "table", "bargauge", "text"}
PROMETHEUS_LABELS = {"instance", "job"}  # added by the scrape, not by the exporter


def exported() -> dict[str, set[str]]:
    """Series name -> label names, for everything ztunnel and the waypoint expose."""
    out: dict[str, set[str]] = {}
    fams: list[Any] = list(Metrics().families)
    wm = WaypointMetrics()
    fams += [v for v in vars(wm).values() if hasattr(v, "labelnames") and hasattr(v, "name")]
    for f in fams:
        labels = set(f.labelnames)
        kind = getattr(f, "kind", "histogram")
        if kind == "counter":
            names = {f"{f.name}_total"}
        elif kind == "gauge":
            names = {f.name}
        else:
            names = {f"{f.name}_sum", f"{f.name}_count"}
            out.setdefault(f"{f.name}_bucket", set()).update(labels | {"le"})
        for n in names:
            out.setdefault(n, set()).update(labels)
    return out


@pytest.fixture(scope="module")
def dash() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _targets(dash: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_essentials(dash) -> None:
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        assert p["type"] in PANEL_TYPES, p["type"]
        g = p["gridPos"]
        assert {"x", "y", "w", "h"} <= set(g) and all(isinstance(g[k], int) for k in "xywh")
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["w"] > 0 and g["h"] > 0
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['id']} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["title"] and p["targets"], p
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
        assert all(t["expr"].strip() for t in p["targets"])


def test_templating_defines_every_variable_used(dash) -> None:
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "namespace", "workload"} <= names
    for v in dash["templating"]["list"]:
        assert v["type"] in ("datasource", "query", "custom", "interval")
    used: set[str] = set()
    for p in dash["panels"]:
        text = json.dumps(p)
        used |= {m for m in re.findall(r"\$\{?(\w+)", text) if not m.startswith("__")}
    assert used <= names, used - names


def test_promql_names_exported_metrics_and_labels(dash) -> None:
    series = exported()
    assert "istio_request_duration_milliseconds_bucket" in series
    seen: set[str] = set()
    queries = _targets(dash) + [v["definition"] for v in dash["templating"]["list"]
                                if v.get("definition")]
    for expr in queries:
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        metrics = re.findall(r"\b((?:istio|workload_manager)_[a-z_]+)", expr)
        assert metrics, expr
        for name in metrics:
            assert name in series, f"{name} is not exported by ztunnel or the waypoint"
            seen.add(name)
        allowed = set.intersection(*(series[m] for m in metrics)) | PROMETHEUS_LABELS
        labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", expr))
        for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            labels |= {x.strip() for x in group.split(",") if x.strip()}
        assert labels <= allowed, f"{expr}: unknown labels {labels - allowed}"
    # What the issue asks for.
    for want in ("istio_requests_total", "istio_request_duration_milliseconds_bucket",
                 "istio_tcp_sent_bytes_total", "istio_tcp_received_bytes_total",
                 "istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total"):
        assert want in seen, want
    exprs = " ".join(_targets(dash))
    for q in ("0.5", "0.9", "0.99"):
        assert f"histogram_quantile({q}," in exprs
    assert 'response_flags="DENY"' in exprs
