"""HBONE interop with the real Envoy 1.40 binary, in both roles.

(a) Envoy as the HBONE client: plain TCP -> Envoy tcp_proxy tunnelling (HTTP/2 CONNECT over
    mTLS) -> our HBONE server -> echo. We check the echo and what our server saw.
(b) Envoy as the HBONE server: our pool -> Envoy (HCM, CONNECT upgrade) -> echo. We check the
    echo, that we verified Envoy's SPIFFE identity, and Envoy's access log of ours.

Envoy's config, PEM files and process come from tests/envoy_support.py (shared with
tests/netns/test_envoy_ztunnel_interop.py), all written into tmp_path; Envoy runs
single-threaded with hot restart off, a unique base id and its admin on an ephemeral loopback
port.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import time
from pathlib import Path

import pytest
from envoy_support import (
    Envoy,
    hbone_client_config,
    hbone_server_config,
    need_envoy,
    write_pki,
)
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

ENVOY_ID = SpiffeId(TD, "istio-system", "envoy")
SERVER_ID_FOR_ENVOY = SpiffeId(TD, "default", "httpbin")
LOCALHOST = ipaddress.IPv4Address("127.0.0.1")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


@pytest.fixture(autouse=True)
def _need_envoy() -> None:
    need_envoy()


def test_envoy_as_hbone_client(tmp_path: Path) -> None:
    async def main() -> None:
        seen = Seen()
        echo, echo_port = await start_echo()
        srv = await start_hbone_server(relay_handler(seen), server_ctx(SERVER_ID_FOR_ENVOY),
                                       trust_domain=TD, host="127.0.0.1")
        hbone_port = srv.sockets[0].getsockname()[1]
        listen_port = free_port()
        target = f"127.0.0.1:{echo_port}"
        envoy_pki = write_pki(pki().ca, ENVOY_ID, tmp_path / "pki")
        env = Envoy(tmp_path, hbone_client_config(
            "127.0.0.1", listen_port, "127.0.0.1", hbone_port, target, envoy_pki,
            SERVER_ID_FOR_ENVOY))
        try:
            await asyncio.to_thread(env.start().wait_ready)
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
        envoy_pki = write_pki(pki().ca, ENVOY_ID, tmp_path / "pki")
        env = Envoy(tmp_path, hbone_server_config(
            "127.0.0.1", listen_port, ["*"], "127.0.0.1", echo_port, envoy_pki, access_log,
            trust_domain=TD))

        async def ctx_for(_ident: SpiffeId):
            return client_ctx(CLIENT_ID)

        pool = HbonePool(dial, ctx_for, trust_domain=TD)
        key = PoolKey(CLIENT_ID, frozenset({ENVOY_ID}), None, (LOCALHOST, listen_port))
        try:
            await asyncio.to_thread(env.start().wait_ready)
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
