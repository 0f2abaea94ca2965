"""A bounded benchmark of the waypoint request path (a developer tool, not the suite).

Role: measure what ``ambient-waypoint`` costs while the waypoint is being optimised, on the
suite's own topology (``perf.topology``: client pod -> ztunnel A =HBONE=> waypoint on node-b
=HBONE=> ztunnel B -> nginx), with only the figures that work needs, per mode:

* ``rps``: wrk, 2 threads, 16 connections, closed loop on ``/``;
* ``p50_ms``: h2load, 4 connections at 1000 req/s in all, POST 1 KiB to ``/1k``;
* ``<proc>_us_rps`` / ``<proc>_us_1k``: CPU microseconds per request of each proxy process
  (``zta``, ``wp``, ``ztb``) during the closed-loop and the fixed-rate run;
* ``connects``: HBONE CONNECTs ztunnel B accepted for the server during the mode's runs
  (``istio_tcp_connections_opened_total``, destination reporter): per request without
  upstream reuse, per connection with it.

A/B runs: ``--variant NAME=ROOT`` (repeatable) restarts the waypoint with its code imported
from the directory ``ROOT`` (a copy of the repository) before each of that variant's rounds;
rounds interleave the variants, so a change is judged against its baseline in the same run on
this noisy machine.  ``--profile DIR`` records a py-spy ``raw`` profile of the waypoint for
each figure (``DIR/<variant>-<mode>-<figure>.txt``; summarise with ``perf.dev.pyspy_top``);
``--strace DIR`` records the waypoint's syscall counts (``strace -c``) the same way, or with
``WPBENCH_PERF=1`` a native ``perf record -g`` profile (``perf report -i``); both slow the
process down, so do not read the other figures of such a run. ``cpu`` figures split out the
waypoint's system time as ``wpsys_us_*``. (py-spy attributes the waypoint's idle wait to
``HboneConnection._flush``; compare its samples with the CPU figures before reading shares.)

Invariants: every tool has a timeout and the round count is bounded; the mesh (namespaces,
cgroups, processes) is torn down in ``finally``; traffic stays inside the mesh's namespaces.
The peer proxies of the suite are not started.

Usage (root): ``.venv/bin/python -m perf.dev.wpbench [--seconds 4] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ambient.cluster.demo import metric_value
from perf import apps, parse, procstat
from perf.report import percentile
from perf.topology import MESH_NS, NODE_A, NODE_B, WAYPOINT, BenchCluster, BenchSetupError

WRK = "/usr/bin/wrk"
H2LOAD = "/usr/bin/h2load"
WP_KEY = f"{MESH_NS}/{WAYPOINT}"


class LeanCluster(BenchCluster):
    """The suite's cluster without the peer proxies (their pods stay, idle)."""

    def _start_peer(self, peer: str, ca: Any) -> Any:
        raise BenchSetupError("not started by wpbench")


