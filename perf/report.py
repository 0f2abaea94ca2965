"""From per-run measurements to the figures, ratios, targets and JSON of ``make bench`` (pure).

Invariants:
- A figure a mode cannot have (proxy CPU of ``direct``, ztunnel RSS of ``stunnel``, every
  figure of a mode that was not built) is ``None``/``null``, never 0.
- Each figure is the median over runs of that figure (``vcpu_per_krps`` per run first, then
  the median); ``added_p50_ms`` is the median p50 of the mode minus the median p50 of its
  baseline measured in the same run of the suite: ``direct-same-node`` for the same-node
  modes, ``direct`` for all others.
- Ratios are taken between modes of the same run only (the machine is noisy; absolute figures
  from different runs are not comparable).
- ``latest.json`` has exactly the top-level keys ``modes``, ``machine``, ``date``; every mode
  carries every key of :data:`FIELDS` (plus the documented extras of :data:`EXTRAS`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Every mode of the suite, in report order.
MODES: tuple[str, ...] = ("direct", "direct-same-node", "ambient", "ambient-same-node",
                          "ambient-waypoint", "envoy-hbone", "stunnel", "haproxy-mtls")
#: The figures of a mode in latest.json (the issue's shape).
FIELDS: tuple[str, ...] = ("gbps", "rps", "p50_ms", "p90_ms", "p99_ms", "added_p50_ms",
                           "vcpu_per_krps", "rss_mb", "conn_per_s")
#: Extra per-mode keys: the largest single proxy's RSS with 1000 idle connections open
#: through it (the issue's ztunnel memory target), why a mode has no figures at all, and
#: the tools that failed in some run (their figures are medians of the other runs).
EXTRAS: tuple[str, ...] = ("idle_1000_rss_mb", "note", "failures")
PEER = "envoy-hbone"


def baseline_of(mode: str) -> str:
    """The direct mode a mode's added latency and 'x direct' ratios are taken against."""
    return "direct-same-node" if mode.endswith("same-node") else "direct"


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def vcpu_per_krps(cpu_seconds: float | None, requests: int) -> float | None:
    """vCPU per 1000 req/s = CPU-seconds per 1000 requests: (cpu/t) / (requests/t/1000)."""
    if cpu_seconds is None or requests <= 0:
        return None
    return cpu_seconds * 1000.0 / requests


@dataclass
class RunSample:
    """One run of one mode: what the tools and /proc said."""

    gbps: float | None = None
    rps: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    vcpu_per_krps: float | None = None
    rss_mb: float | None = None
    conn_per_s: float | None = None
    errors: list[str] = field(default_factory=list)  # figures that could not be taken, why


@dataclass
class ModeResult:
    mode: str
    runs: list[RunSample] = field(default_factory=list)
    idle_1000_rss_mb: float | None = None
    note: str | None = None  # set when the mode could not be measured (and why)


