"""``make bench`` / ``python -m perf.bench``: the data-path benchmark against direct and peers.

Builds one local mesh holding every mode's pods (:mod:`perf.topology`), then measures each
mode ``--runs`` times, round-robin over the modes within each run so slow drifts of this
shared machine spread over all of them (:mod:`perf.measure`), and reports medians
(:mod:`perf.report`): a figures table, a ratio table against Envoy HBONE and direct, the
issue's targets, ``perf/results/latest.json`` and ``latest.png``.

Bounded: every tool has a timeout and the whole measurement stops at ``--deadline`` seconds
(remaining runs are skipped and said so).  Cleans up on every exit path, SIGTERM and Ctrl-C
included: the mesh's namespaces, cgroups, processes and files (a crashed run's leftovers are
removed by the next run or ``ambientctl down``).  It is a benchmark, not a test: nothing here
asserts a duration.

``--modes ambient,envoy-hbone --quick`` measures two modes once with short durations (the loop
for optimising the data path).  A ratio needs both of its modes in the same invocation.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import resource
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from ambient.cluster.cluster import sweep_stale
from perf import measure, report
from perf.chart import draw
from perf.topology import BenchCluster

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent / "README.md"


def update_readme(doc: dict[str, Any]) -> None:
    text = README.read_text(encoding="utf-8")
    for name, body in report.readme_sections(doc).items():
        text = report.replace_section(text, name, body)
    README.write_text(text, encoding="utf-8")


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in report.MODES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown modes {unknown}; choose from "
                                         f"{', '.join(report.MODES)}")
    return modes


def machine_info(backend: str, args: argparse.Namespace, d: measure.Durations) -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f
                          if ln.startswith("model name")), "")
    except OSError:
        pass
    return {
        "cores": os.cpu_count(), "cpu": model, "kernel": platform.release(),
        "python": platform.python_version(), "capture_backend": backend,
        "runs": args.runs, "quick": args.quick,
        # Other work on this machine skews the figures: the load average at the end of the run.
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "durations_s": {"iperf3": d.iperf_s, "rps": d.rps_s, "latency": d.latency_s,
                        "conn": d.conn_s},
    }


def _raise_nofile() -> None:
    """Children inherit this: proxies and servers must be able to hold 1000+ connections, as
    they can in a Kubernetes container (whose limit is 1M)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 1 << 20)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _show(v: float | None, unit: str, digits: int = 0) -> str:
    return f"{'-' if v is None else f'{v:.{digits}f}':>8s} {unit}"


