"""The Prometheus exposition of counters, gauges and histograms, without ``prometheus_client``.

Role: render a proxy's metric families for a scrape (Prometheus text format 0.0.4, or
OpenMetrics 1.0.0 when the scraper asks for it). ztunnel and the waypoint need nothing else
from ``prometheus_client``, which costs ~2.7 MB of RSS (54 modules) per process and builds a
``Metric`` object per series on every scrape. Pure functions: families in, bytes out.

Invariants (what Prometheus and ``prometheus_client`` produce, tested with the latter as the
oracle):
- a counter ``x`` is exposed as ``x_total``; in text 0.0.4 its HELP/TYPE lines name
  ``x_total``, in OpenMetrics they name ``x`` and the body ends with ``# EOF``;
- a histogram ``x`` is its cumulative ``x_bucket`` series (``le`` sorted in with the other
  labels, ``+Inf`` last), then ``x_count`` and ``x_sum``;
- label pairs are sorted by name; label values escape ``\\``, newline and ``"``; HELP text
  escapes ``\\`` and newline (and ``"`` in OpenMetrics);
- values are printed as Go prints a float64 (``1.0``, ``1.2345678e+07``, ``+Inf``, ``NaN``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, TypeAlias, cast

__all__ = ["OPENMETRICS_CONTENT_TYPE", "TEXT_CONTENT_TYPE", "Exposable", "HistogramValue",
           "exposition", "go_float", "render", "wants_openmetrics"]

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"


# A histogram series: cumulative (le, count) buckets ending with ("+Inf", total), and the sum.
HistogramValue: TypeAlias = tuple[Sequence[tuple[str, float]], float]


class Exposable(Protocol):
    """A family with fixed label names: one value per label-value tuple (a float, or a
    ``HistogramValue`` for kind ``histogram``)."""

    name: str
    documentation: str
    kind: str  # "counter", "gauge" or "histogram"
    labelnames: tuple[str, ...]

    def series(self) -> Mapping[tuple[str, ...], float | HistogramValue]: ...


def go_float(value: float) -> str:
    """``value`` as Go's ``strconv.FormatFloat(v, 'g', -1, 64)`` with a ``.0`` on integers
    (what Prometheus clients print): exponent form from 1e6 up."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    text = repr(float(value))
    dot = text.find(".")
    if value > 0 and dot > 6:  # 7+ integer digits: d.ddd...e+NN
        digits = (text[:dot] + text[dot + 1:]).rstrip("0")
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def _label_value(v: str) -> str:
    return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


class _Labels:
    """Formats one family's label values, with its names sorted once."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.order = sorted(range(len(names)), key=names.__getitem__)

    def __call__(self, values: tuple[str, ...]) -> str:
        if not self.order:
            return ""
        pairs = ",".join(f'{self.names[i]}="{_label_value(values[i])}"' for i in self.order)
        return f"{{{pairs}}}"


def render(families: Iterable[Exposable], *, openmetrics: bool = False) -> bytes:
    """The exposition of ``families``, in their order; series in insertion order."""
    out: list[str] = []
    for fam in families:
        sample = f"{fam.name}_total" if fam.kind == "counter" else fam.name
        head = fam.name if openmetrics else sample
        doc = fam.documentation.replace("\\", r"\\").replace("\n", r"\n")
        if openmetrics:
            doc = doc.replace('"', r"\"")
        out.append(f"# HELP {head} {doc}\n# TYPE {head} {fam.kind}\n")
        labels = _Labels(fam.labelnames)
        if fam.kind == "histogram":
            with_le = _Labels((*fam.labelnames, "le"))
            for key, value in fam.series().items():
                buckets, total = cast(HistogramValue, value)
                out.extend(f"{fam.name}_bucket{with_le((*key, le))} {go_float(n)}\n"
                           for le, n in buckets)
                out.append(f"{fam.name}_count{labels(key)} {go_float(buckets[-1][1])}\n"
                           f"{fam.name}_sum{labels(key)} {go_float(total)}\n")
            continue
        for key, value in fam.series().items():
            out.append(f"{sample}{labels(key)} {go_float(cast(float, value))}\n")
    if openmetrics:
        out.append("# EOF\n")
    return "".join(out).encode()


def wants_openmetrics(accept: str | None) -> bool:
    """Whether an ``Accept`` header asks for OpenMetrics (a Prometheus server does); any
    other header, or none, gets the text format."""
    if not accept:
        return False
    for item in accept.split(","):
        media, *params = (p.strip() for p in item.split(";"))
        if media.lower() != "application/openmetrics-text":
            continue
        version = next((p.split("=", 1)[1].strip() for p in params
                        if p.lower().startswith("version=")), "1.0.0")
        if version.split(".")[0] == "1" or not version:
            return True
    return False


def exposition(families: Iterable[Exposable], accept: str | None) -> tuple[bytes, str]:
    """What a scrape with this ``Accept`` header gets: (body, content type)."""
    if wants_openmetrics(accept):
        return render(families, openmetrics=True), OPENMETRICS_CONTENT_TYPE
    return render(families), TEXT_CONTENT_TYPE
