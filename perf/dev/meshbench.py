"""A small, bounded data-path benchmark on the local mesh (a developer tool, not the suite).

Role: measure what the ztunnel data path costs while it is being optimised, on the same
topology as ``make bench`` (client pod -> node proxy -> node proxy -> server pod, real
namespaces, real capture, real mTLS), but with only the figures the optimisation work needs:

* ``gbps``: single-stream iperf3 throughput;
* ``rps``: closed-loop HTTP/1.1 requests/s at 16 connections (h2load against nginx);
* ``p50_ms``: median latency at a fixed 1000 req/s over 4 connections (h2load --rps);
* ``conn_s``: new connections per second, every request on its own connection (``wrk -t 1
  -c 4 -H 'Connection: close'``, as the suite's ``conn_per_s``);
* ``zt_cpu_s``: CPU seconds both ztunnels spent during each figure (from /proc), and
  ``zt_sys_s`` the system (kernel) part of it;
* ``zt_rss_mb``: both ztunnels' resident memory at the end.

Modes: ``direct`` (unenrolled namespace, cross-node), ``ambient`` (cross-node through both
ztunnels), ``ambient-same-node`` (client and server on one node), ``passthrough`` (enrolled
client to an unenrolled server: one plain TCP relay in ztunnel A).  ``--profile DIR`` records a
py-spy flame graph (``DIR/<mode>-<figure>-<node>.svg``) and a ``--format raw`` collapsed stack
file of each ztunnel while a figure runs.

A/B runs: ``--variant NAME:KEY=VALUE,...`` (repeatable) restarts both ztunnels with that
environment before each round's measurements, rounds interleave the variants, and the
summary gives each variant's median per figure, so a change is judged against its baseline
in the same run on this noisy shared machine.

Invariants: every step has a time bound; the mesh (namespaces, cgroups, processes) is torn
down in ``finally``; traffic stays inside the cluster's own namespaces.

Usage (root): ``.venv/bin/python -m perf.dev.meshbench [--seconds 5] [--profile DIR]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ambient.cluster.mesh import LocalMesh

NGINX_PORT = 8082
IPERF_PORT = 5201
BODY = "x" * 1024

MANIFESTS = """
apiVersion: v1
kind: Namespace
metadata: {name: bench, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: bench}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: server, namespace: bench}
"""

PODS = [  # (namespace, name, node, service account, role)
    ("bench", "client", "node-a", "client", "client"),
    ("bench", "server", "node-b", "server", "server"),
    ("bench", "server-local", "node-a", "server", "server"),
    ("plain", "pclient", "node-a", "default", "client"),
    ("plain", "pserver", "node-b", "default", "server"),
]

MODES = {  # mode -> (client pod, server pod)
    "direct": ("plain/pclient", "plain/pserver"),
    "ambient": ("bench/client", "bench/server"),
    "ambient-same-node": ("bench/client", "bench/server-local"),
    # enrolled client -> unenrolled server: ztunnel A relays TCP<->TCP (no TLS, no HTTP/2);
    # the floor a same-node in-process shortcut would reach (one relay between two TCP legs)
    "passthrough": ("bench/client", "plain/pserver"),
}

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/tmp;
  proxy_temp_path {prefix}/tmp;
  fastcgi_temp_path {prefix}/tmp;
  uwsgi_temp_path {prefix}/tmp;
  scgi_temp_path {prefix}/tmp;
  keepalive_requests 1000000;
  server {{
    listen {port};
    location / {{ default_type text/plain; return 200 "{body}"; }}
  }}
}}
"""


def manifests_text() -> str:
    docs = [MANIFESTS.strip()]
    for ns, name, node, sa, role in PODS:
        docs.append(
            "apiVersion: v1\nkind: Pod\n"
            f"metadata: {{name: {name}, namespace: {ns}, labels: {{app: {role}}}}}\n"
            f"spec:\n  nodeName: {node}\n  serviceAccountName: {sa}\n"
            "  containers: [{name: app}]"
        )
    return "\n---\n".join(docs) + "\n"


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid`` and its reaped children."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = [int(x) for x in fields[11:15]]
    hz = os.sysconf("SC_CLK_TCK")
    return (ticks[0] + ticks[2]) / hz, (ticks[1] + ticks[3]) / hz