def _median(values: Iterable[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return statistics.median(xs) if xs else None


def _round(v: float | None, digits: int) -> float | None:
    return None if v is None else round(v, digits)


_DIGITS = {"gbps": 2, "rps": 0, "p50_ms": 3, "p90_ms": 3, "p99_ms": 3, "added_p50_ms": 3,
           "vcpu_per_krps": 3, "rss_mb": 1, "conn_per_s": 0}


def figures(results: Mapping[str, ModeResult]) -> dict[str, dict[str, Any]]:
    """Per mode: the medians of FIELDS (rounded), added p50 against the baseline, EXTRAS."""
    med: dict[str, dict[str, float | None]] = {}
    for mode, r in results.items():
        med[mode] = {f: _median(getattr(s, f) for s in r.runs)
                     for f in FIELDS if f != "added_p50_ms"}
    out: dict[str, dict[str, Any]] = {}
    for mode, r in results.items():
        m = dict(med[mode])
        base = med.get(baseline_of(mode), {}).get("p50_ms")
        p50 = m.get("p50_ms")
        m["added_p50_ms"] = None if p50 is None or base is None else p50 - base
        row: dict[str, Any] = {f: _round(m.get(f), _DIGITS[f]) for f in FIELDS}
        row["idle_1000_rss_mb"] = _round(r.idle_1000_rss_mb, 1)
        row["note"] = r.note
        row["failures"] = sorted({e for s in r.runs for e in s.errors})
        out[mode] = row
    return out


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


#: (figure, compare with Envoy, compare with direct)
RATIO_COLUMNS: tuple[tuple[str, bool, bool], ...] = (
    ("gbps", True, True), ("rps", True, True), ("conn_per_s", True, True),
    ("p50_ms", True, True), ("added_p50_ms", True, False), ("vcpu_per_krps", True, False),
    ("rss_mb", True, False),
)


def ratios(figs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per mode, ``<figure>_x_envoy`` and ``<figure>_x_direct`` (direct = the mode's
    baseline).  Higher is better for gbps/rps/conn_per_s, lower for the others."""
    peer = figs.get(PEER, {})
    out: dict[str, dict[str, float | None]] = {}
    for mode, row in figs.items():
        base = figs.get(baseline_of(mode), {})
        r: dict[str, float | None] = {}
        for f, vs_envoy, vs_direct in RATIO_COLUMNS:
            if vs_envoy:
                r[f"{f}_x_envoy"] = ratio(row.get(f), peer.get(f))
            if vs_direct:
                r[f"{f}_x_direct"] = ratio(row.get(f), base.get(f))
        out[mode] = r
    return out


# --------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """One of the issue's targets, evaluated on one run of the suite."""

    text: str
    value: float | None  # the ratio or figure measured
    limit: float
    higher_is_better: bool

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit

    def verdict(self) -> str:
        met = self.met
        shown = "n/a" if self.value is None else f"{self.value:.2f}"
        return f"{'not measured' if met is None else 'MET' if met else 'NOT MET'}: " \
               f"{self.text} (measured {shown}, target {'>=' if self.higher_is_better else '<='}" \
               f" {self.limit:g})"


def targets(figs: Mapping[str, Mapping[str, Any]]) -> list[Target]:
    """The issue's targets for the data path, as ratios measured in the same run."""
    amb, peer = figs.get("ambient", {}), figs.get(PEER, {})
    same, dsame = figs.get("ambient-same-node", {}), figs.get("direct-same-node", {})

    def added_ratio() -> float | None:
        a, e = amb.get("added_p50_ms"), peer.get("added_p50_ms")
        if a is None or e is None:
            return None
        if e <= 0:  # Envoy added nothing measurable: ambient meets it only by adding nothing
            return 1.0 if a <= e else math.inf
        return a / e

    return [
        Target("ambient throughput vs Envoy HBONE", ratio(amb.get("gbps"), peer.get("gbps")),
               1.0, True),
        Target("ambient req/s vs Envoy HBONE", ratio(amb.get("rps"), peer.get("rps")), 1.0, True),
        Target("ambient added p50 vs Envoy HBONE", added_ratio(), 1.0, False),
        Target("ambient vCPU per 1000 req/s vs Envoy HBONE",
               ratio(amb.get("vcpu_per_krps"), peer.get("vcpu_per_krps")), 1.0, False),
        Target("ztunnel RSS with 1000 connections, MB", amb.get("idle_1000_rss_mb"), 60.0,
               False),
        Target("same-node ambient throughput vs direct same-node",
               ratio(same.get("gbps"), dsame.get("gbps")), 0.8, True),
    ]


# ------------------------------------------------------------------------------ document


def document(figs: Mapping[str, Mapping[str, Any]], machine: Mapping[str, Any],
             date: str) -> dict[str, Any]:
    """latest.json: ``{"modes": {...}, "machine": {...}, "date": ...}``, modes in MODES order."""
    modes = {m: dict(figs[m]) for m in MODES if m in figs}
    modes.update({m: dict(v) for m, v in figs.items() if m not in modes})
    doc = {"modes": modes, "machine": dict(machine), "date": date}
    check_document(doc)
    return doc


def check_document(doc: Mapping[str, Any]) -> None:
    """Raise ValueError if ``doc`` is not in latest.json's shape."""
    if set(doc) != {"modes", "machine", "date"}:
        raise ValueError(f"top-level keys are {sorted(doc)}, want date, machine, modes")
    for mode, row in doc["modes"].items():
        missing = [f for f in FIELDS if f not in row]
        if missing:
            raise ValueError(f"mode {mode} lacks {missing}")
        for f in FIELDS:
            v = row[f]
            if v is not None and not isinstance(v, int | float):
                raise ValueError(f"mode {mode}: {f} = {v!r} is not a number or null")


# --------------------------------------------------------------------------------- tables


def _fmt(v: float | None, digits: int = 2, suffix: str = "") -> str:
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v / 1000:.1f}k{suffix}"
    return f"{v:.{digits}f}{suffix}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def figures_table(figs: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table of the figures (printed by the suite, pasted into the README)."""
    header = ["mode", "Gbit/s", "req/s", "p50 ms", "p90 ms", "p99 ms", "added p50 ms",
              "vCPU/krps", "RSS MB", "conn/s", "RSS MB @1000 conns"]
    rows = []
    for mode, r in figs.items():
        if r.get("note"):
            rows.append([mode] + ["-"] * (len(header) - 2) + [f"({r['note']})"])
            continue
        added = r.get("added_p50_ms")
        rows.append([mode, _fmt(r.get("gbps")), _fmt(r.get("rps"), 0), _fmt(r.get("p50_ms"), 3),
                     _fmt(r.get("p90_ms"), 3), _fmt(r.get("p99_ms"), 3),
                     "-" if added is None else f"{added:+.3f}", _fmt(r.get("vcpu_per_krps"), 3),
                     _fmt(r.get("rss_mb"), 1), _fmt(r.get("conn_per_s"), 0),
                     _fmt(r.get("idle_1000_rss_mb"), 1)])
    return _table(header, rows)


def ratios_table(figs: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table: every mode as a multiple of Envoy HBONE and of direct."""
    rat = ratios(figs)
    names = {"gbps": "Gbit/s", "rps": "req/s", "conn_per_s": "conn/s", "p50_ms": "p50",
             "added_p50_ms": "added p50", "vcpu_per_krps": "vCPU/krps", "rss_mb": "RSS"}
    header = ["mode"]
    keys = []
    for f, vs_envoy, vs_direct in RATIO_COLUMNS:
        if vs_envoy:
            header.append(f"{names[f]} x Envoy")
            keys.append(f"{f}_x_envoy")
        if vs_direct:
            header.append(f"{names[f]} x direct")
            keys.append(f"{f}_x_direct")
    rows = []
    for mode, r in rat.items():
        if figs[mode].get("note"):
            continue
        rows.append([mode] + ["-" if r[k] is None else f"{r[k]:.2f}" for k in keys])
    return _table(header, rows)


# --------------------------------------------------------------------------------- README


def replace_section(text: str, name: str, body: str) -> str:
    """Replace what stands between ``<!-- NAME:BEGIN -->`` and ``<!-- NAME:END -->``."""
    begin, end = f"<!-- {name}:BEGIN -->", f"<!-- {name}:END -->"
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"README has no {begin} ... {end} section")
    return text[:i + len(begin)] + "\n" + body.strip("\n") + "\n" + text[j:]


def readme_sections(doc: Mapping[str, Any]) -> dict[str, str]:
    """The README's generated sections for latest.json ``doc``."""
    m = doc["machine"]
    head = (f"{doc['date']}, {m.get('cores')} cores ({m.get('cpu', '?')}), kernel "
            f"{m.get('kernel')}, Python {m.get('python')}, capture backend "
            f"{m.get('capture_backend')}, medians of {m.get('runs')} run(s), load average "
            f"{m.get('loadavg_1m_at_start', '?')} at start / {m.get('loadavg_1m', '?')} at end, "
            f"suite {m.get('suite_seconds', '?')} s.")
    results = "\n\n".join([head, figures_table(doc["modes"]), ratios_table(doc["modes"]),
                            "![latest](results/latest.png)"])
    verdicts = "\n".join(f"- {t.verdict()}" for t in targets(doc["modes"]))
    return {"LATEST-RESULTS": results, "TARGETS": verdicts}
