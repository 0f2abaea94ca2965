"""LocalCluster: nodes and pods as network namespaces on this machine.

Topology of a cluster ``<name>`` with nodes n_1..n_k (index i starts at 1):
- ``<name>-underlay``: a netns holding the Linux bridge ``br0`` that joins all nodes.
- ``<name>-<node>``: one netns per node, linked to the underlay by a veth (``ul0`` in the node,
  ``n<i>`` on the bridge) with address ``172.30.0.<i>/24``; pod CIDR ``10.244.<i>.0/24``
  behind the CNI bridge ``cni0``; routes to every other node's pod CIDR via its underlay IP;
  ``ip_forward=1``.
- ``<name>-p-<pod>``: one netns per pod, networked by the real CNI reference plugins run inside
  the node netns (``loopback`` network, then ``bridge`` + ``host-local``; ``pod_network``'s
  plugin list is the chain to extend).  Pod processes live in
  ``<cgroup2>/ambient/<name>/<pod>``.

Invariants:
- Nothing touches the host netns.  Every object is recorded in ``<run_dir>/state.json``
  *before* it is created, so ``destroy_from_state(run_dir)`` can remove everything after a
  crash or from another process, and ``create()`` first sweeps a crashed run's leftovers.
- Removal is idempotent and never raises half-way: each step is attempted, errors are
  collected and returned.
- Pod names are unique per cluster (across Kubernetes namespaces) and DNS-label-like.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ambient.cluster import cgroups, netlink
from ambient.cluster.cni import (
    CNI_PATH,
    CniNetwork,
    CniRuntime,
    bridge_network,
    loopback_network,
    result_ipv4,
)
from ambient.cluster.echo import ProbeResult, wait_listening
from ambient.netns import netns_path as ns_path

log = logging.getLogger(__name__)

DEFAULT_RUN_ROOT = "/run/ambient"
UNDERLAY_BRIDGE = "br0"
#: The underlay's own address (on br0, in the underlay netns): where cluster-wide services
#: such as the control plane listen, reachable from every node.
CLUSTER_SERVICES_IP = "172.30.0.254"
NODE_UPLINK = "ul0"
STATE_VERSION = 1
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,28}[a-z0-9])?$")
_STATE_FILE = "state.json"


class ClusterError(RuntimeError):
    """The cluster cannot be built as asked (name clash, a live owner, bad names)."""


def _check_name(kind: str, name: str) -> None:
    if not _NAME_RE.match(name):
        raise ValueError(f"{kind} name {name!r}: use 1-30 lowercase letters, digits and '-'")


def underlay_ip(index: int) -> str:
    return f"172.30.0.{index}"


def pod_cidr(index: int) -> str:
    return f"10.244.{index}.0/24"


@dataclass
class NodeHandle:
    name: str
    index: int
    netns: str
    underlay_ip: str
    pod_cidr: str
    cni_data_dir: str

    @property
    def netns_path(self) -> str:
        return ns_path(self.netns)


@dataclass
class PodHandle:
    name: str
    namespace: str
    node: str
    netns: str
    netns_path: str
    ip: str
    cgroup: str
    container_id: str
    uid: str
    service_account: str = "default"
    labels: dict[str, str] = field(default_factory=dict)
    cni_result: dict[str, Any] = field(default_factory=dict)
    cni_network: dict[str, Any] = field(default_factory=dict)  # the conflist used for ADD


class LocalCluster:
    """A cluster of namespaces.  Use as a context manager or call create()/destroy()."""

    def __init__(self, name: str | None = None, nodes: Sequence[str] = ("node1", "node2"),
                 run_dir: str | None = None) -> None:
        self.name = name or f"amb{secrets.token_hex(3)}"
        _check_name("cluster", self.name)
        if not nodes or len(nodes) > 250 or len(set(nodes)) != len(nodes):
            raise ValueError("a cluster needs 1..250 distinct nodes")
        for n in nodes:
            _check_name("node", n)
        self.node_names = list(nodes)
        self.run_dir = run_dir or os.path.join(DEFAULT_RUN_ROOT, self.name)
        self.underlay = f"{self.name}-underlay"
        self.cgroup_base = os.path.join(cgroups.cgroup2_mount(), cgroups.CGROUP_ROOT_NAME,
                                        self.name)
        self.nodes: dict[str, NodeHandle] = {}
        self.pods: dict[str, PodHandle] = {}
        self.processes: list[cgroups.PodProcess] = []
        self._proc_owner: dict[int, str] = {}
        self._lock = threading.RLock()
        self._state: dict[str, Any] = {}
        self.loopback_network: CniNetwork = loopback_network()
        #: Plugin configs appended after ``bridge`` on every node (e.g. our chained plugin);
        #: set before adding pods.  Each pod records the conflist it was added with.
        self.chain: list[dict[str, Any]] = []
        #: Per-node chain overrides (a node agent per node has its own socket directory).
        self.chain_by_node: dict[str, list[dict[str, Any]]] = {}
        #: CNI_PATH for the runtime (colon-separated); add the directory of our plugin.
        self.cni_path: str = CNI_PATH

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> LocalCluster:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        errors = self.destroy()
        if errors:
            log.warning("cluster %s: cleanup errors: %s", self.name, errors)

    @property
    def state_path(self) -> str:
        return os.path.join(self.run_dir, _STATE_FILE)

    def create(self) -> LocalCluster:
        """Build underlay and nodes.  Leftovers of a crashed run in ``run_dir`` go first.

        Raises ClusterError if a live process (this one included) owns ``run_dir``, or a
        namespace name is taken; ``destroy_from_state(run_dir)`` is the explicit way out.
        """
        prev = load_state(self.run_dir)
        if prev is not None and _owner_alive(prev):
            raise ClusterError(f"cluster {prev.get('cluster')} in {self.run_dir} is in use by "
                               f"pid {prev.get('owner_pid')}; stop it or run `ambientctl down`")
        if prev is not None:
            errs = destroy_from_state(self.run_dir)
            if errs:
                log.warning("sweeping previous run of %s: %s", self.name, errs)
        os.makedirs(self.run_dir, exist_ok=True)
        self._state = {
            "version": STATE_VERSION, "cluster": self.name, "run_dir": self.run_dir,
            "owner_pid": os.getpid(), "owner_start": cgroups.process_start_time(os.getpid()),
            "underlay": self.underlay, "cgroup_base": self.cgroup_base, "cni_path": self.cni_path,
            "netns": [], "nodes": {}, "pods": {}, "processes": [],
        }
        planned = [self.underlay] + [f"{self.name}-{n}" for n in self.node_names]
        clash = [ns for ns in planned if netlink.netns_exists(ns)]
        if clash:
            raise ClusterError(f"netns {clash} already exist (not recorded in "
                               f"{self.state_path}); delete them with `ip netns del`")
        try:
            self._record_netns(self.underlay)
            netlink.create_netns(self.underlay)
            netlink.add_bridge(self.underlay, UNDERLAY_BRIDGE)
            netlink.add_address(self.underlay, UNDERLAY_BRIDGE, f"{CLUSTER_SERVICES_IP}/24")
            for i, node in enumerate(self.node_names, start=1):
                self._create_node(node, i)
            for h in self.nodes.values():
                for other in self.nodes.values():
                    if other is not h:
                        netlink.add_route(h.netns, other.pod_cidr, via=other.underlay_ip,
                                          dev=NODE_UPLINK)
        except BaseException:
            self.destroy()
            raise
        return self

    def _create_node(self, node: str, index: int) -> None:
        ns = f"{self.name}-{node}"
        h = NodeHandle(node, index, ns, underlay_ip(index), pod_cidr(index),
                       os.path.join(self.run_dir, "cni", node))
        with self._lock:
            self._state["nodes"][node] = asdict(h)
            self._record_netns(ns)
        netlink.create_netns(ns)
        netlink.add_veth(self.underlay, f"n{index}", ns, NODE_UPLINK)
        netlink.set_master(self.underlay, f"n{index}", UNDERLAY_BRIDGE)
        netlink.add_address(ns, NODE_UPLINK, f"{h.underlay_ip}/24")
        for key, val in (("net.ipv4.ip_forward", 1), ("net.ipv4.conf.all.rp_filter", 0),
                         ("net.ipv4.conf.default.rp_filter", 0)):
            netlink.set_sysctl(ns, key, val)
        os.makedirs(h.cni_data_dir, exist_ok=True)
        self.nodes[node] = h

    def pod_network(self, node: str) -> CniNetwork:
        """The node's pod network (bridge + host-local).  Extend ``chain`` to chain plugins."""
        h = self.nodes[node]
        net = bridge_network("ambient-pods", h.pod_cidr, os.path.join(h.cni_data_dir, "ipam"))
        net.plugins.extend(self.chain_by_node.get(node, self.chain))
        return net

    def cni_runtime(self, node: str, pod: PodHandle | None = None) -> CniRuntime:
        """The runtime for ``node``; with ``pod``, CNI_ARGS carry its Kubernetes identity."""
        args = pod_cni_args(pod.name, pod.namespace, pod.uid, pod.container_id) if pod else {}
        return CniRuntime(exec_netns=self.nodes[node].netns, cni_path=self.cni_path, args=args)

    # ------------------------------------------------------------------ pods

    def add_pod(self, name: str, namespace: str = "default", node: str | None = None, *,
                service_account: str = "default", labels: dict[str, str] | None = None,
                uid: str | None = None) -> PodHandle:
        """Create the pod netns and cgroup, run CNI ADD; returns the pod's handle."""
        _check_name("pod", name)
        node = node or self.node_names[0]
        if node not in self.nodes:
            raise KeyError(f"unknown node {node!r}; nodes are {sorted(self.nodes)}")
        if name in self.pods:
            raise ValueError(f"pod {name!r} already exists in cluster {self.name}")
        ns = f"{self.name}-p-{name}"
        if netlink.netns_exists(ns):
            raise ClusterError(f"netns {ns} already exists; delete it with `ip netns del {ns}`")
        pod = PodHandle(name=name, namespace=namespace, node=node, netns=ns,
                        netns_path=ns_path(ns), ip="",
                        cgroup=cgroups.pod_cgroup_path(self.name, name, node),
                        container_id=f"{self.name}-{name}", uid=uid or str(uuid.uuid4()),
                        service_account=service_account, labels=dict(labels or {}))
        network = self.pod_network(node)
        pod.cni_network = network.to_conflist()
        self._record_node_cgroup(self.pods_cgroup(node))
        with self._lock:
            self._state["pods"][name] = asdict(pod)
            self._record_netns(ns)
        try:
            netlink.create_netns(ns)
            cgroups.create_cgroup(pod.cgroup)
            rt = self.cni_runtime(node, pod)
            rt.add(self.loopback_network, pod.container_id, pod.netns_path, "lo")
            result = rt.add(network, pod.container_id, pod.netns_path)
            pod.cni_result = result
            pod.ip = result_ipv4(result)
        except BaseException:
            self.pods[name] = pod
            self.remove_pod(name)
            raise
        with self._lock:
            self.pods[name] = pod
            self._state["pods"][name] = asdict(pod)
            self._save()
        return pod

    def cni_check(self, pod: str | PodHandle) -> None:
        """CNI CHECK against the cached ADD result (raises CniError on drift)."""
        p = self._pod(pod)
        self.cni_runtime(p.node, p).check(_network(p.cni_network), p.container_id, p.netns_path,
                                       p.cni_result)

    def cni_del(self, pod: str | PodHandle) -> None:
        """CNI DEL of the pod network (idempotent; the pod netns may already be gone)."""
        p = self._pod(pod)
        rt = self.cni_runtime(p.node, p)
        rt.delete(_network(p.cni_network), p.container_id, p.netns_path, p.cni_result or None)
        rt.delete(self.loopback_network, p.container_id, p.netns_path, None, "lo")

    def remove_pod(self, pod: str | PodHandle) -> list[str]:
        """Stop the pod's processes, CNI DEL, remove cgroup and netns.  Idempotent (an unknown
        pod is a no-op); returns the errors met, never raises."""
        if (pod.name if isinstance(pod, PodHandle) else pod) not in self.pods:
            return []
        p = self._pod(pod)
        errors: list[str] = []
        for proc in [x for x in self.processes if self._proc_owner.get(x.pid) == p.name]:
            _attempt(errors, f"stop pid {proc.pid}", cgroups.stop_process, proc)
            self._forget_process(proc)
        if netlink.netns_exists(self.nodes[p.node].netns):
            _attempt(errors, f"CNI DEL {p.name}", self.cni_del, p)
        _attempt(errors, f"cgroup {p.cgroup}", cgroups.remove_cgroup, p.cgroup)
        _attempt(errors, f"netns {p.netns}", netlink.delete_netns, p.netns)
        with self._lock:
            self.pods.pop(p.name, None)
            if not errors:  # on errors keep the record: destroy_from_state retries it
                self._state.get("pods", {}).pop(p.name, None)
                if p.netns in self._state.get("netns", []):
                    self._state["netns"].remove(p.netns)
            self._save()
        return errors

    # ------------------------------------------------------------------ processes

    def start_app(self, pod: str | PodHandle, argv: list[str], *,
                  env: dict[str, str] | None = None,
                  log_name: str | None = None) -> cgroups.PodProcess:
        """Start ``argv`` (absolute paths) in the pod's cgroup and netns; output to a log in
        ``<run_dir>/logs`` (``<pod>.log``, or ``<log_name>.log``).  Stopped by
        remove_pod/destroy."""
        p = self._pod(pod)
        return self._start(p.name, p.cgroup, p.netns, argv, env, log_name)

    def run_in_pod(self, pod: str | PodHandle, argv: list[str], *,
                   timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run a short-lived command as one of the pod's applications (its cgroup and netns,
        so every capture backend, cgroup-based eBPF included, sees it as the pod's)."""
        p = self._pod(pod)
        return cgroups.run_in_pod(p.cgroup, p.netns, argv, env=_python_env(), timeout=timeout)

    def probe(self, pod: str | PodHandle, host: str, port: int,
              timeout: float = 5.0) -> ProbeResult:
        """``tcp_probe`` from inside the pod, as its application."""
        cp = self.run_in_pod(pod, [sys.executable, "-m", "ambient.cluster.echo", "probe",
                                   "--host", host, "--port", str(port), "--timeout",
                                   str(timeout)], timeout=timeout + 30)
        try:
            d = json.loads(cp.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return ProbeResult(False, error=f"probe failed: {cp.stderr.strip()[-500:]}")
        return ProbeResult(bool(d["ok"]), d["greeting"], d["echoed"].encode(), d["error"])

    def start_echo(self, pod: str | PodHandle, tcp_port: int = 8080, http_port: int = 8081,
                   timeout: float = 15.0) -> cgroups.PodProcess:
        """Start the echo app in the pod and wait until it listens on ``tcp_port``."""
        p = self._pod(pod)
        proc = self.start_app(p, [sys.executable, "-m", "ambient.cluster.echo", "serve",
                                  "--tcp", str(tcp_port), "--http", str(http_port),
                                  "--name", p.name],
                              env=_python_env())
        for port in (tcp_port, http_port):
            if port and not wait_listening(proc.pid, port, timeout):
                raise RuntimeError(f"echo app in pod {p.name} is not listening on {port}; "
                                   f"see {self._log_path(p.name)}")
        return proc

    def start_node_process(self, node: str, argv: list[str], *,
                           env: dict[str, str] | None = None,
                           log_name: str | None = None) -> cgroups.PodProcess:
        """Start a node-level process (node agent, ztunnel) in the node netns, in the cgroup
        ``<cgroup2>/ambient/<cluster>/_node_<node>``.  Stopped by destroy()."""
        h = self.nodes[node]
        cg = os.path.join(self.cgroup_base, f"_node_{node}")
        self._record_node_cgroup(cg)
        cgroups.create_cgroup(cg)
        return self._start(f"_node_{node}", cg, h.netns, argv, env, log_name)

    def own_path(self, path: str) -> str:
        """Record a file or directory the cluster's processes create outside ``run_dir``
        (e.g. an eBPF pin directory), so destroy removes it, also after a crash."""
        with self._lock:
            self._state.setdefault("owned_paths", [])
            if path not in self._state["owned_paths"]:
                self._state["owned_paths"].append(path)
                self._save()
        return path

    def pods_cgroup(self, node: str) -> str:
        """The cgroup holding every pod of ``node`` (created with the first pod)."""
        return os.path.join(self.cgroup_base, f"pods-{node}")

    def _record_node_cgroup(self, cg: str) -> None:
        with self._lock:
            self._state.setdefault("node_cgroups", [])
            if cg not in self._state["node_cgroups"]:
                self._state["node_cgroups"].append(cg)
                self._save()

    def start_cluster_process(self, owner: str, argv: list[str], *,
                              env: dict[str, str] | None = None) -> cgroups.PodProcess:
        """Start a cluster-wide process (the control plane) in the underlay netns, reachable
        from every node at CLUSTER_SERVICES_IP; cgroup ``<base>/_<owner>``.  Stopped by
        destroy()."""
        _check_name("process owner", owner)
        cg = os.path.join(self.cgroup_base, f"_{owner}")
        self._record_node_cgroup(cg)
        cgroups.create_cgroup(cg)
        return self._start(f"_{owner}", cg, self.underlay, argv, env)

    def stop_process(self, proc: cgroups.PodProcess) -> None:
        cgroups.stop_process(proc)
        self._forget_process(proc)

    def _start(self, owner: str, cg: str, netns: str, argv: list[str],
               env: dict[str, str] | None, log_name: str | None = None) -> cgroups.PodProcess:
        os.makedirs(os.path.join(self.run_dir, "logs"), exist_ok=True)
        proc = cgroups.start_in_pod(cg, netns, argv, env=env,
                                    log_path=self._log_path(log_name or owner))
        with self._lock:
            self.processes.append(proc)
            self._proc_owner[proc.pid] = owner
            self._state["processes"].append({**proc.to_state(), "owner": owner})
            self._save()
        return proc

    def _forget_process(self, proc: cgroups.PodProcess) -> None:
        with self._lock:
            if proc in self.processes:
                self.processes.remove(proc)
            self._proc_owner.pop(proc.pid, None)
            self._state["processes"] = [x for x in self._state.get("processes", [])
                                        if x["pid"] != proc.pid]
            self._save()

    def log_path(self, name: str) -> str:
        """``<run_dir>/logs/<name>.log``: where a process started with ``name`` logs."""
        return self._log_path(name)

    def _log_path(self, owner: str) -> str:
        return os.path.join(self.run_dir, "logs", f"{owner}.log")

    # ------------------------------------------------------------------ teardown

    def destroy(self) -> list[str]:
        """Remove everything (idempotent); returns the errors met, never raises."""
        errors: list[str] = []
        for proc in list(self.processes):
            _attempt(errors, f"stop pid {proc.pid}", cgroups.stop_process, proc)
            self._forget_process(proc)
        for name in list(self.pods):
            errors += self.remove_pod(name)
        if os.path.exists(self.state_path):
            errors += destroy_from_state(self.run_dir)
        self.pods.clear()
        self.nodes.clear()
        if not errors:
            self._state = {}  # nothing left to record; never recreate the state file
        return errors

    # ------------------------------------------------------------------ helpers

    def _pod(self, pod: str | PodHandle) -> PodHandle:
        name = pod.name if isinstance(pod, PodHandle) else pod
        try:
            return self.pods[name]
        except KeyError:
            raise KeyError(f"no pod {name!r} in cluster {self.name}") from None

    def _record_netns(self, ns: str) -> None:
        with self._lock:
            if ns not in self._state["netns"]:
                self._state["netns"].append(ns)
            self._save()

    def _save(self) -> None:
        if not self._state:
            return
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self._state, f, indent=1, sort_keys=True)
        os.replace(tmp, self.state_path)


def pod_cni_args(name: str, namespace: str, uid: str, container_id: str) -> dict[str, str]:
    """CNI_ARGS as kubelet's runtimes pass them for a pod sandbox."""
    return {"K8S_POD_NAMESPACE": namespace, "K8S_POD_NAME": name,
            "K8S_POD_INFRA_CONTAINER_ID": container_id, "K8S_POD_UID": uid}


def _python_env() -> dict[str, str]:
    """Environment for Python apps in pods: this checkout importable, nothing else inherited."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": root,
            "PYTHONUNBUFFERED": "1", "LANG": "C.UTF-8"}


def _network(conflist: dict[str, Any]) -> CniNetwork:
    return CniNetwork(conflist["name"], list(conflist["plugins"]), conflist["cniVersion"])


def _attempt(errors: list[str], what: str, fn: Callable[..., object], *args: Any) -> None:
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - collected and reported by the caller
        errors.append(f"{what}: {exc}")


def _remove_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _owner_alive(st: dict[str, Any]) -> bool:
    pid, start = st.get("owner_pid"), st.get("owner_start")
    if not pid or start is None:
        return False
    return cgroups.process_start_time(int(pid)) == start


def load_state(run_dir: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(run_dir, _STATE_FILE)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def destroy_from_state(run_dir: str, keep_logs: bool = False) -> list[str]:
    """Remove everything a (possibly crashed, possibly other-process) cluster recorded in
    ``<run_dir>/state.json``.  Idempotent; returns errors, never raises."""
    errors: list[str] = []
    try:
        st = load_state(run_dir)
    except (OSError, ValueError) as exc:
        return [f"state {run_dir}: {exc}"]
    if st is None:
        return []
    for proc in st.get("processes", []):
        _attempt(errors, f"stop pid {proc.get('pid')}", cgroups.stop_process, proc)
    nodes = st.get("nodes", {})
    for pod in st.get("pods", {}).values():
        node = nodes.get(pod.get("node"), {})
        if node and pod.get("cni_network") and netlink.netns_exists(node["netns"]):
            def cni_del(pod: dict[str, Any] = pod, node: dict[str, Any] = node) -> None:
                rt = CniRuntime(exec_netns=node["netns"], cni_path=st.get("cni_path", CNI_PATH),
                                args=pod_cni_args(pod["name"], pod["namespace"], pod["uid"],
                                                  pod["container_id"]))
                rt.delete(_network(pod["cni_network"]), pod["container_id"], pod["netns_path"],
                          pod.get("cni_result") or None)
                rt.delete(loopback_network(), pod["container_id"], pod["netns_path"], None, "lo")
            _attempt(errors, f"CNI DEL {pod.get('name')}", cni_del)
        _attempt(errors, f"cgroup {pod.get('cgroup')}", cgroups.remove_cgroup, pod["cgroup"])
    for path in st.get("owned_paths", []):
        _attempt(errors, f"remove {path}", _remove_path, path)
        cgroups.remove_empty_dir(os.path.dirname(path))  # e.g. /sys/fs/bpf/ambient
    for cg in st.get("node_cgroups", []):
        _attempt(errors, f"cgroup {cg}", cgroups.remove_cgroup, cg)
    for ns in reversed(st.get("netns", [])):
        _attempt(errors, f"netns {ns}", netlink.delete_netns, ns)
    base = st.get("cgroup_base")
    if base:
        cgroups.remove_empty_dir(base)
        cgroups.remove_empty_dir(os.path.dirname(base))  # <cgroup2>/ambient, if now empty
    if errors:
        return errors  # keep the state file so a later run can retry
    for sub in ("cni",) + (() if keep_logs else ("logs",)):
        shutil.rmtree(os.path.join(run_dir, sub), ignore_errors=True)
    for f in (_STATE_FILE, _STATE_FILE + ".tmp"):
        try:
            os.unlink(os.path.join(run_dir, f))
        except FileNotFoundError:
            pass
    cgroups.remove_empty_dir(run_dir)
    if os.path.dirname(os.path.abspath(run_dir)) == DEFAULT_RUN_ROOT:
        cgroups.remove_empty_dir(DEFAULT_RUN_ROOT)
    return errors


def sweep_stale(run_root: str = DEFAULT_RUN_ROOT) -> dict[str, list[str]]:
    """Destroy every cluster under ``run_root`` whose owner process is gone (crashed runs).
    Returns {run_dir: errors}.  Live clusters (owner alive) are left alone."""
    out: dict[str, list[str]] = {}
    try:
        entries = sorted(os.listdir(run_root))
    except FileNotFoundError:
        return out
    for entry in entries:
        run_dir = os.path.join(run_root, entry)
        try:
            st = load_state(run_dir)
        except (OSError, ValueError):
            continue
        if st is None:
            continue
        if _owner_alive(st):
            continue
        out[run_dir] = destroy_from_state(run_dir)
    return out
