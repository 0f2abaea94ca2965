"""One run of one mode: the load tools run in the client pod; /proc says what the proxies cost.

Per run (durations from :class:`Durations`):
1. iperf3, one stream, ``gbps`` (received);
2. wrk, 2 threads, 16 connections, closed loop on ``/`` -> ``rps``;
3. h2load, HTTP/1.1, 4 connections at 250 req/s each (1000 req/s), POST of 1 KiB to ``/1k``
   (1 KiB answer) -> ``p50/p90/p99`` from the per-request log; the proxies' CPU time over this
   run divided by the thousands of requests it served -> ``vcpu_per_krps``;
4. wrk, 1 thread, 4 connections, ``Connection: close`` (every request on a new connection)
   -> ``conn_per_s``;
5. the proxies' peak RSS (VmHWM, summed) -> ``rss_mb``.
Once per mode with proxies: 1000 idle keep-alive connections held through them, the largest
single proxy's VmRSS -> ``idle_1000_rss_mb``.

Every tool runs with a timeout; a failing tool fails the run with its own message (the
caller records it and goes on with the next mode).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from perf import apps, parse, procstat
from perf.report import RunSample, percentile, vcpu_per_krps
from perf.topology import BenchCluster, ModeSetup, app_env

WRK = "/usr/bin/wrk"
H2LOAD = "/usr/bin/h2load"
IPERF3 = "/usr/bin/iperf3"
#: A load run that lost more than this share of its requests is a failed run, not a figure.
MAX_ERROR_SHARE = 0.01


class MeasureError(RuntimeError):
    """A load tool failed; the message quotes it."""


@dataclass(frozen=True)
class Durations:
    iperf_s: int = 3
    rps_s: int = 3
    latency_s: int = 5
    conn_s: int = 2

    @classmethod
    def quick(cls) -> Durations:
        return cls(iperf_s=2, rps_s=2, latency_s=3, conn_s=1)


def _run(bench: BenchCluster, mode: ModeSetup, argv: list[str], timeout: float,
         stdout_only: bool = False) -> str:
    assert bench.mesh is not None and bench.mesh.cluster is not None
    try:
        cp = bench.mesh.cluster.run_in_pod(bench.pod(mode.client), argv, timeout=timeout)
    except Exception as e:  # subprocess.TimeoutExpired and friends
        raise MeasureError(f"{os.path.basename(argv[0])} in {mode.client}: {e}") from e
    if cp.returncode != 0 and os.path.basename(argv[0]) != "iperf3":
        raise MeasureError(f"{os.path.basename(argv[0])} in {mode.client} exited "
                           f"{cp.returncode}: {(cp.stderr or cp.stdout).strip()[-400:]}")
    if stdout_only:
        return cp.stdout
    return cp.stdout + ("\n" + cp.stderr if cp.stderr else "")


def throughput(bench: BenchCluster, mode: ModeSetup, d: Durations) -> float:
    out = _run(bench, mode, [IPERF3, "-c", mode.target_ip, "-p", str(apps.IPERF_PORT),
                             "-t", str(d.iperf_s), "-J"], timeout=d.iperf_s + 30, stdout_only=True)
    return parse.parse_iperf3(out)


def _wrk(bench: BenchCluster, mode: ModeSetup, threads: int, conns: int, seconds: int,
         extra: list[str]) -> parse.WrkResult:
    out = _run(bench, mode, [WRK, "-t", str(threads), "-c", str(conns), "-d", f"{seconds}s",
                             *extra, f"http://{mode.target_ip}:{apps.HTTP_PORT}/"],
               timeout=seconds + 30)
    r = parse.parse_wrk(out)
    bad = r.socket_errors + r.bad_status
    if r.requests == 0 or bad > MAX_ERROR_SHARE * r.requests:
        raise MeasureError(f"wrk in {mode.client}: {bad} errors in {r.requests} requests")
    return r


def requests_per_second(bench: BenchCluster, mode: ModeSetup, d: Durations) -> float:
    return _wrk(bench, mode, 2, 16, d.rps_s, []).rps


def connections_per_second(bench: BenchCluster, mode: ModeSetup, d: Durations) -> float:
    return _wrk(bench, mode, 1, 4, d.conn_s, ["-H", "Connection: close"]).rps


def fixed_rate(bench: BenchCluster, mode: ModeSetup, d: Durations, log: Path
               ) -> tuple[list[float], int, float | None]:
    """(latencies ms, requests served, proxy CPU seconds) of the 1000 req/s run."""
    assert bench.body is not None
    log.unlink(missing_ok=True)
    cpu0 = procstat.cpu_seconds(mode.proxy_pids) if mode.proxy_pids else None
    out = _run(bench, mode, [H2LOAD, "--h1", "-c", "4", "--rps", "250", "-D", str(d.latency_s),
                             "-d", str(bench.body), "--log-file", str(log),
                             f"http://{mode.target_ip}:{apps.HTTP_PORT}/1k"],
               timeout=d.latency_s + 30)
    cpu1 = procstat.cpu_seconds(mode.proxy_pids) if mode.proxy_pids else None
    summary = parse.parse_h2load(out)
    if summary.succeeded == 0 or (summary.total - summary.succeeded
                                  > MAX_ERROR_SHARE * summary.total):
        raise MeasureError(f"h2load in {mode.client}: {summary.succeeded} of {summary.total} "
                           "requests succeeded")
    lat = parse.parse_h2load_log(log.read_text())
    if not lat:
        raise MeasureError(f"h2load in {mode.client} logged no successful request in {log}")
    cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    return lat, summary.succeeded, cpu


def peak_rss_mb(mode: ModeSetup) -> float | None:
    if not mode.proxy_pids:
        return None
    values = [procstat.memory_mb(pid, "VmHWM") for pid in mode.proxy_pids]
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def run_once(bench: BenchCluster, mode: ModeSetup, d: Durations) -> RunSample:
    """Measure one run of ``mode``.  Each figure is measured on its own: a tool that fails
    leaves its figure None and its message in ``errors``, and the others are still taken."""
    s = RunSample()

    def attempt(what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except (MeasureError, ValueError) as e:  # parse.ToolOutputError is a ValueError
            s.errors.append(f"{what}: {e}")

    def tput() -> None:
        s.gbps = throughput(bench, mode, d)

    def rps() -> None:
        s.rps = requests_per_second(bench, mode, d)

    def latency() -> None:
        lat, served, cpu = fixed_rate(bench, mode, d, bench.workdir / "h2load.log")
        s.p50_ms, s.p90_ms, s.p99_ms = (percentile(lat, q) for q in (50, 90, 99))
        s.vcpu_per_krps = vcpu_per_krps(cpu, served)

    def conns() -> None:
        s.conn_per_s = connections_per_second(bench, mode, d)

    attempt("throughput (iperf3)", tput)
    attempt("req/s (wrk)", rps)
    attempt("latency at 1000 req/s (h2load)", latency)
    attempt("connections/s (wrk)", conns)
    s.rss_mb = peak_rss_mb(mode)
    return s


def idle_connections_rss(bench: BenchCluster, mode: ModeSetup, count: int = 1000,
                         timeout: float = 90.0) -> float:
    """Hold ``count`` idle connections through the proxies; the largest proxy's VmRSS (MB)."""
    assert bench.mesh is not None and bench.mesh.cluster is not None
    status = bench.workdir / f"hold-{mode.mode}.json"
    status.unlink(missing_ok=True)
    proc = bench.mesh.cluster.start_app(
        bench.pod(mode.client),
        [sys.executable, "-m", "perf.loadgen", "hold", "--host", mode.target_ip,
         "--port", str(apps.HTTP_PORT), "--count", str(count), "--status", str(status),
         "--max-seconds", str(timeout)], env=app_env())
    try:
        deadline = time.monotonic() + timeout + 5
        while not status.exists():
            if time.monotonic() > deadline or (proc.popen is not None
                                               and proc.popen.poll() is not None):
                raise MeasureError(f"holding {count} connections from {mode.client} did not "
                                   f"finish; see the pod's log in {bench.mesh.run_dir}/logs")
            time.sleep(0.1)
        st = json.loads(status.read_text())
        if st["open"] < count:
            raise MeasureError(f"only {st['open']} of {count} idle connections opened through "
                               f"{mode.mode}: {st['first_error']}")
        values = [procstat.memory_mb(pid, "VmRSS") for pid in mode.proxy_pids]
        known = [v for v in values if v is not None]
        if not known:
            raise MeasureError(f"the proxies of {mode.mode} are gone")
        return max(known)
    finally:
        bench.mesh.cluster.stop_process(proc)
