"""A local mesh: the cluster harness plus a CNI agent and a ztunnel per node, from manifests.

:class:`LocalMesh` reads Kubernetes manifests and builds what a real cluster would run: one
network namespace per node, a CNI node agent and a ztunnel on each node (connected by ZDS),
then every pod through CNI ADD with the reference plugins and our chained plugin, which asks
the agent to capture enrolled pods (iptables, nftables or eBPF) and hand them to ztunnel.
The harness plays the API server: it writes the cluster's objects, with pod IPs and status
filled in, to ``<run_dir>/manifests.yaml``, which the agents (labels) and ztunnels (mesh
configuration) watch.  Label changes there (``set_labels``) enroll or release running pods.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ambient.bpfmap import PIN_DIR
from ambient.ca import CertificateAuthority
from ambient.cluster import netlink
from ambient.cluster.cluster import CLUSTER_SERVICES_IP, UNDERLAY_BRIDGE, LocalCluster, PodHandle
from ambient.cluster.cni import CNI_PATH, CniError
from ambient.cluster.echo import http_get
from ambient.netns import netns_path, socket_in_netns
from cni.capture import default_backend_name
from cni.capture.base import BACKENDS
from cni.install import install_launcher

log = logging.getLogger("ambient.mesh")
ZTUNNEL_READY_TIMEOUT = 30.0
CONTROLPLANE_TLS_PORT = 15012
ISTIOD_HOST = "istiod.istio-system.svc"  # the DNS SAN of the control plane's certificate
AGENT_READY_PORT = 8000
PLUGIN_TYPE = "ambient-cni"
REPO = Path(__file__).resolve().parents[2]


class MeshError(RuntimeError):
    """The local mesh could not be built; the message says which step failed."""


@dataclass
class LocalMesh:
    manifests: Path
    name: str = "ambdemo"
    run_root: Path = Path("/run/ambient")
    capture: str = "auto"  # iptables | nftables | ebpf | auto (eBPF where the kernel allows)
    ztunnel_env: dict[str, str] = field(default_factory=dict)
    waypoint_extra_env: dict[str, str] = field(default_factory=dict)  # e.g. WAYPOINT_FILTERS
    cluster: LocalCluster | None = None
    objects: list[dict[str, Any]] = field(default_factory=list)
    pods: dict[str, PodHandle] = field(default_factory=dict)  # "ns/name" -> handle
    enrolled: set[str] = field(default_factory=set)  # "ns/name"
    ztunnels: dict[str, Any] = field(default_factory=dict)  # node -> process
    agents: dict[str, Any] = field(default_factory=dict)  # node -> process
    ztunnel_slot: dict[str, int] = field(default_factory=dict)  # node -> port slot (0 or 1)
    backend: str = ""  # the capture backend the agents use
    controlplane: Any = None  # the control plane process
    waypoints: dict[str, Any] = field(default_factory=dict)  # "ns/gateway" -> waypoint process

    @property
    def run_dir(self) -> Path:
        return self.run_root / self.name

    @property
    def manifests_path(self) -> Path:
        return self.run_dir / "manifests.yaml"

    # -- building -------------------------------------------------------------------------

    def up(self, progress: Any = print) -> LocalMesh:
        """Build the cluster the way a real node does: node agent and ztunnel first, then
        every pod through CNI ADD (reference plugins + our chained plugin)."""
        try:
            text = self.manifests.read_text(encoding="utf-8")
            self.objects = [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
        except (OSError, yaml.YAMLError) as e:
            raise MeshError(f"cannot read manifests {self.manifests}: {e}") from e
        pod_objs = [o for o in self.objects if o.get("kind") == "Pod"]
        if not pod_objs:
            raise MeshError(f"{self.manifests} has no Pod objects: nothing to run")
        for o in pod_objs:  # the API server would assign these
            o.setdefault("metadata", {}).setdefault("uid", str(uuid.uuid4()))
        nodes = sorted({(o.get("spec") or {}).get("nodeName") or "node-a" for o in pod_objs})
        self.backend = resolve_backend(self.capture)
        progress(f"creating cluster {self.name}: nodes {', '.join(nodes)}; "
                 f"capture backend: {self.backend}")
        self.cluster = LocalCluster(self.name, nodes, run_dir=str(self.run_dir))
        bin_dir = self.run_dir / "cni-bin"
        self.cluster.cni_path = f"{CNI_PATH}:{bin_dir}"
        self.cluster.create()
        write_plugin_launcher(bin_dir)
        self.write_manifests()
        CertificateAuthority.generate().save_dir(self.run_dir / "ca")
        self.start_controlplane(nodes)
        progress(f"  control plane: delta xDS + CA on {CLUSTER_SERVICES_IP}:15012 (mTLS), "
                 f"reading {self.manifests_path}")
        for node in nodes:
            self.start_agent(node)
            self.start_ztunnel(node)
        for node in nodes:
            self.wait_ready(node)
            progress(f"  node {node}: CNI agent ({self.backend}) and ztunnel are ready")
            self.cluster.chain_by_node[node] = [{
                "type": PLUGIN_TYPE, "name": PLUGIN_TYPE,
                "cni_agent_run_dir": str(self.agent_dir(node)),
                "exclude_namespaces": ["kube-system", "istio-system"],
                "plugin_log_level": "info",
            }]
        for o in pod_objs:
            meta, spec = o.get("metadata") or {}, o.get("spec") or {}
            ns = meta.get("namespace", "default")
            try:
                pod = self.cluster.add_pod(
                    meta["name"], ns, spec.get("nodeName") or nodes[0],
                    service_account=spec.get("serviceAccountName", "default"),
                    labels=meta.get("labels") or {}, uid=meta["uid"],
                )
            except CniError as e:
                raise MeshError(f"CNI ADD of pod {ns}/{meta['name']} failed: {e}") from e
            self.pods[f"{ns}/{pod.name}"] = pod
            self.cluster.start_echo(pod)
            progress(f"  pod {ns}/{pod.name}: {pod.ip} on {pod.node}")
        self.write_manifests()
        self.start_waypoints(progress)
        self.refresh_enrolled()
        for key in sorted(self.enrolled):
            progress(f"  {key} is captured ({self.backend}) and served by its node's ztunnel")
        self.wait_config()
        return self

    def start_controlplane(self, nodes: list[str],
                           timeout: float = ZTUNNEL_READY_TIMEOUT) -> Any:
        """The control plane in the underlay netns (reachable from every node): it watches
        the cluster's manifests, serves delta xDS and signs certificates on
        CLUSTER_SERVICES_IP:15012 (TLS), and mints each node's ztunnel token."""
        assert self.cluster is not None
        argv = [sys.executable, "-m", "ambient.cli", "controlplane",
                "--manifests", str(self.manifests_path),
                "--xds-plain", "127.0.0.1:15010",
                "--xds-tls", f"{CLUSTER_SERVICES_IP}:{CONTROLPLANE_TLS_PORT}",
                "--ca-dir", str(self.run_dir / "ca"),
                "--node-token-dir", str(self.run_dir / "tokens")]
        self.controlplane = self.cluster.start_cluster_process("controlplane", argv, env=_env())
        deadline = time.monotonic() + timeout
        node_ns = self.cluster.nodes[nodes[0]].netns
        while time.monotonic() < deadline:
            if self.controlplane.popen is not None and self.controlplane.popen.poll() is not None:
                break
            if all((self.run_dir / "tokens" / n).exists() for n in nodes) and _listening(
                    node_ns, CLUSTER_SERVICES_IP, CONTROLPLANE_TLS_PORT):
                return self.controlplane
            time.sleep(0.2)
        raise MeshError(f"the control plane did not start; see {self.controlplane_log_path}")

    @property
    def controlplane_log_path(self) -> Path:
        return self.run_dir / "logs" / "_controlplane.log"

    def agent_dir(self, node: str) -> Path:
        return self.run_dir / "nodes" / node / "cni-agent"

    def zds_socket(self, node: str) -> Path:
        return self.run_dir / "nodes" / node / "ztunnel.sock"

    def bpf_pin_dir(self, node: str) -> str:
        """Where ``node``'s agent pins the eBPF maps its ztunnel reads."""
        return os.path.join(PIN_DIR, f"{self.name}-{node}")

    def start_agent(self, node: str) -> Any:
        """Start (or restart) the node's CNI agent and wait until it answers /readyz."""
        assert self.cluster is not None
        argv = [sys.executable, "-m", "cni.agent_main", "run", "--node-name", node,
                "--run-dir", str(self.agent_dir(node)), "--zds-socket", str(self.zds_socket(node)),
                "--capture", self.backend, "--manifests", str(self.manifests_path),
                "--ready-addr", f"127.0.0.1:{AGENT_READY_PORT}"]
        # Every backend gets its own pin dir: the agent also pins the same-node splice maps.
        argv += ["--bpf-pin-dir", self.cluster.own_path(self.bpf_pin_dir(node))]
        if self.backend == "ebpf":
            cg = self.cluster.pods_cgroup(node)
            self.cluster._record_node_cgroup(cg)
            os.makedirs(cg, exist_ok=True)
            argv += ["--cgroup", cg]
        self.agents[node] = self.cluster.start_node_process(node, argv, env=_env(),
                                                            log_name=f"_agent_{node}")
        self._wait_http(node, AGENT_READY_PORT, "/readyz", "CNI agent", self.agents[node],
                        log=self.agent_log_path(node))
        return self.agents[node]

    def start_ztunnel(self, node: str, slot: int = 0) -> Any:
        """Start a ztunnel on ``node`` whose admin ports use ``slot`` (0: 15000/15020/15021,
        1: +100), so a second one can overlap with the first during a restart."""
        assert self.cluster is not None
        off = 100 * slot
        cp = f"https://{CLUSTER_SERVICES_IP}:{CONTROLPLANE_TLS_PORT}"
        root = str(self.run_dir / "ca" / "root-cert.pem")
        env = {
            "XDS_ADDRESS": cp, "XDS_ROOT_CA": root, "ALT_XDS_HOSTNAME": ISTIOD_HOST,
            "CA_ADDRESS": cp, "CA_ROOT_CA": root, "ALT_CA_HOSTNAME": ISTIOD_HOST,
            "AUTH_TOKEN": str(self.run_dir / "tokens" / node),
            "POD_NAME": f"ztunnel-{node}", "POD_NAMESPACE": "istio-system",
            "INSTANCE_IP": self.cluster.nodes[node].underlay_ip,
            "NODE_NAME": node,
            "INPOD_UDS": str(self.zds_socket(node)),
            "ADMIN_ADDR": f"127.0.0.1:{15000 + off}",
            "STATS_ADDR": f"0.0.0.0:{15020 + off}",
            "READINESS_ADDR": f"0.0.0.0:{15021 + off}",
            "RUST_LOG": "info",
            **_env(),
            **self.ztunnel_env,
        }
        env["BPF_PIN_DIR"] = self.bpf_pin_dir(node)
        proc = self.cluster.start_node_process(node, [sys.executable, "-m", "ztunnel"], env=env)
        self.ztunnels[node] = proc
        self.ztunnel_slot[node] = slot
        return proc

    # -- waypoints (what Istio's gateway deployment controller does) -----------------------

    def start_waypoints(self, progress: Any = print) -> None:
        """For every Gateway of class ``istio-waypoint``: a waypoint pod and its Service."""
        gateways = waypoint_gateways(self.objects)
        if not gateways:
            return
        self.route_pods_to_services()
        for gw in gateways:
            key = self.add_waypoint(gw)
            pod = self.pods[key]
            progress(f"  waypoint {key}: pod {pod.ip} on {pod.node}, Service "
                     f"{waypoint_service_vip(self.objects, key)}:15008, ready")

    def route_pods_to_services(self) -> None:
        """Routes in the underlay to every pod CIDR, so pods (a waypoint asking the CA for
        its certificate) reach the control plane on CLUSTER_SERVICES_IP."""
        assert self.cluster is not None
        for h in self.cluster.nodes.values():
            with contextlib.suppress(netlink.NetlinkError):  # already there (idempotent)
                netlink.add_route(self.cluster.underlay, h.pod_cidr, via=h.underlay_ip,
                                  dev=UNDERLAY_BRIDGE)

    def add_waypoint(self, gateway: dict[str, Any]) -> str:
        """Create the waypoint pod (CNI ADD, not captured) and Service of one Gateway, start
        ``python -m waypoint`` in it and wait until it is ready; returns ``ns/name``."""
        assert self.cluster is not None
        meta = gateway.get("metadata") or {}
        ns, name = meta.get("namespace", "default"), meta["name"]
        node = pick_waypoint_node(gateway, self.objects, sorted(self.cluster.nodes))
        vip = allocate_service_vip(self.objects)
        objs = waypoint_manifests(gateway, node, vip)
        self.objects.extend(objs)
        self.write_manifests()  # the agent reads the pod's labels before the CNI ADD
        pod_obj = objs[0]
        try:
            pod = self.cluster.add_pod(name, ns, node, service_account=pod_obj["spec"][
                "serviceAccountName"], labels=pod_obj["metadata"]["labels"],
                uid=pod_obj["metadata"]["uid"])
        except CniError as e:
            raise MeshError(f"CNI ADD of waypoint pod {ns}/{name} failed: {e}") from e
        self.pods[f"{ns}/{name}"] = pod
        self.write_manifests()
        self.start_waypoint(f"{ns}/{name}")
        return f"{ns}/{name}"

    def waypoint_env(self, key: str) -> dict[str, str]:
        pod = self.pods[key]
        cp = f"https://{CLUSTER_SERVICES_IP}:{CONTROLPLANE_TLS_PORT}"
        return {
            "WAYPOINT_NAME": pod.name, "POD_NAME": pod.name, "POD_NAMESPACE": pod.namespace,
            "SERVICE_ACCOUNT": pod.service_account, "NODE_NAME": pod.node,
            "INSTANCE_IP": pod.ip, "LOCAL_MANIFESTS_PATH": str(self.manifests_path),
            "CA_ADDRESS": cp, "CA_ROOT_CA": str(self.run_dir / "ca" / "root-cert.pem"),
            "ALT_CA_HOSTNAME": ISTIOD_HOST,
            "AUTH_TOKEN": str(self.run_dir / "tokens" / f"waypoint.{pod.namespace}.{pod.name}"),
            "RUST_LOG": "info", **_env(), **self.waypoint_extra_env,
        }

    def start_waypoint(self, key: str, timeout: float = ZTUNNEL_READY_TIMEOUT) -> Any:
        """Start (or restart) ``python -m waypoint`` in its pod; wait for :15021 ready."""
        assert self.cluster is not None
        pod = self.pods[key]
        proc = self.cluster.start_app(pod, [sys.executable, "-m", "waypoint"],
                                      env=self.waypoint_env(key))
        self.waypoints[key] = proc
        deadline, last = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            if proc.popen is not None and proc.popen.poll() is not None:
                raise MeshError(f"waypoint {key} exited; see {self.cluster.log_path(pod.name)}")
            try:
                status, body = http_get(pod.netns, "127.0.0.1", WAYPOINT_READY_PORT,
                                        "/healthz/ready", timeout=2)
                if status == 200:
                    return proc
                last = f"{status} {body}"
            except OSError as e:
                last = str(e)
            time.sleep(0.2)
        raise MeshError(f"waypoint {key} not ready after {timeout}s ({last}); see "
                        f"{self.cluster.log_path(pod.name)}")

    def stop_waypoint(self, key: str) -> None:
        """Stop the waypoint's process (its pod and Service stay: traffic must fail closed)."""
        assert self.cluster is not None
        proc = self.waypoints.pop(key, None)
        if proc is not None:
            self.cluster.stop_process(proc)

    def waypoint_metrics(self, key: str) -> str:
        """The waypoint's Prometheus text (:15020/stats/prometheus, from inside its pod)."""
        status, body = http_get(self.pods[key].netns, "127.0.0.1", 15020,
                                "/stats/prometheus", timeout=5)
        if status != 200:
            raise MeshError(f"metrics of waypoint {key} answered {status}")
        return str(body.get("raw", ""))

    def restart_ztunnel(self, node: str) -> None:
        """A rolling restart: the new ztunnel gets the snapshot and binds (SO_REUSEPORT)
        while the old one still serves; then the old one drains (SIGTERM)."""
        assert self.cluster is not None
        old, old_slot = self.ztunnels[node], self.ztunnel_slot[node]
        self.start_ztunnel(node, 1 - old_slot)
        self.wait_ready(node)
        self.cluster.stop_process(old)

    def refresh_enrolled(self) -> None:
        """Which pods the agents captured and ztunnels acknowledged (from the agents)."""
        self.enrolled = set()
        for node in self.agents:
            status, body = http_get(self.node_netns(node), "127.0.0.1", AGENT_READY_PORT,
                                    "/debug/pods", timeout=5)
            pods = body.get("pods") if status == 200 else None
            if isinstance(pods, list):
                for p in pods:
                    if p.get("captured"):
                        self.enrolled.add(f"{p['namespace']}/{p['name']}")

    def hold(self, src: str, host: str, port: int, max_seconds: float = 60.0) -> HeldApp:
        """A long-lived connection made by one of ``src``'s applications (see ``echo hold``)."""
        assert self.cluster is not None
        name = f"hold-{src.replace('/', '-')}-{int(time.monotonic() * 1000) % 100000}"
        proc = self.cluster.start_app(
            self.pods[src], [sys.executable, "-m", "ambient.cluster.echo", "hold", "--host",
                             host, "--port", str(port), "--max-seconds", str(max_seconds)],
            env=_env(), log_name=name)
        return HeldApp(proc, Path(self.cluster.log_path(name)))

    def apply_object(self, obj: dict[str, Any]) -> None:
        """Create or replace one object in the cluster's manifests (``kubectl apply``)."""
        meta = obj.get("metadata") or {}
        self.delete_object(str(obj.get("kind")), str(meta.get("namespace", "default")),
                           str(meta.get("name")), missing_ok=True)
        self.objects.append(copy.deepcopy(obj))
        self.write_manifests()

    def delete_object(self, kind: str, namespace: str, name: str, *,
                      missing_ok: bool = False) -> None:
        """Remove one object from the cluster's manifests (``kubectl delete``)."""
        keep = [o for o in self.objects if not _is_object(o, kind, namespace, name)]
        if len(keep) != len(self.objects):
            self.objects = keep
            self.write_manifests()
        elif not missing_ok:
            raise MeshError(f"no {kind} {namespace}/{name} in the manifests")

    def update_object(self, kind: str, namespace: str, name: str,
                      change: Callable[[dict[str, Any]], None]) -> None:
        """Edit one object of the cluster's manifests in place (``kubectl edit``)."""
        for o in self.objects:
            if _is_object(o, kind, namespace, name):
                change(o)
                self.write_manifests()
                return
        raise MeshError(f"no {kind} {namespace}/{name} in the manifests")

    def set_labels(self, kind: str, namespace: str, name: str,
                   labels: dict[str, str | None]) -> None:
        """Change labels of an object in the cluster's manifests (``None`` removes one), as
        ``kubectl label`` would; agents and ztunnels pick the change up."""
        def change(o: dict[str, Any]) -> None:
            cur = (o.get("metadata") or {}).setdefault("labels", {})
            for k, v in labels.items():
                if v is None:
                    cur.pop(k, None)
                else:
                    cur[k] = v

        self.update_object(kind, namespace, name, change)

    def write_manifests(self) -> None:
        """The cluster state (objects + pod status) every component reads, written atomically."""
        tmp = self.manifests_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump_all(self._with_status()), encoding="utf-8")
        os.replace(tmp, self.manifests_path)

    def wait_config(self, timeout: float = ZTUNNEL_READY_TIMEOUT) -> None:
        """Wait until every ztunnel knows every pod's address (config propagated)."""
        want = {p.ip for p in self.pods.values()}
        deadline = time.monotonic() + timeout
        for node in self.ztunnels:
            while True:
                dump = self.config_dump(node)
                have = {a.split("/")[-1] for w in dump.get("workloads", [])
                        for a in w.get("workloadIps", w.get("addresses", []))}
                if want <= have or time.monotonic() > deadline:
                    break
                time.sleep(0.2)

    def _with_status(self) -> list[dict[str, Any]]:
        out = []
        for o in self.objects:
            o = copy.deepcopy(o)
            if o.get("kind") == "Pod":
                meta = o.setdefault("metadata", {})
                key = f"{meta.get('namespace', 'default')}/{meta['name']}"
                pod = self.pods.get(key)
                if pod is not None:
                    o.setdefault("spec", {})["nodeName"] = pod.node
                    o["status"] = {
                        "phase": "Running", "podIP": pod.ip, "podIPs": [{"ip": pod.ip}],
                        "conditions": [{"type": "Ready", "status": "True"}],
                    }
                    meta["uid"] = pod.uid
            out.append(o)
        return out

    # -- observing ------------------------------------------------------------------------

    def node_netns(self, node: str) -> str:
        assert self.cluster is not None
        return self.cluster.nodes[node].netns

    def port(self, node: str, base: int) -> int:
        """The current ztunnel's admin/stats/readiness port (``base`` + its slot offset)."""
        return base + 100 * self.ztunnel_slot.get(node, 0)

    def wait_ready(self, node: str, timeout: float = ZTUNNEL_READY_TIMEOUT) -> None:
        self._wait_http(node, self.port(node, 15021), "/healthz/ready", "ztunnel",
                        self.ztunnels[node], timeout)

    def _wait_http(self, node: str, port: int, path: str, what: str, proc: Any,
                   timeout: float = ZTUNNEL_READY_TIMEOUT, log: Path | None = None) -> None:
        log = log or self.log_path(node)
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if proc.popen is not None and proc.popen.poll() is not None:
                raise MeshError(f"{what} on {node} exited; see {log}")
            try:
                status, body = http_get(self.node_netns(node), "127.0.0.1", port, path,
                                        timeout=2)
                if status == 200:
                    return
                last = f"{status} {body}"
            except OSError as e:
                last = str(e)
            time.sleep(0.2)
        raise MeshError(f"{what} on {node} not ready after {timeout}s ({last}); see {log}")

    def log_path(self, node: str) -> Path:
        """ztunnel's log on ``node`` (both instances of a rolling restart append to it)."""
        return self.run_dir / "logs" / f"_node_{node}.log"

    def agent_log_path(self, node: str) -> Path:
        return self.run_dir / "logs" / f"_agent_{node}.log"

    def metrics(self, node: str) -> str:
        status, body = http_get(self.node_netns(node), "127.0.0.1", self.port(node, 15020),
                                "/metrics", timeout=5)
        if status != 200:
            raise MeshError(f"metrics of ztunnel on {node} answered {status}")
        return str(body.get("raw", ""))  # Prometheus text is not JSON: http_get keeps it raw

    def config_dump(self, node: str) -> dict[str, Any]:
        status, body = http_get(self.node_netns(node), "127.0.0.1", self.port(node, 15000),
                                "/config_dump", timeout=5)
        if status != 200:
            raise MeshError(f"config_dump of ztunnel on {node} answered {status}")
        return body

    def down(self) -> list[str]:
        if self.cluster is None:
            return []
        errors = self.cluster.destroy()
        self.cluster = None
        if not errors:
            remove_run_dir(self.run_dir)
        return errors


