"""HBONE interop between the real Envoy 1.40 binary and our *running* ztunnels.

tests/integration/test_envoy_interop.py checks Envoy against the HBONE library on loopback.
Here Envoy talks to the ztunnel processes of a LocalMesh, across the node/pod namespaces:

(1) Envoy as the HBONE client, run in the netns of a pod that is not captured
    (``legacy/client``), holding a certificate from the mesh CA: plain TCP -> Envoy ->
    HTTP/2 CONNECT over mTLS -> ``backend-1``'s in-pod 15008 (served by node-b's ztunnel) ->
    echo.  Checked: the greeting, node-b's destination-reporter metric with Envoy's principal,
    and that a denied identity and a wrong ``:authority`` get nothing.
(2) Envoy as the HBONE server for a pod ``shop/envoysrv`` that exists only as a network
    namespace plus a Pod entry appended to the live manifests file: no ztunnel serves it and
    no capture rules are installed in it, yet the mesh believes it is an HBONE workload.
    ``shop/frontend`` (captured) connects to ``<envoysrv>:8080``; node-a's ztunnel tunnels it
    to Envoy, which forwards it to an echo app in the same pod.  Checked: the greeting,
    Envoy's access log (the frontend's principal, the authority), and node-a's
    source-reporter metric with ``destination_principal`` = Envoy's identity.

Envoy's config, PEM files and process come from tests/envoy_support.py (shared with the
loopback test): it runs with ``ip netns exec`` (absolute paths), single-threaded, hot restart
off, a unique base id, its admin on 127.0.0.1 inside the netns; it is stopped by PID in
``finally``.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy_support import (
    HBONE_PORT,
    IP_BIN,
    Envoy,
    hbone_client_config,
    hbone_server_config,
    need_envoy,
    wait_for,
    write_pki,
)

from ambient.ca import CertificateAuthority
from ambient.cluster.demo import metric_value
from ambient.cluster.echo import tcp_probe
from ambient.cluster.mesh import LocalMesh
from ambient.identity import SpiffeId

pytestmark = [pytest.mark.netns, pytest.mark.envoy]

TD = "cluster.local"
FRONTEND_ID = SpiffeId(TD, "shop", "frontend")
BACKEND_ID = SpiffeId(TD, "shop", "backend")
INTRUDER_ID = SpiffeId(TD, "shop", "intruder")
ENVOYSRV_ID = SpiffeId(TD, "shop", "envoysrv")
LISTEN_PORT = 19080  # Envoy's plain-TCP listener inside legacy/client (a fresh netns)

MANIFESTS = """\
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Namespace
metadata:
  name: legacy
---
apiVersion: v1
kind: Pod
metadata:
  name: frontend
  namespace: shop
  labels: {app: frontend, version: v1}
