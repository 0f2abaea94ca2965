"""A local mesh: the cluster harness plus a ztunnel per node, built from a manifests file.

:class:`LocalMesh` reads Kubernetes manifests, creates one network namespace per node and
per pod (networked by the CNI reference plugins), runs each pod's echo application in its
own cgroup, installs the in-pod capture rules for pods enrolled in ambient, and starts one
ztunnel per node in the node's namespace.  The control plane of this release is the
manifests file itself: the harness fills in what Kubernetes would (pod IPs, readiness)
and every ztunnel translates the same file into its mesh model.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ambient.ca import CertificateAuthority
from ambient.cluster.capture import apply_capture
from ambient.cluster.cluster import LocalCluster, PodHandle
from ambient.cluster.echo import http_get
from ambient.config.manifests import translate_manifests
from ztunnel.sources import write_pods_file

log = logging.getLogger("ambient.mesh")
ZTUNNEL_READY_TIMEOUT = 30.0


class MeshError(RuntimeError):
    """The local mesh could not be built; the message says which step failed."""


@dataclass
class LocalMesh:
    manifests: Path
    name: str = "ambdemo"
    run_root: Path = Path("/run/ambient")
    ztunnel_env: dict[str, str] = field(default_factory=dict)
    cluster: LocalCluster | None = None
    objects: list[dict[str, Any]] = field(default_factory=list)
    pods: dict[str, PodHandle] = field(default_factory=dict)  # "ns/name" -> handle
    enrolled: set[str] = field(default_factory=set)  # "ns/name"
    ztunnels: dict[str, Any] = field(default_factory=dict)  # node -> process

    @property
    def run_dir(self) -> Path:
        return self.run_root / self.name

    # -- building -------------------------------------------------------------------------

    def up(self, progress: Any = print) -> LocalMesh:
        try:
            text = self.manifests.read_text(encoding="utf-8")
            self.objects = [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
        except (OSError, yaml.YAMLError) as e:
            raise MeshError(f"cannot read manifests {self.manifests}: {e}") from e
        pod_objs = [o for o in self.objects if o.get("kind") == "Pod"]
        if not pod_objs:
            raise MeshError(f"{self.manifests} has no Pod objects: nothing to run")
        nodes = sorted({(o.get("spec") or {}).get("nodeName") or "node-a" for o in pod_objs})
        progress(f"creating cluster {self.name}: nodes {', '.join(nodes)}")
        self.cluster = LocalCluster(self.name, nodes, run_dir=str(self.run_dir))
        self.cluster.create()
        for o in pod_objs:
            meta, spec = o.get("metadata") or {}, o.get("spec") or {}
            ns = meta.get("namespace", "default")
            pod = self.cluster.add_pod(
                meta["name"], ns, spec.get("nodeName") or nodes[0],
                service_account=spec.get("serviceAccountName", "default"),
                labels=meta.get("labels") or {},
            )
            self.pods[f"{ns}/{pod.name}"] = pod
            self.cluster.start_echo(pod)
            progress(f"  pod {ns}/{pod.name}: {pod.ip} on {pod.node} (CNI bridge + host-local)")
        manifests_path = self.run_dir / "manifests.yaml"
        manifests_path.write_text(yaml.safe_dump_all(self._with_status()), encoding="utf-8")
        tr = translate_manifests([copy.deepcopy(o) for o in self._with_status()])
        if tr.errors:
            raise MeshError("manifests rejected: " + "; ".join(tr.errors))
        for _, res in tr.resources:
            if res.DESCRIPTOR.name == "Address" and res.WhichOneof("type") == "workload":
                w = res.workload
                if w.tunnel_protocol == 1:  # HBONE
                    self.enrolled.add(f"{w.namespace}/{w.name}")
        for key in sorted(self.enrolled):
            apply_capture(self.pods[key].netns)
            progress(f"  captured {key} (in-pod redirection rules)")
        ca_dir = self.run_dir / "ca"
        CertificateAuthority.generate().save_dir(ca_dir)
        for node in nodes:
            pods_file = self.run_dir / f"pods-{node}.json"
            write_pods_file(str(pods_file), [
                {"uid": p.uid, "name": p.name, "namespace": p.namespace,
                 "netns": p.netns_path, "workloadUid": f"Kubernetes//Pod/{p.namespace}/{p.name}"}
                for key, p in self.pods.items() if p.node == node and key in self.enrolled
            ])
            env = {
                "LOCAL_MANIFESTS_PATH": str(manifests_path),
                "FAKE_CA": "true",
                "CA_DIR": str(ca_dir),
                "NODE_NAME": node,
                "INPOD_PODS_PATH": str(pods_file),
                "RUST_LOG": "info",
                "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
                **self.ztunnel_env,
            }
            self.ztunnels[node] = self.cluster.start_node_process(
                node, [sys.executable, "-m", "ztunnel"], env=env
            )
        for node in nodes:
            self.wait_ready(node)
            progress(f"  ztunnel on {node} is ready")
        return self

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

    def wait_ready(self, node: str, timeout: float = ZTUNNEL_READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            proc = self.ztunnels[node]
            if proc.popen is not None and proc.popen.poll() is not None:
                raise MeshError(f"ztunnel on {node} exited; see {self.log_path(node)}")
            try:
                status, body = http_get(self.node_netns(node), "127.0.0.1", 15021,
                                        "/healthz/ready", timeout=2)
                if status == 200:
                    return
                last = f"{status} {body}"
            except OSError as e:
                last = str(e)
            time.sleep(0.2)
        raise MeshError(f"ztunnel on {node} not ready after {timeout}s ({last}); "
                        f"see {self.log_path(node)}")

    def log_path(self, node: str) -> Path:
        return self.run_dir / "logs" / f"_node_{node}.log"

    def metrics(self, node: str) -> str:
        status, body = http_get(self.node_netns(node), "127.0.0.1", 15020, "/metrics", timeout=5)
        if status != 200:
            raise MeshError(f"metrics of ztunnel on {node} answered {status}")
        return str(body.get("raw", ""))  # Prometheus text is not JSON: http_get keeps it raw

    def config_dump(self, node: str) -> dict[str, Any]:
        status, body = http_get(self.node_netns(node), "127.0.0.1", 15000, "/config_dump",
                                timeout=5)
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


def remove_run_dir(run_dir: Path) -> None:
    """Remove what the mesh wrote into its run dir (CA, manifests, pods files), then the dir."""
    shutil.rmtree(run_dir / "ca", ignore_errors=True)
    for f in [run_dir / "manifests.yaml", *run_dir.glob("pods-*.json")]:
        f.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        run_dir.rmdir()  # only if nothing else (logs kept on purpose) is left


def ensure_root() -> None:
    if os.geteuid() != 0:
        raise MeshError("the local mesh needs root (network namespaces, iptables); "
                        "run `sudo make demo`")
