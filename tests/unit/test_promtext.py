"""ambient.promtext against prometheus_client as the oracle: the same families give the same
bytes, in the text format and in OpenMetrics; float formatting; Accept negotiation."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.openmetrics.exposition import generate_latest as om_generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ambient.promtext import (
    OPENMETRICS_CONTENT_TYPE,
    TEXT_CONTENT_TYPE,
    exposition,
    go_float,
    render,
    wants_openmetrics,
)


class Fam:
    def __init__(self, name: str, doc: str, kind: str, labelnames: tuple[str, ...],
                 series: dict[tuple[str, ...], float]) -> None:
        self.name, self.documentation, self.kind = name, doc, kind
        self.labelnames, self._series = labelnames, series

    def series(self) -> Mapping[tuple[str, ...], float]:
        return self._series


class _Collector:
    def __init__(self, fams: list[Fam]) -> None:
        self.fams = fams

    def collect(self):  # what prometheus_client renders
        for f in self.fams:
            cls = CounterMetricFamily if f.kind == "counter" else GaugeMetricFamily
            m = cls(f.name, f.documentation, labels=list(f.labelnames))
            for key, value in f.series().items():
                m.add_metric(list(key), value)
            yield m


def _oracle(fams: list[Fam], *, openmetrics: bool = False) -> bytes:
    reg = CollectorRegistry()
    reg.register(_Collector(fams))  # type: ignore[arg-type]
    return om_generate_latest(reg) if openmetrics else generate_latest(reg)


ODD = ['plain', 'with "quotes"', "back\\slash", "new\nline", "ünïcode ✓", "", "a,b=c}"]
FAMILIES = [
    # labels deliberately not in sorted order (the exposition sorts them)
    Fam("istio_tcp_connections_opened", 'opened "total"\\ with a\nnewline', "counter",
        ("reporter", "destination_workload", "app"),
        {("source", v, "x"): float(i) for i, v in enumerate(ODD)}),
    Fam("istio_tcp_sockets_open", "open sockets", "gauge", ("reporter",),
        {("source",): 3.0, ("destination",): -1.0}),
    Fam("istio_build", "build info", "gauge", ("component", "tag"),
        {("ztunnel", "1.2.3"): 1.0}),
    Fam("workload_manager_proxies_started", "started", "counter", (), {(): 0.0}),
    Fam("empty_family", "no series yet", "counter", ("a",), {}),
    Fam("values", "float formatting", "gauge", ("v",),
        {(str(i),): v for i, v in enumerate([
            0.5, 1e-05, 123456.0, 1234567.0, 9999999.0, 123456789.5, 1e16, 2.5e-7,
            float("inf"), float("-inf"), 1.0 / 3])}),
]


@pytest.mark.parametrize("openmetrics", [False, True], ids=["text-0.0.4", "openmetrics"])
def test_byte_identical_to_prometheus_client(openmetrics: bool) -> None:
    assert render(FAMILIES, openmetrics=openmetrics) == _oracle(FAMILIES, openmetrics=openmetrics)


def test_nan_and_large_values_parse_to_the_same_numbers() -> None:
    # prometheus_client prints 1.2e+010 for 1.2e10; Go (and we) print 1.2e+10: same number.
    fam = Fam("big", "big values", "counter", ("v",),
              {("a",): 12345678901.0, ("b",): 9.5e12, ("c",): float("nan")})
    ours = {s.labels["v"]: s.value for f in text_string_to_metric_families(render([fam]).decode())
            for s in f.samples}
    assert ours["a"] == 12345678901.0 and ours["b"] == 9.5e12 and ours["c"] != ours["c"]


@pytest.mark.parametrize(("value", "text"), [
    (0.0, "0.0"), (1.0, "1.0"), (-2.0, "-2.0"), (0.25, "0.25"), (123456.0, "123456.0"),
    (1234567.0, "1.234567e+06"), (1000000.0, "1e+06"), (12345678901.0, "1.2345678901e+10"),
    (1e16, "1e+16"), (1e-05, "1e-05"), (-1234567.0, "-1234567.0"),
    (float("inf"), "+Inf"), (float("-inf"), "-Inf"), (float("nan"), "NaN"),
])
def test_go_float(value: float, text: str) -> None:
    assert go_float(value) == text


@pytest.mark.parametrize(("accept", "om"), [
    (None, False),
    ("", False),
    ("text/plain", False),
    ("*/*", False),
    ("application/openmetrics-text", True),
    ("application/openmetrics-text;version=1.0.0,text/plain;q=0.5", True),
    # what Prometheus 2.x sends
    ("application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;"
     "version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2", True),
    ("text/plain;version=0.0.4, application/openmetrics-text; version=1.0.0", True),
    ("application/openmetrics-text;version=0.0.1", False),
    ("application/openmetrics-text;version=2.0.0", False),
    ("application/json", False),
])
def test_wants_openmetrics(accept: str | None, om: bool) -> None:
    assert wants_openmetrics(accept) is om


class Hist(Fam):
    kind = "histogram"


def _hist_oracle(fams: list[Fam], *, openmetrics: bool) -> bytes:
    from prometheus_client.core import HistogramMetricFamily

    class C:
        def collect(self):
            for f in fams:
                if f.kind != "histogram":
                    continue
                m = HistogramMetricFamily(f.name, f.documentation, labels=list(f.labelnames))
                for key, (buckets, total) in f.series().items():
                    m.add_metric(list(key), list(buckets), total)
                yield m

    reg = CollectorRegistry()
    reg.register(C())  # type: ignore[arg-type]
    return om_generate_latest(reg) if openmetrics else generate_latest(reg)


@pytest.mark.parametrize("openmetrics", [False, True], ids=["text-0.0.4", "openmetrics"])
def test_histograms_byte_identical_to_prometheus_client(openmetrics: bool) -> None:
    # "response_code" sorts after "le", "app" before it: le lands between them
    hist = Hist("istio_request_duration_milliseconds", "Request duration", "histogram",
                ("response_code", "app"),
                {("200", "web"): ([("0.5", 0.0), ("1", 2.0), ("5", 3.0), ("+Inf", 4.0)], 7.25),
                 ("503", 'q"x'): ([("0.5", 1.0), ("1", 1.0), ("5", 1.0), ("+Inf", 1.0)], 0.1)})
    assert render([hist], openmetrics=openmetrics) == _hist_oracle([hist], openmetrics=openmetrics)


def test_exposition_negotiates_the_format() -> None:
    body, ctype = exposition(FAMILIES, "application/openmetrics-text;version=1.0.0")
    assert ctype == OPENMETRICS_CONTENT_TYPE and body == render(FAMILIES, openmetrics=True)
    body, ctype = exposition(FAMILIES, None)
    assert ctype == TEXT_CONTENT_TYPE and body == render(FAMILIES)