def measure_all(bench: BenchCluster, modes: list[str], runs: int, d: measure.Durations,
                idle_conns: int, deadline: float) -> dict[str, report.ModeResult]:
    results = {m: report.ModeResult(m) for m in modes}
    for m in modes:
        setup = bench.modes[m]
        if setup.note:
            results[m].note = setup.note
    live = [m for m in modes if not results[m].note]
    for run in range(1, runs + 1):
        for m in live:
            if results[m].note:
                continue
            if time.monotonic() > deadline:
                print(f"deadline reached: skipping the rest of run {run}", flush=True)
                return results
            t0 = time.monotonic()
            s = measure.run_once(bench, bench.modes[m], d)
            results[m].runs.append(s)
            print(f"  run {run} {m:18s} {_show(s.gbps, 'Gbit/s', 2)}  {_show(s.rps, 'req/s')}  "
                  f"p50 {_show(s.p50_ms, 'ms', 3)}  {_show(s.conn_per_s, 'conn/s')}  "
                  f"({time.monotonic() - t0:.0f}s)", flush=True)
            for err in s.errors:
                print(f"      FAILED {err}", flush=True)
    for m in live:
        why = bench.carried(m)
        if why is not None:
            print(f"  {m}: FAILED: the mesh did not carry the traffic: {why}", flush=True)
            results[m].runs, results[m].note = [], f"not carried by the mesh: {why}"
            continue
        failed = [e for s in results[m].runs for e in s.errors]
        if results[m].runs and failed and len(failed) == 4 * len(results[m].runs):
            results[m].note = f"failed: {failed[0]}"
    for m in live:
        setup = bench.modes[m]
        if not setup.proxy_pids or results[m].note or idle_conns <= 0:
            continue
        if time.monotonic() > deadline:
            print(f"deadline reached: no idle-connection figure for {m}", flush=True)
            continue
        try:
            results[m].idle_1000_rss_mb = measure.idle_connections_rss(bench, setup, idle_conns)
            print(f"  {m}: largest proxy RSS with {idle_conns} idle connections: "
                  f"{results[m].idle_1000_rss_mb:.1f} MB", flush=True)
        except measure.MeasureError as e:
            print(f"  {m}: idle connections: FAILED: {e}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--modes", type=parse_modes, default=list(report.MODES),
                    help="comma-separated subset of " + ",".join(report.MODES))
    ap.add_argument("--runs", type=int, default=3, help="runs per mode; figures are medians")
    ap.add_argument("--quick", action="store_true", help="1 run, short durations")
    ap.add_argument("--capture", default="auto", help="capture backend (auto: eBPF if usable)")
    ap.add_argument("--idle-conns", type=int, default=1000,
                    help="idle connections held for the memory figure (0: skip)")
    ap.add_argument("--deadline", type=float, default=480.0,
                    help="stop measuring after this many seconds (the build is extra)")
    ap.add_argument("--out", type=Path, default=RESULTS / "latest.json",
                    help="where to write the JSON (the PNG goes next to it)")
    ap.add_argument("--update-readme", action="store_true",
                    help="write the tables and targets into perf/README.md")
    ap.add_argument("--readme-from", type=Path, metavar="JSON",
                    help="only rewrite perf/README.md's results from this latest.json")
    args = ap.parse_args(argv)
    if args.readme_from:
        update_readme(json.loads(args.readme_from.read_text()))
        print(f"updated {README} from {args.readme_from}")
        return 0
    if args.quick:
        args.runs = 1
    d = measure.Durations.quick() if args.quick else measure.Durations()
    if os.geteuid() != 0:
        print("make bench needs root (network namespaces, cgroups, iptables)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def _term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _term)
    _raise_nofile()
    swept = sweep_stale()
    if swept:
        print(f"removed leftovers of crashed runs: {sorted(swept)}")
    started = time.monotonic()
    load_at_start = round(os.getloadavg()[0], 2)
    bench = BenchCluster(capture=args.capture)
    try:
        bench.up()
        assert bench.mesh is not None
        built = time.monotonic()
        print(f"cluster ready in {built - started:.0f}s (capture backend {bench.mesh.backend}); "
              f"measuring {', '.join(args.modes)}, {args.runs} run(s)", flush=True)
        results = measure_all(bench, args.modes, args.runs, d, args.idle_conns,
                              built + args.deadline)
        machine = machine_info(bench.mesh.backend, args, d)
        machine["loadavg_1m_at_start"] = load_at_start
    finally:
        errors = bench.close()
        if errors:
            print(f"cleanup left errors (run `ambientctl down`): {errors}", file=sys.stderr)
    machine["suite_seconds"] = round(time.monotonic() - started)
    figs = report.figures(results)
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    doc = report.document(figs, machine, date)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    png = draw(doc["modes"], f"ambient vs peers, {date} ({machine['cores']} cores, capture "
               f"{machine['capture_backend']}, medians of {args.runs} run(s))",
               args.out.with_suffix(".png"))
    print()
    print(report.figures_table(doc["modes"]))
    print()
    print(report.ratios_table(doc["modes"]))
    print()
    for t in report.targets(doc["modes"]):
        print(t.verdict())
    print(f"\nwrote {args.out} and {png}; whole suite {machine['suite_seconds']}s")
    if args.update_readme:
        update_readme(doc)
        print(f"updated {README}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
