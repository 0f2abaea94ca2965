"""The peer proxies of the benchmark: Envoy HBONE, stunnel mTLS and haproxy mTLS.

Each peer is a pair of proxies on the same path as ztunnel's: a client-side proxy whose
sockets live in the client pod's netns and a server-side proxy whose sockets live in the
server pod's netns (ztunnel opens its per-pod listeners inside the pod netns too).  A proxy
cannot open listeners in another netns, so each peer process runs inside the pod netns it
serves; the client pod gets iptables ``nat OUTPUT`` REDIRECT rules that send its
connections to the benchmark ports (80 for HTTP, 5201 for iperf3) of the server pod to the
client proxy, as ztunnel's in-pod capture does.  The proxies' own connections go to other
ports (15008 / 152xx) and are not redirected.

- Envoy (1.40, ``--concurrency 1``): client side ``original_dst`` listener filter +
  ``tcp_proxy`` tunnelling to ``%DOWNSTREAM_LOCAL_ADDRESS%`` over HTTP/2 CONNECT in mutual
  TLS 1.3 (ALPN h2, the mesh's certificates, the server's SPIFFE URI SAN checked exactly);
  server side HBONE on 15008 (client certificate required, any SPIFFE ID of the trust
  domain), one virtual host per ``ip:port`` authority to the app.  This is HBONE as ztunnel
  speaks it: one pooled HTTP/2 connection, one CONNECT stream per TCP connection.
- stunnel and haproxy (``nbthread 1``): one TLS 1.3 connection per TCP connection (they cannot
  multiplex); they cannot read a redirected connection's original destination, so each
  benchmark port has its own listener pair (client 151xx -> server 152xx).  They check the
  peer's chain against the mesh root but not its SPIFFE URI SAN (neither can match URI SANs).

The config renderers are pure; ``start_*`` run the processes as pod applications.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HBONE_PORT = 15008
ENVOY_OUTBOUND_PORT = 15001
#: Benchmark ports carried by every mode: nginx (HTTP) and iperf3.
APP_PORTS: tuple[int, ...] = (80, 5201)


def tunnel_ports(app_port: int, index: int) -> tuple[int, int]:
    """(client listen port, server listen port) of stunnel/haproxy for the index-th app port."""
    return 15100 + index, 15200 + index


@dataclass(frozen=True)
class PkiFiles:
    """PEM files of one workload certificate (paths as strings for config files)."""

    key: str
    chain: str  # leaf + intermediates
    root: str
    combined: str  # chain + key, for haproxy's ``crt``


def write_pki(cert_chain_pem: bytes, key_pem: bytes, roots_pem: bytes, d: Path) -> PkiFiles:
    d.mkdir(parents=True, exist_ok=True)
    files = {"key.pem": key_pem, "chain.pem": cert_chain_pem, "root.pem": roots_pem,
             "combined.pem": cert_chain_pem + key_pem}
    for name, data in files.items():
        p = d / name
        p.write_bytes(data)
        p.chmod(0o600)
    return PkiFiles(str(d / "key.pem"), str(d / "chain.pem"), str(d / "root.pem"),
                    str(d / "combined.pem"))


def redirect_rules(server_ip: str, redirects: Sequence[tuple[int, int]]) -> list[list[str]]:
    """iptables argv lists (without the binary) for the client pod: ``(app_port, proxy_port)``
    pairs, connections to ``server_ip:app_port`` go to the local ``proxy_port``."""
    return [["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", f"{server_ip}/32",
             "--dport", str(app), "-j", "REDIRECT", "--to-ports", str(proxy)]
            for app, proxy in redirects]


# ----------------------------------------------------------------------------------- Envoy

_T = "type.googleapis.com/envoy.extensions."


def _tls_context(pki: PkiFiles, san: dict[str, str]) -> dict[str, Any]:
    return {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3",
                       "tls_maximum_protocol_version": "TLSv1_3"},
        "alpn_protocols": ["h2"],
        "tls_certificates": [{"certificate_chain": {"filename": pki.chain},
                              "private_key": {"filename": pki.key}}],
        "validation_context": {
            "trusted_ca": {"filename": pki.root},
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": san}],
        },
    }


def _cluster(name: str, ip: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "STATIC", "connect_timeout": "5s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": ip,
                                                             "port_value": port}}}}]}]},
            **extra}


def envoy_client_config(server_ip: str, pki: PkiFiles, server_san: str) -> dict[str, Any]:
    """Client side: captured TCP on 15001 -> CONNECT <original dst> over mTLS to server:15008."""
    tcp_proxy = {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": _T + "filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": "outbound", "cluster": "hbone",
        "tunneling_config": {"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"}}}
    upstream_tls = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": _T + "transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": _tls_context(pki, {"exact": server_san})}}
    h2_opts = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": _T + "upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}}}}
    return {"static_resources": {
        "listeners": [{
            "name": "outbound",
            "address": {"socket_address": {"address": "0.0.0.0",
                                           "port_value": ENVOY_OUTBOUND_PORT}},
            "listener_filters": [{"name": "envoy.filters.listener.original_dst",
                                  "typed_config": {"@type": _T + "filters.listener."
                                                   "original_dst.v3.OriginalDst"}}],
            "filter_chains": [{"filters": [tcp_proxy]}],
        }],
        "clusters": [_cluster("hbone", server_ip, HBONE_PORT, transport_socket=upstream_tls,
                              typed_extension_protocol_options=h2_opts)],
    }}


def envoy_server_config(server_ip: str, pki: PkiFiles, trust_domain: str,
                        app_ports: Sequence[int] = APP_PORTS) -> dict[str, Any]:
    """Server side: HBONE on 15008 (mTLS, HTTP/2 CONNECT) -> the app at ``server_ip:port``."""
    vhosts = [{"name": f"app{port}", "domains": [f"{server_ip}:{port}"],
               "routes": [{"match": {"connect_matcher": {}},
                           "route": {"cluster": f"app{port}", "upgrade_configs": [
                               {"upgrade_type": "CONNECT", "connect_config": {}}]}}]}
              for port in app_ports]
    hcm = {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": _T + "filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "inbound", "codec_type": "HTTP2",
        "http2_protocol_options": {"allow_connect": True},
        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
        "route_config": {"virtual_hosts": vhosts},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": _T + "filters.http.router.v3.Router"}}]}}
    downstream_tls = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": _T + "transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": _tls_context(pki, {"prefix": f"spiffe://{trust_domain}/"})}}
    return {"static_resources": {
        "listeners": [{
            "name": "hbone",
            "address": {"socket_address": {"address": server_ip, "port_value": HBONE_PORT}},
            "filter_chains": [{"filters": [hcm], "transport_socket": downstream_tls}],
        }],
        "clusters": [_cluster(f"app{port}", server_ip, port) for port in app_ports],
    }}


def envoy_argv(binary: str, config_path: Path) -> list[str]:
    return [binary, "-c", str(config_path), "--concurrency", "1", "--disable-hot-restart",
            "--base-id", str(random.randrange(1 << 20, 1 << 30)), "-l", "warning"]


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(json.dumps(doc, indent=1))
    return path


# --------------------------------------------------------------------------------- stunnel


def stunnel_config(side: str, server_ip: str, pki: PkiFiles,
                   app_ports: Sequence[int] = APP_PORTS) -> str:
    """stunnel's config for ``side`` ('client' or 'server'): one service per app port."""
    lines = ["foreground = yes", "pid =", "debug = 3", "syslog = no"]
    for i, port in enumerate(app_ports):
        cport, sport = tunnel_ports(port, i)
        lines += [f"[p{port}]", f"cert = {pki.chain}", f"key = {pki.key}",
                  f"CAfile = {pki.root}", "verifyChain = yes", "sslVersionMin = TLSv1.3",
                  "socket = l:TCP_NODELAY=1", "socket = r:TCP_NODELAY=1"]
        if side == "client":
            lines += ["client = yes", f"accept = 127.0.0.1:{cport}",
                      f"connect = {server_ip}:{sport}"]
        else:
            lines += [f"accept = {server_ip}:{sport}", f"connect = {server_ip}:{port}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------- haproxy


def haproxy_config(side: str, server_ip: str, pki: PkiFiles,
                   app_ports: Sequence[int] = APP_PORTS) -> str:
    """haproxy's config for ``side``: TCP mode, one frontend/backend per app port, TLS 1.3."""
    lines = ["global", "  nbthread 1", "  maxconn 4000",
             "  ssl-default-bind-options ssl-min-ver TLSv1.3",
             "  ssl-default-server-options ssl-min-ver TLSv1.3",
             "defaults", "  mode tcp", "  timeout connect 5s", "  timeout client 300s",
             "  timeout server 300s"]
    for i, port in enumerate(app_ports):
        cport, sport = tunnel_ports(port, i)
        if side == "client":
            lines += [f"frontend f{port}", f"  bind 127.0.0.1:{cport}",
                      f"  default_backend b{port}", f"backend b{port}",
                      f"  server s {server_ip}:{sport} ssl crt {pki.combined} "
                      f"ca-file {pki.root} verify required"]
        else:
            lines += [f"frontend f{port}",
                      f"  bind {server_ip}:{sport} ssl crt {pki.combined} ca-file {pki.root} "
                      "verify required",
                      f"  default_backend b{port}", f"backend b{port}",
                      f"  server s {server_ip}:{port}"]
    return "\n".join(lines) + "\n"