spec:
  nodeName: node-a
  serviceAccountName: frontend
  containers:
  - name: app
    ports: [{name: tcp-echo, containerPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata:
  name: backend-1
  namespace: shop
  labels: {app: backend, version: v1}
spec:
  nodeName: node-b
  serviceAccountName: backend
  containers:
  - name: app
    ports: [{name: tcp-echo, containerPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: legacy
  labels: {app: client}
spec:
  nodeName: node-a
  containers:
  - name: app
    ports: [{name: tcp-echo, containerPort: 8080}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec:
  mtls: {mode: STRICT}
---
# Only the frontend may talk to the backend.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: backend-allow-frontend, namespace: shop}
spec:
  selector:
    matchLabels: {app: backend}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/frontend"]
"""


# ------------------------------------------------------------------------------ helpers


def _opened(mesh: LocalMesh, node: str, **labels: str) -> float:
    return metric_value(mesh.metrics(node), "istio_tcp_connections_opened_total", **labels)


def _closed(mesh: LocalMesh, node: str, **labels: str) -> float:
    """Closed connections; ``response_flags`` (e.g. DENY) is only known at close."""
    return metric_value(mesh.metrics(node), "istio_tcp_connections_closed_total", **labels)


def _ours(prefix: str) -> list[str]:
    out = subprocess.run([IP_BIN, "netns", "list"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return [ln.split()[0] for ln in out.splitlines()
            if ln.split() and ln.split()[0].startswith(prefix + "-")]


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(autouse=True)
def _need_envoy() -> None:
    need_envoy()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    root = tmp_path_factory.mktemp("envoyzt")
    manifests = root / "manifests.yaml"
    manifests.write_text(MANIFESTS)
    # iptables capture: these tests connect from the test process inside a pod netns, which
    # netns-wide rules capture (cgroup-based eBPF capture would not see this process).
    m = LocalMesh(manifests, name=f"ez{secrets.token_hex(3)}", run_root=root / "run",
                  capture="iptables")
    try:
        m.up(progress=lambda _msg: None)
        yield m
    finally:
        errors = m.down()
        leftovers = _ours(m.name)
        assert not errors, errors
        assert leftovers == [], leftovers


@pytest.fixture(scope="module")
def ca(mesh: LocalMesh) -> CertificateAuthority:
    return CertificateAuthority.load_dir(mesh.run_dir / "ca")


# ------------------------------------------------------------------------------ (1) client


def _via_envoy_client(mesh: LocalMesh, ca: CertificateAuthority, tmp: Path, ident: SpiffeId,
                      authority: str, payload: bytes) -> tuple[Any, str]:
    """Run Envoy (identity ``ident``) in legacy/client towards backend-1:15008 with
    ``authority``; probe its listener once from the same netns."""
    client = mesh.pods["legacy/client"]
    backend = mesh.pods["shop/backend-1"]
    pki = write_pki(ca, ident, tmp / "pki")
    env = Envoy(tmp, hbone_client_config("127.0.0.1", LISTEN_PORT, backend.ip, HBONE_PORT,
                                         authority, pki, BACKEND_ID), netns=client.netns)
    try:
        env.start().wait_ready()
        r = tcp_probe(client.netns, "127.0.0.1", LISTEN_PORT, payload=payload, timeout=10)
        return r, env.tail()
    finally:
        env.stop()


def test_envoy_hbone_client_to_real_ztunnel_inbound(
    mesh: LocalMesh, ca: CertificateAuthority, tmp_path: Path
) -> None:
    backend = mesh.pods["shop/backend-1"]
    labels = {"reporter": "destination", "source_principal": str(FRONTEND_ID),
              "destination_principal": str(BACKEND_ID),
              "connection_security_policy": "mutual_tls"}
    before = _opened(mesh, backend.node, **labels)
    payload = os.urandom(256 * 1024) + b"end\n"
    r, log = _via_envoy_client(mesh, ca, tmp_path / "ok", FRONTEND_ID,
                               f"{backend.ip}:8080", payload)
    assert r.ok, f"{r.error}\nenvoy log:\n{log}"
    assert r.server_name == "backend-1", r.greeting
    # node-b's ztunnel accepted Envoy's certificate as the frontend's identity.
    assert wait_for(lambda: _opened(mesh, backend.node, **labels) > before), \
        mesh.metrics(backend.node)


def test_envoy_hbone_client_denied_identity_gets_nothing(
    mesh: LocalMesh, ca: CertificateAuthority, tmp_path: Path
) -> None:
    backend = mesh.pods["shop/backend-1"]
    labels = {"reporter": "destination", "source_principal": str(INTRUDER_ID),
              "response_flags": "DENY"}
    before = _closed(mesh, backend.node, **labels)
    r, log = _via_envoy_client(mesh, ca, tmp_path / "deny", INTRUDER_ID,
                               f"{backend.ip}:8080", b"let me in\n")
    assert not r.ok and not r.greeting, r
    # refused by policy at node-b (not, say, a TLS failure at Envoy's end)
    assert wait_for(lambda: _closed(mesh, backend.node, **labels) > before), \
        (mesh.metrics(backend.node), log)


def test_envoy_hbone_client_wrong_authority_gets_nothing(
    mesh: LocalMesh, ca: CertificateAuthority, tmp_path: Path
) -> None:
    backend, other = mesh.pods["shop/backend-1"], mesh.pods["shop/frontend"]
    # An authority naming another workload, tunnelled to backend-1's 15008: must be refused.
    r, log = _via_envoy_client(mesh, ca, tmp_path / "authority", FRONTEND_ID,
                               f"{other.ip}:8080", b"misdirected\n")
    assert not r.ok and not r.greeting, (r, log)
    lines = [ln for ln in mesh.log_path(backend.node).read_text().splitlines()
             if "is not an address of" in ln]
    assert lines, "node-b did not log the refused authority"


def test_successful_inbound_hbone_connection_is_not_logged_as_failed(
    mesh: LocalMesh, ca: CertificateAuthority, tmp_path: Path
) -> None:
    backend = mesh.pods["shop/backend-1"]
    log_path = mesh.log_path(backend.node)
    start = len(log_path.read_text().splitlines())
    r, log = _via_envoy_client(mesh, ca, tmp_path / "log", FRONTEND_ID,
                               f"{backend.ip}:8080", b"ping\n")
    assert r.ok, f"{r.error}\nenvoy log:\n{log}"

    def completed() -> list[str]:
        return [ln for ln in log_path.read_text().splitlines()[start:]
                if "connection complete" in ln and 'direction="inbound"' in ln]

    assert wait_for(lambda: bool(completed()))
    new = log_path.read_text().splitlines()[start:]
    failed = [ln for ln in new if "inbound HBONE connection to" in ln and "failed" in ln]
    assert failed == [], failed


# ------------------------------------------------------------------------------ (2) server


def test_real_ztunnel_outbound_to_envoy_hbone_server(
    mesh: LocalMesh, ca: CertificateAuthority, tmp_path: Path
) -> None:
    assert mesh.cluster is not None
    frontend = mesh.pods["shop/frontend"]
    # A pod the mesh's CNI plugin never saw (networked by the reference plugins only): no
    # capture rules, no ztunnel serves it.
    chain = mesh.cluster.chain_by_node.pop("node-b")
    try:
        pod = mesh.cluster.add_pod("envoysrv", "shop", "node-b", service_account="envoysrv",
                                   labels={"app": "envoysrv"})
    finally:
        mesh.cluster.chain_by_node["node-b"] = chain
    mesh.cluster.start_echo(pod)
    # ... but the mesh configuration says it is an ambient (HBONE) workload on node-b.
    manifests = mesh.run_dir / "manifests.yaml"
    original = manifests.read_text()
    entry = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "envoysrv", "namespace": "shop", "uid": pod.uid,
                     "labels": {"app": "envoysrv"}},
        "spec": {"nodeName": "node-b", "serviceAccountName": "envoysrv",
                 "containers": [{"name": "app",
                                 "ports": [{"name": "tcp-echo", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": pod.ip, "podIPs": [{"ip": pod.ip}],
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }
    authority = f"{pod.ip}:8080"
    access_log = tmp_path / "access.log"
    pki = write_pki(ca, ENVOYSRV_ID, tmp_path / "pki")
    env = Envoy(tmp_path, hbone_server_config("0.0.0.0", HBONE_PORT, [authority],
                                              "127.0.0.1", 8080, pki, access_log,
                                              trust_domain=TD), netns=pod.netns)
    try:
        manifests.write_text(original.rstrip("\n") + "\n---\n" + yaml.safe_dump(entry))

        def known(node: str) -> bool:
            return any(w.get("name") == "envoysrv" and w.get("namespace") == "shop"
                       for w in mesh.config_dump(node).get("workloads", []))

        assert wait_for(lambda: known(frontend.node) and known("node-b"), 20), \
            "ztunnels did not pick up the envoysrv Pod entry"
        env.start().wait_ready()

        labels = {"reporter": "source", "source_principal": str(FRONTEND_ID),
                  "destination_principal": str(ENVOYSRV_ID),
                  "connection_security_policy": "mutual_tls"}
        before = _opened(mesh, frontend.node, **labels)
        payload = os.urandom(256 * 1024) + b"end\n"
        r = tcp_probe(frontend.netns, pod.ip, 8080, payload=payload, timeout=10)
        assert r.ok, f"{r.error}\nenvoy log:\n{env.tail()}"
        # Envoy forwarded to the echo app in its own pod over loopback.
        assert r.server_name == "envoysrv" and r.seen_client is not None
        assert r.seen_client[0] == "127.0.0.1", r.greeting
        assert wait_for(lambda: _opened(mesh, frontend.node, **labels) > before), \
            mesh.metrics(frontend.node)
        # Envoy verified the frontend's SPIFFE identity and saw the ip:port authority.
        want = f"{FRONTEND_ID} {authority} 200"
        assert wait_for(lambda: access_log.exists() and want in access_log.read_text()), \
            (access_log.read_text() if access_log.exists() else "(no access log)", env.tail())
    finally:
        env.stop()
        manifests.write_text(original)
        mesh.cluster.remove_pod(pod)
