"""The comparison chart of ``make bench`` (``perf/results/latest.png``), drawn with matplotlib.

matplotlib (the ``bench`` extra) rather than a hand-written PNG encoder: a chart is only
useful with readable axis labels, values and mode names, i.e. font rendering, which is not
worth writing ourselves.  One panel per figure, one bar per mode; ambient modes in one colour,
Envoy HBONE in another, the other peers and direct in greys; a mode without the figure has
no bar.  The Agg backend draws without a display.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

PANELS: tuple[tuple[str, str], ...] = (
    ("gbps", "Gbit/s, 1 stream (higher is better)"),
    ("rps", "req/s, 16 connections (higher is better)"),
    ("conn_per_s", "new connections/s (higher is better)"),
    ("added_p50_ms", "added p50 ms at 1000 req/s (lower is better)"),
    ("vcpu_per_krps", "proxy vCPU per 1000 req/s (lower is better)"),
    ("rss_mb", "proxy peak RSS MB (lower is better)"),
)


def _colour(mode: str) -> str:
    if mode.startswith("ambient"):
        return "#1f77b4"
    if mode == "envoy-hbone":
        return "#d62728"
    if mode.startswith("direct"):
        return "#7f7f7f"
    return "#bcbd22"


def draw(figs: Mapping[str, Mapping[str, Any]], title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m, r in figs.items() if not r.get("note")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, (key, label) in zip(axes.flat, PANELS, strict=True):
        values = [figs[m].get(key) for m in modes]
        ys = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(range(len(modes)), ys, color=[_colour(m) for m in modes])
        for bar, v in zip(bars, values, strict=True):
            if v is not None:
                text = (f"{v / 1000:.1f}k" if abs(v) >= 1000 else f"{v:.0f}" if abs(v) >= 100
                        else f"{v:.2f}")
                ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.set_xticks(range(len(modes)))
        ax.set_xticklabels(modes, rotation=35, ha="right", fontsize=8)
        ax.axhline(0, color="black", linewidth=0.5)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