def proc_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Bench:
    def __init__(self, mesh: LocalMesh, seconds: float, profile: Path | None) -> None:
        self.mesh = mesh
        self.seconds = seconds
        self.profile = profile
        assert mesh.cluster is not None
        self.cluster = mesh.cluster

    def zt_pids(self) -> dict[str, int]:
        return {node: p.pid for node, p in self.mesh.ztunnels.items()}

    def start_servers(self) -> None:
        for ns, name, _node, _sa, role in PODS:
            if role != "server":
                continue
            pod = self.mesh.pods[f"{ns}/{name}"]
            prefix = Path(self.mesh.run_dir) / f"nginx-{name}"
            (prefix / "tmp").mkdir(parents=True, exist_ok=True)
            conf = prefix / "nginx.conf"
            conf.write_text(NGINX_CONF.format(prefix=prefix, port=NGINX_PORT, body=BODY))
            self.cluster.start_app(pod, ["/usr/sbin/nginx", "-p", str(prefix), "-c", str(conf)])
            self.cluster.start_app(pod, ["/usr/bin/iperf3", "-s", "-p", str(IPERF_PORT)])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if all(self._listening(f"{ns}/{n}") for ns, n, _, _, r in PODS if r == "server"):
                return
            time.sleep(0.2)
        raise RuntimeError("nginx/iperf3 did not start in the server pods")

    def _listening(self, key: str) -> bool:
        pod = self.mesh.pods[key]
        out = subprocess.run(["ip", "netns", "exec", pod.netns, "ss", "-ltnH"],
                             capture_output=True, text=True, timeout=10).stdout
        return f":{NGINX_PORT} " in out and f":{IPERF_PORT} " in out

    def run(self, key: str, argv: list[str], timeout: float) -> str:
        cp = self.cluster.run_in_pod(self.mesh.pods[key], argv, timeout=timeout)
        if cp.returncode != 0:
            raise RuntimeError(f"{argv[0]} in {key} failed ({cp.returncode}): "
                               f"{cp.stderr[-800:]}{cp.stdout[-800:]}")
        return cp.stdout

    def measured(self, mode: str, figure: str, fn: Any) -> tuple[Any, float, float]:
        """Run ``fn``; return (its value, ztunnel CPU seconds spent meanwhile, of which
        system)."""
        pids = self.zt_pids()
        before = [proc_cpu_split(p) for p in pids.values()]
        spies = []
        if self.profile is not None and mode != "direct":
            for node, pid in pids.items():
                out = self.profile / f"{mode}-{figure}-{node}"
                for fmt, ext in (("flamegraph", "svg"), ("raw", "txt")):
                    spies.append(subprocess.Popen(
                        [str(Path(sys.executable).parent / "py-spy"), "record", "--pid",
                         str(pid), "--duration", str(int(self.seconds)), "--rate", "200",
                         "--format", fmt, "-o", f"{out}.{ext}", "--nonblocking"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(0.5)
        try:
            value = fn()
        finally:
            for s in spies:
                try:
                    s.wait(timeout=self.seconds + 30)
                except subprocess.TimeoutExpired:
                    s.kill()
                    s.wait()
        after = [proc_cpu_split(p) for p in pids.values()]
        user = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
        system = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
        return value, user + system, system

    def iperf(self, client: str, ip: str) -> float:
        out = self.run(client, ["/usr/bin/iperf3", "-c", ip, "-p", str(IPERF_PORT), "-J",
                                "-t", str(int(self.seconds))], timeout=self.seconds + 30)
        d = json.loads(out)
        return float(d["end"]["sum_received"]["bits_per_second"]) / 1e9

    def h2load(self, client: str, ip: str, extra: list[str]) -> str:
        return self.run(client, ["/usr/bin/h2load", "--h1", "-D", str(int(self.seconds)), "-t", "1",
                                 *extra, f"http://{ip}:{NGINX_PORT}/"],
                        timeout=self.seconds + 30)

    def rps(self, client: str, ip: str) -> float:
        out = self.h2load(client, ip, ["-c", "16"])
        m = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)
        if not m:
            raise RuntimeError(f"cannot parse h2load output: {out[-500:]}")
        return float(m.group(1))

    def p50(self, client: str, ip: str) -> float:
        with tempfile.NamedTemporaryFile(suffix=".log") as log:
            self.h2load(client, ip, ["-c", "4", "--rps", "250", "--log-file", log.name])
            lat = sorted(int(line.split()[2]) for line in Path(log.name).read_text().splitlines()
                         if line.strip())
        if not lat:
            raise RuntimeError("h2load logged no requests")
        return lat[len(lat) // 2] / 1000.0  # microseconds -> ms

    def conn_rate(self, client: str, ip: str) -> float:
        out = self.run(client, ["/usr/bin/wrk", "-t", "1", "-c", "4", "-d",
                                f"{int(self.seconds)}s", "-H", "Connection: close",
                                f"http://{ip}:{NGINX_PORT}/"], timeout=self.seconds + 30)
        m = re.search(r"Requests/sec:\s*([\d.]+)", out)
        if not m:
            raise RuntimeError(f"cannot parse wrk output: {out[-500:]}")
        return float(m.group(1))

    def mode(self, mode: str, figures: list[str]) -> dict[str, Any]:
        client, server = MODES[mode]
        ip = self.mesh.pods[server].ip
        res: dict[str, Any] = {}
        fns = {"gbps": lambda: self.iperf(client, ip), "rps": lambda: self.rps(client, ip),
               "p50_ms": lambda: self.p50(client, ip),
               "conn_s": lambda: self.conn_rate(client, ip)}
        for fig in figures:
            value, cpu, system = self.measured(mode, fig, fns[fig])
            res[fig] = round(value, 3)
            res[f"zt_cpu_s_{fig}"] = round(cpu, 2)
            res[f"zt_sys_s_{fig}"] = round(system, 2)
        if mode != "direct":
            res["zt_rss_mb"] = round(sum(proc_rss_mb(p) for p in self.zt_pids().values()), 1)
        return res


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, kvs = text.partition(":")
    return name, dict(kv.split("=", 1) for kv in kvs.split(",") if kv)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--figures", default="gbps,rps,p50_ms,conn_s")
    ap.add_argument("--repeat", type=int, default=1, help="rounds over all modes")
    ap.add_argument("--capture", default="iptables")
    ap.add_argument("--profile", type=Path, default=None, help="directory for py-spy output")
    ap.add_argument("--env", action="append", default=[], help="ztunnel env KEY=VALUE")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:KEY=VALUE,... ztunnel environment of an A/B variant")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("meshbench needs root (namespaces, cgroups)", file=sys.stderr)
        return 2
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="meshbench-"))
    manifests = work / "bench.yaml"
    manifests.write_text(manifests_text())
    env = dict(kv.split("=", 1) for kv in args.env)
    name = f"mb{os.getpid() % 100000}"
    mesh = LocalMesh(manifests, name=name, run_root=work, capture=args.capture, ztunnel_env=env)
    variants = [parse_variant(v) for v in args.variant] or [("", {})]
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        mesh.up(progress=lambda s: print(s, file=sys.stderr))
        bench = Bench(mesh, args.seconds, args.profile)
        bench.start_servers()
        figures = args.figures.split(",")
        for _ in range(max(1, min(args.repeat, 10))):
            for vname, venv in variants:
                if vname:
                    mesh.ztunnel_env = {**env, **venv}
                    for node in list(mesh.ztunnels):
                        mesh.restart_ztunnel(node)
                    time.sleep(1.0)  # let the new ztunnels take over the pods' listeners
                for mode in args.modes.split(","):
                    key = f"{vname}/{mode}" if vname else mode
                    r = bench.mode(mode, figures)
                    print(key, r, file=sys.stderr)
                    results.setdefault(key, []).append(r)
    finally:
        with contextlib.suppress(Exception):
            mesh.down()
        shutil.rmtree(work, ignore_errors=True)
    summary = {key: {f: statistics.median(r[f] for r in rs) for f in rs[0]}
               for key, rs in results.items()}
    text = json.dumps({"env": env, "variants": dict(variants), "seconds": args.seconds,
                       "median": summary, "results": results}, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