@dataclass
class HeldApp:
    """A pod application holding one connection open (``echo hold``); ``state`` reads its log:
    ``connected``, ``closed``, ``failed``, ``timeout`` or ``starting``."""

    proc: Any
    log: Path

    def state(self) -> str:
        try:
            lines = self.log.read_text().split()
        except FileNotFoundError:
            return "starting"
        for word in ("closed", "failed", "timeout", "connected"):
            if word in lines:
                return word
        return "starting"


WAYPOINT_CLASS = "istio-waypoint"
WAYPOINT_READY_PORT = 15021
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
WAYPOINT_NODE_ANNOTATION = "ambient.io/node"  # (ours) where the local mesh runs a waypoint


def _is_object(o: dict[str, Any], kind: str, namespace: str, name: str) -> bool:
    """``o`` is the object ``kind`` ``namespace``/``name`` (namespaces have no namespace)."""
    meta = o.get("metadata") or {}
    return o.get("kind") == kind and meta.get("name") == name and (
        kind == "Namespace" or meta.get("namespace", "default") == namespace)


def waypoint_gateways(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o.get("kind") == "Gateway"
            and (o.get("spec") or {}).get("gatewayClassName") == WAYPOINT_CLASS]


def pick_waypoint_node(gateway: dict[str, Any], objects: list[dict[str, Any]],
                       nodes: list[str]) -> str:
    """The annotation ``ambient.io/node`` if it names a node, else the node with the fewest
    pods (ties: by name)."""
    wanted = ((gateway.get("metadata") or {}).get("annotations") or {}).get(
        WAYPOINT_NODE_ANNOTATION)
    if wanted in nodes:
        return str(wanted)
    count = {n: 0 for n in nodes}
    for o in objects:
        n = (o.get("spec") or {}).get("nodeName") if o.get("kind") == "Pod" else None
        if n in count:
            count[n] += 1
    return min(nodes, key=lambda n: (count[n], n))


