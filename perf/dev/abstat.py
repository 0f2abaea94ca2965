"""Per-unit-of-work figures from a ``meshbench`` JSON (a developer tool).

Role: turn each run's ztunnel CPU seconds into CPU per unit of work, which contention on a
shared machine distorts far less than throughput: ``cpu_s_per_gb`` (iperf3), ``cpu_us_per_req``
(closed-loop h2load), ``cpu_us_per_req_1k`` (the fixed 1000 req/s run) and ``cpu_us_per_conn``
(one request per new connection, wrk); then the median per
variant and mode, next to the medians of the raw figures.

Usage: ``python -m perf.dev.abstat RESULT.json [...]``
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any


def per_unit(r: dict[str, Any], seconds: float) -> dict[str, float]:
    out: dict[str, float] = {}
    if r.get("gbps"):
        out["cpu_s_per_gb"] = r["zt_cpu_s_gbps"] / (r["gbps"] * seconds / 8)
    if r.get("rps"):
        out["cpu_us_per_req"] = r["zt_cpu_s_rps"] * 1e6 / (r["rps"] * seconds)
    if r.get("p50_ms") is not None and "zt_cpu_s_p50_ms" in r:
        out["cpu_us_per_req_1k"] = r["zt_cpu_s_p50_ms"] * 1e6 / (1000 * seconds)
    if r.get("conn_s"):
        out["cpu_us_per_conn"] = r["zt_cpu_s_conn_s"] * 1e6 / (r["conn_s"] * seconds)
    for k in ("gbps", "rps", "p50_ms", "conn_s"):
        if r.get(k) is not None:
            out[k] = r[k]
    return out


def main(argv: list[str]) -> int:
    for path in argv:
        with open(path) as f:
            data = json.load(f)
        seconds = float(data.get("seconds", 5.0))
        print(f"# {path} ({seconds:g} s per figure)")
        for key, runs in data["results"].items():
            rows = [per_unit(r, seconds) for r in runs]
            fields = sorted({k for row in rows for k in row})
            med = {k: statistics.median(row[k] for row in rows if k in row) for k in fields}
            print(f"{key:32s} n={len(rows)} " + "  ".join(f"{k}={v:.3g}" for k, v in med.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