def _user_sys(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / procstat.CLK_TCK, int(fields[12]) / procstat.CLK_TCK


def _launcher(root: str) -> list[str]:
    """argv of a waypoint importing its code from ``root`` first (``-m`` would put the
    working directory first)."""
    code = (f"import sys; sys.path.insert(0, {root!r}); import runpy; "
            "runpy.run_module('waypoint', run_name='__main__', alter_sys=True)")
    return [sys.executable, "-c", code]


class WpBench:
    def __init__(self, bench: BenchCluster, seconds: int, profile: Path | None,
                 strace: Path | None = None) -> None:
        self.bench = bench
        self.strace = strace
        self.seconds = seconds
        self.profile = profile
        assert bench.mesh is not None
        self.mesh = bench.mesh

    def restart_waypoint(self, root: str) -> None:
        mesh = self.mesh
        assert mesh.cluster is not None
        mesh.stop_waypoint(WP_KEY)
        pod = mesh.pods[WP_KEY]
        proc = mesh.cluster.start_app(pod, _launcher(root), env=mesh.waypoint_env(WP_KEY))
        mesh.waypoints[WP_KEY] = proc
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.popen is not None and proc.popen.poll() is not None:
                raise RuntimeError(f"waypoint from {root} exited; see the pod log")
            try:
                mesh.waypoint_metrics(WP_KEY)
                out = subprocess.run(["ip", "netns", "exec", pod.netns, "ss", "-ltnH"],
                                     capture_output=True, text=True, timeout=10).stdout
                if ":15008 " in out:
                    break
            except Exception:
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError(f"waypoint from {root} not up after 30 s")
        time.sleep(1.0)  # certificate fetch and first config

    def pids(self, mode: str) -> dict[str, int]:
        zt = self.mesh.ztunnels
        out = {"zta": zt[NODE_A].pid, "ztb": zt[NODE_B].pid}
        if mode == "ambient-waypoint":
            out["wp"] = self.mesh.waypoints[WP_KEY].pid
        return out

    def connects(self, server: str) -> float:
        text = self.mesh.metrics(NODE_B)
        return metric_value(text, "istio_tcp_connections_opened_total",
                            reporter="destination", destination_workload=server)

    def run(self, client: str, argv: list[str]) -> str:
        assert self.mesh.cluster is not None
        cp = self.mesh.cluster.run_in_pod(self.bench.pod(client), argv,
                                          timeout=self.seconds + 30)
        if cp.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({cp.returncode}): {cp.stderr[-500:]}")
        return cp.stdout

    def measured(self, tag: str, pids: dict[str, int], fn: Any) -> tuple[Any, dict[str, float]]:
        before = {k: procstat.cpu_seconds([p]) for k, p in pids.items()}
        us0 = _user_sys(pids["wp"]) if "wp" in pids else (0.0, 0.0)
        spy = None
        if self.profile is not None and "wp" in pids:
            spy = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "--pid",
                 str(pids["wp"]), "--duration", str(self.seconds), "--rate", "250",
                 "--format", "raw", "-o", str(self.profile / f"{tag}.txt"), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.3)
        tracer = None
        if self.strace is not None and "wp" in pids:
            argv = ["timeout", "-s", "INT", str(self.seconds), "strace", "-c", "-f", "-p",
                    str(pids["wp"]), "-o", str(self.strace / f"{tag}.txt")]
            if os.environ.get("WPBENCH_PERF"):  # native profile instead (perf report -i)
                argv = ["perf", "record", "-F", "499", "-g", "-p", str(pids["wp"]), "-o",
                        str(self.strace / f"{tag}.perf"), "--", "sleep", str(self.seconds)]
            tracer = subprocess.Popen(argv,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.3)
        try:
            value = fn()
        finally:
            for helper in (tracer, spy):
                if helper is None:
                    continue
                try:
                    helper.wait(timeout=self.seconds + 30)
                except subprocess.TimeoutExpired:
                    helper.kill()
                    helper.wait()
        cpu = {k: procstat.cpu_seconds([p]) - before[k] for k, p in pids.items()}
        if "wp" in pids:
            us1 = _user_sys(pids["wp"])
            cpu["wpsys"] = us1[1] - us0[1]
        return value, cpu

    def mode(self, variant: str, mode: str) -> dict[str, float]:
        setup = self.bench.modes[mode]
        url = f"http://{setup.target_ip}:{apps.HTTP_PORT}"
        pids = self.pids(mode)
        server = {"ambient": "amb-server", "ambient-waypoint": "wp-server"}.get(mode)
        c0 = self.connects(server) if server else 0.0
        res: dict[str, float] = {}

        def wrk() -> parse.WrkResult:
            return parse.parse_wrk(self.run(setup.client, [
                WRK, "-t", "2", "-c", "16", "-d", f"{self.seconds}s", f"{url}/"]))

        r, cpu = self.measured(f"{variant}-{mode}-rps", pids, wrk)
        res["rps"] = round(r.rps)
        res["errors"] = r.socket_errors + r.bad_status
        for k, v in cpu.items():
            res[f"{k}_us_rps"] = round(v / max(r.requests, 1) * 1e6, 1)
        log = self.bench.workdir / "wpbench-h2load.log"

        def h2load() -> tuple[list[float], int]:
            log.unlink(missing_ok=True)
            out = self.run(setup.client, [
                H2LOAD, "--h1", "-c", "4", "--rps", "250", "-D", str(self.seconds),
                "-d", str(self.bench.body), "--log-file", str(log), f"{url}/1k"])
            return parse.parse_h2load_log(log.read_text()), parse.parse_h2load(out).succeeded

        (lat, served), cpu = self.measured(f"{variant}-{mode}-1k", pids, h2load)
        res["p50_ms"] = round(percentile(lat, 50), 3)
        res["p90_ms"] = round(percentile(lat, 90), 3)
        for k, v in cpu.items():
            res[f"{k}_us_1k"] = round(v / max(served, 1) * 1e6, 1)
        if server:
            res["connects"] = self.connects(server) - c0
            res["requests"] = r.requests + served
        return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--modes", default="direct,ambient,ambient-waypoint")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--capture", default="iptables")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=ROOT: run the waypoint from the code in ROOT")
    ap.add_argument("--profile", type=Path, default=None)
    ap.add_argument("--strace", type=Path, default=None,
                    help="directory for strace -c syscall counts of the waypoint")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("wpbench needs root", file=sys.stderr)
        return 2
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    if args.strace is not None:
        args.strace.mkdir(parents=True, exist_ok=True)
    variants = [tuple(v.split("=", 1)) for v in args.variant] or [("cur", "")]
    bench = LeanCluster(capture=args.capture, progress=lambda s: print(s, file=sys.stderr))
    results: dict[str, list[dict[str, float]]] = {}
    try:
        bench.up()
        wb = WpBench(bench, args.seconds, args.profile, args.strace)
        for _ in range(max(1, min(args.repeat, 10))):
            for vname, root in variants:
                if root:
                    wb.restart_waypoint(root)
                for mode in args.modes.split(","):
                    r = wb.mode(vname, mode)
                    print(f"{vname}/{mode}", r, file=sys.stderr)
                    results.setdefault(f"{vname}/{mode}", []).append(r)
    finally:
        with contextlib.suppress(Exception):
            bench.close()
    summary = {k: {f: statistics.median(r[f] for r in rs) for f in rs[0]}
               for k, rs in results.items()}
    text = json.dumps({"median": summary, "results": results}, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