def allocate_service_vip(objects: list[dict[str, Any]]) -> str:
    """An unused ClusterIP in 10.96.100.0/22 (what the API server would allocate)."""
    used = {str((o.get("spec") or {}).get("clusterIP")) for o in objects
            if o.get("kind") == "Service"}
    for i in range(4 * 254):
        vip = f"10.96.{100 + i // 254}.{i % 254 + 1}"
        if vip not in used:
            return vip
    raise MeshError("no free ClusterIP left in 10.96.100.0/22 for a waypoint Service")


def waypoint_service_vip(objects: list[dict[str, Any]], key: str) -> str:
    ns, _, name = key.partition("/")
    for o in objects:
        meta = o.get("metadata") or {}
        if o.get("kind") == "Service" and meta.get("namespace") == ns and meta.get("name") == name:
            return str((o.get("spec") or {}).get("clusterIP"))
    return "?"


def waypoint_manifests(gateway: dict[str, Any], node: str, vip: str) -> list[dict[str, Any]]:
    """The Pod, Service and ServiceAccount Istio's deployment controller makes for a waypoint
    Gateway: pod and account named like the Gateway, the pod not captured
    (``istio.io/dataplane-mode: none``), the Service on 15008 (``mesh``) selecting the pod and
    marked as managed (so it gets no waypoint itself)."""
    meta = gateway.get("metadata") or {}
    ns, name = meta.get("namespace", "default"), meta["name"]
    labels = {GATEWAY_NAME_LABEL: name, "istio.io/dataplane-mode": "none",
              "gateway.istio.io/managed": "istio.io-mesh-controller"}
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "labels": labels,
                        "uid": str(uuid.uuid4())},
           "spec": {"nodeName": node, "serviceAccountName": name,
                    "containers": [{"name": "istio-proxy", "ports": [
                        {"name": "mesh", "containerPort": 15008},
                        {"name": "http-envoy-prom", "containerPort": 15020},
                        {"name": "status-port", "containerPort": 15021}]}]}}
    svc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": ns,
                        "labels": {GATEWAY_NAME_LABEL: name,
                                   "gateway.istio.io/managed": "istio.io-mesh-controller"}},
           "spec": {"clusterIP": vip, "selector": {GATEWAY_NAME_LABEL: name},
                    "ports": [{"name": "mesh", "port": 15008, "targetPort": 15008}]}}
    sa = {"apiVersion": "v1", "kind": "ServiceAccount",
          "metadata": {"name": name, "namespace": ns}}
    return [pod, svc, sa]


