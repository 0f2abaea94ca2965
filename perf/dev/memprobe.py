"""Where a ztunnel's memory goes, idle and with N idle connections (a developer tool).

Role: build the same local mesh as ``meshbench`` (iptables capture, client pod on node-a,
server pods on node-b and node-a), then for each ``--variant`` (ztunnel environment, both
ztunnels restarted) and each mode:

* optionally (``--warm S``) run S seconds of iperf3 and of h2load through the mode first,
  as the suite does before its idle-connections figure;
* read each ztunnel's ``VmRSS`` and ``/proc/<pid>/smaps_rollup`` split (anonymous memory vs
  file-backed pages of the interpreter and the extension modules) while idle;
* hold ``--count`` keep-alive connections through the mode (``perf.loadgen hold``, one request
  on each) and read them again: the difference divided by ``--count`` is the cost per
  connection;
* with ``--tracemalloc``, ztunnel runs with a ``sitecustomize`` (put first on its
  ``PYTHONPATH``) that starts ``tracemalloc``; on SIGUSR2 it writes
  ``<pid>.{idle,held}.tracemalloc.txt`` in the output directory. The tool signals each
  ztunnel while idle (the baseline) and while the connections are held (the growth since
  then, by allocation site). The system ``sitecustomize`` it shadows only installs Debian's
  apport hook, which a ztunnel does not need.

Invariants: every wait is bounded; the mesh is torn down in ``finally``; the connections stay
inside the cluster's namespaces.

Usage (root): ``.venv/bin/python -m perf.dev.memprobe [--count 1000] [--tracemalloc]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ambient.cluster.mesh import LocalMesh
from perf.dev.meshbench import MODES, NGINX_PORT, Bench, manifests_text, parse_variant

SITECUSTOMIZE = '''
import os, signal, tracemalloc
tracemalloc.start(int(os.environ.get("MEMPROBE_FRAMES", "1")))
_base = []
def _dump(signum, frame):
    snap = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)])
    key = "traceback" if int(os.environ.get("MEMPROBE_FRAMES", "1")) > 1 else "lineno"
    name = "idle" if not _base else "held"
    out = os.path.join(os.environ["MEMPROBE_DIR"], f"{os.getpid()}.{name}.tracemalloc.txt")
    with open(out + ".tmp", "w") as f:
        total = sum(t.size for t in snap.traces)
        f.write(f"total {total}\\n")
        if _base:
            f.write(f"growth {total - sum(t.size for t in _base[0].traces)}\\n")
            for d in snap.compare_to(_base[0], key)[:60]:
                f.write(f"{d.size_diff} {d.count_diff} {d.traceback.format()[-8:]}\\n")
        else:
            _base.append(snap)
    os.replace(out + ".tmp", out)
signal.signal(signal.SIGUSR2, _dump)
'''


def memory(pid: int) -> dict[str, float]:
    """VmRSS and its anonymous / file-backed parts, in MB."""
    fields: dict[str, float] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                fields[parts[0].rstrip(":")] = int(parts[1]) / 1024
    return {"rss": round(fields.get("Rss", 0.0), 1),
            "anon": round(fields.get("Anonymous", 0.0), 1),
            "file": round(fields.get("Rss", 0.0) - fields.get("Anonymous", 0.0), 1)}


def signal_and_wait(pids: dict[str, int], outdir: Path, name: str) -> dict[str, str]:
    """Ask each ztunnel for its tracemalloc dump (the first is the baseline); their paths."""
    files = {n: outdir / f"{p}.{name}.tracemalloc.txt" for n, p in pids.items()}
    for f in files.values():
        f.unlink(missing_ok=True)
    for pid in pids.values():
        os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 60
    while not all(f.exists() for f in files.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return {n: str(f) for n, f in files.items()}


def hold(bench: Bench, mode: str, count: int, outdir: Path, trace: bool,
         warm: float = 0.0) -> dict[str, Any]:
    client, server = MODES[mode]
    ip = bench.mesh.pods[server].ip
    if warm > 0:  # bulk traffic first, as in the suite (its RSS figure follows the iperf3 runs)
        bench.seconds = warm
        bench.iperf(client, ip)
        bench.rps(client, ip)
        time.sleep(1.0)
    status = outdir / f"hold-{mode}-{time.monotonic_ns()}.json"
    pids = bench.zt_pids()
    res: dict[str, Any] = {"idle": {n: memory(p) for n, p in pids.items()}}
    if trace:
        signal_and_wait(pids, outdir, "idle")
    proc = bench.cluster.start_app(
        bench.mesh.pods[client],
        [sys.executable, "-m", "perf.loadgen", "hold", "--host", ip, "--port", str(NGINX_PORT),
         "--count", str(count), "--status", str(status), "--max-seconds", "90"])
    try:
        deadline = time.monotonic() + 100
        while not status.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"holding {count} connections through {mode} timed out")
            time.sleep(0.2)
        res["hold_status"] = json.loads(status.read_text())
        time.sleep(1.0)  # let the last handlers settle into their idle state
        res["held"] = {n: memory(p) for n, p in pids.items()}
        res["per_conn_kb"] = {
            n: round((res["held"][n]["rss"] - res["idle"][n]["rss"]) * 1024 / count, 1)
            for n in pids}
        if trace:
            res["tracemalloc"] = signal_and_wait(pids, outdir, "held")
    finally:
        bench.cluster.stop_process(proc)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--modes", default="ambient")
    ap.add_argument("--capture", default="iptables")
    ap.add_argument("--tracemalloc", action="store_true")
    ap.add_argument("--frames", type=int, default=1, help="tracemalloc traceback depth")
    ap.add_argument("--warm", type=float, default=0.0,
                    help="seconds of iperf3 and of h2load through the mode before measuring")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:KEY=VALUE,... ztunnel environment of a variant")
    ap.add_argument("--outdir", type=Path, default=Path(tempfile.mkdtemp(prefix="memprobe-")))
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("memprobe needs root (namespaces, cgroups)", file=sys.stderr)
        return 2
    args.outdir.mkdir(parents=True, exist_ok=True)
    env: dict[str, str] = {}
    if args.tracemalloc:
        site = args.outdir / "site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        env = {"PYTHONPATH": f"{site}:{os.getcwd()}", "MEMPROBE_DIR": str(args.outdir),
               "MEMPROBE_FRAMES": str(args.frames)}
    work = Path(tempfile.mkdtemp(prefix="memprobe-mesh-"))
    manifests = work / "bench.yaml"
    manifests.write_text(manifests_text())
    mesh = LocalMesh(manifests, name=f"mp{os.getpid() % 100000}", run_root=work,
                     capture=args.capture, ztunnel_env=env)
    results: dict[str, Any] = {}
    try:
        mesh.up(progress=lambda s: print(s, file=sys.stderr))
        bench = Bench(mesh, 1.0, None)
        bench.start_servers()
        for vname, venv in [parse_variant(v) for v in args.variant] or [("", {})]:
            if vname:
                mesh.ztunnel_env = {**env, **venv}
                for node in list(mesh.ztunnels):
                    mesh.restart_ztunnel(node)
                time.sleep(2.0)
            for mode in args.modes.split(","):
                key = f"{vname}/{mode}" if vname else mode
                results[key] = hold(bench, mode, args.count, args.outdir, args.tracemalloc,
                                    args.warm)
                print(key, json.dumps(results[key]), file=sys.stderr)
    finally:
        with contextlib.suppress(Exception):
            mesh.down()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