def remove_run_dir(run_dir: Path) -> None:
    """Remove what the mesh wrote into its run dir (CA, manifests, pods files), then the dir."""
    for d in ("ca", "nodes", "cni-bin", "tokens"):
        shutil.rmtree(run_dir / d, ignore_errors=True)
    for f in [run_dir / "manifests.yaml", run_dir / "manifests.tmp"]:
        f.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        run_dir.rmdir()  # only if nothing else (logs kept on purpose) is left


def resolve_backend(capture: str) -> str:
    """``auto`` -> eBPF where this machine supports it, else iptables (with the reason)."""
    if capture != "auto":
        if capture not in BACKENDS:
            raise MeshError(f"unknown capture backend {capture!r}; choose one of "
                            f"{', '.join(BACKENDS)}")
        return capture
    name = default_backend_name()
    if name != "ebpf":
        log.warning("eBPF capture is not available here; using iptables")
    return name


def write_plugin_launcher(bin_dir: Path) -> Path:
    """Our CNI plugin as the runtime calls it: an executable with absolute paths baked in
    (runtimes give plugins a minimal environment)."""
    install_launcher(str(bin_dir), sys.executable, str(REPO))
    return bin_dir / PLUGIN_TYPE


def _listening(netns: str, host: str, port: int) -> bool:
    try:
        with socket_in_netns(netns_path(netns)) as s:
            s.settimeout(1.0)
            s.connect((host, port))
        return True
    except OSError:
        return False


def _env() -> dict[str, str]:
    return {"PYTHONPATH": str(REPO), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


def ensure_root() -> None:
    if os.geteuid() != 0:
        raise MeshError("the local mesh needs root (network namespaces, iptables); "
                        "run `sudo make demo`")
