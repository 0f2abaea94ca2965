"""The control plane's delta ADS server on loopback, driven by a conformance client on grpcio.

The client here is written directly against the generated stub (not ztunnel's client), so it
checks the wire behaviour: incremental pushes, ACK/NACK, reconnect resume with
``initial_resource_versions``, authentication, and TLS/mTLS with the mesh CA.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest

from ambient.api.envoy.config.core.v3 import base_pb2
from ambient.api.envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from ambient.api.google.rpc import status_pb2
from ambient.api.istio.security import authorization_pb2
from ambient.api.istio.workload import workload_pb2
from ambient.ca import CertificateAuthority
from ambient.identity import SpiffeId
from controlplane.cache import SnapshotCache
from controlplane.server import ControlPlaneServer, ServerError
from controlplane.xds import (
    ADDRESS_TYPE_URL,
    AUTHORIZATION_TYPE_URL,
    AuthenticationError,
    Caller,
    client_certificate,
    first_success,
)

NODE = "ztunnel~10.0.0.5~ztunnel-x.istio-system~istio-system.svc.cluster.local"
HOSTNAME = "istiod.istio-system.svc"
STEP = 10.0  # bound on each wait for the server; never an assertion about time


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def wl(uid: str, last: int = 1, name: str = "p") -> workload_pb2.Address:
    return workload_pb2.Address(workload=workload_pb2.Workload(
        uid=uid, name=name, namespace="default", addresses=[bytes([10, 0, 0, last])]))


def pol(name: str) -> authorization_pb2.Authorization:
    return authorization_pb2.Authorization(name=name, namespace="default")


def seeded_cache() -> SnapshotCache:
    cache = SnapshotCache()
    cache.apply(ADDRESS_TYPE_URL, {"u/a": wl("u/a", 1), "u/b": wl("u/b", 2)})
    cache.apply(AUTHORIZATION_TYPE_URL, {"default/allow": pol("allow")})
    return cache


@asynccontextmanager
async def serving(cache: SnapshotCache, **kw: Any) -> AsyncIterator[ControlPlaneServer]:
    kw.setdefault("plain_addr", "127.0.0.1:0")
    srv = ControlPlaneServer(cache, **kw)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(None)


class Conn:
    """One ADS stream, spoken by hand."""

    def __init__(self, channel: grpc.aio.Channel, metadata: list[tuple[str, str]] | None = None):
        self.channel = channel
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        self.call = stub.DeltaAggregatedResources(metadata=metadata or [])

    async def send(self, type_url: str, *, node: str | None = None, sub: tuple[str, ...] = (),
                   initial: dict[str, str] | None = None, nonce: str = "",
                   error: str | None = None) -> None:
        req = discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url, resource_names_subscribe=sub,
            initial_resource_versions=initial or {}, response_nonce=nonce)
        if node is not None:
            req.node.CopyFrom(base_pb2.Node(id=node))
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        await self.call.write(req)

    async def recv(self) -> discovery_pb2.DeltaDiscoveryResponse:
        resp = await asyncio.wait_for(self.call.read(), STEP)
        assert resp is not grpc.aio.EOF
        return resp

    async def ack(self, resp: discovery_pb2.DeltaDiscoveryResponse) -> None:
        await self.send(resp.type_url, nonce=resp.nonce)

    async def subscribe_all(self) -> dict[str, discovery_pb2.DeltaDiscoveryResponse]:
        await self.send(ADDRESS_TYPE_URL, node=NODE, sub=("*",))
        await self.send(AUTHORIZATION_TYPE_URL)  # legacy wildcard
        out = {}
        for _ in range(2):
            r = await self.recv()
            out[r.type_url] = r
            await self.ack(r)
        return out


def names(resp: discovery_pb2.DeltaDiscoveryResponse) -> list[str]:
    return sorted(r.name for r in resp.resources)


async def until(cond: Callable[[], bool]) -> None:
    for _ in range(1000):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never became true")


# -- plaintext: the protocol ------------------------------------------------------------------


def test_incremental_pushes_carry_only_what_changed() -> None:
    async def main() -> None:
        cache = seeded_cache()
        async with serving(cache) as srv, \
                grpc.aio.insecure_channel(f"127.0.0.1:{srv.plain_port}") as ch:
            c = Conn(ch)
            first = await c.subscribe_all()
            assert names(first[ADDRESS_TYPE_URL]) == ["u/a", "u/b"]
            assert names(first[AUTHORIZATION_TYPE_URL]) == ["default/allow"]
            for r in first[ADDRESS_TYPE_URL].resources:
                assert workload_pb2.Address.FromString(r.resource.value) == wl(
                    r.name, 1 if r.name == "u/a" else 2)
            await until(lambda: srv.ads.streams and next(iter(
                srv.ads.streams.values())).types[ADDRESS_TYPE_URL].acks == 1)

            cache.apply(ADDRESS_TYPE_URL, {"u/a": wl("u/a", 1), "u/b": wl("u/b", 9),
                                           "u/c": wl("u/c", 3)})
            push = await c.recv()
            assert push.type_url == ADDRESS_TYPE_URL
            assert names(push) == ["u/b", "u/c"] and list(push.removed_resources) == []
            await c.ack(push)

            cache.apply(ADDRESS_TYPE_URL, removals={"u/a"})
            gone = await c.recv()
            assert names(gone) == [] and list(gone.removed_resources) == ["u/a"]
            await c.ack(gone)

            cache.apply(AUTHORIZATION_TYPE_URL, {"default/deny": pol("deny")})
            pol_push = await c.recv()
            assert pol_push.type_url == AUTHORIZATION_TYPE_URL
            assert names(pol_push) == ["default/deny"]
            assert len({first[ADDRESS_TYPE_URL].nonce, push.nonce, gone.nonce,
                        pol_push.nonce}) == 4
            c.call.cancel()

    run(main())


def test_nack_is_logged_and_the_rejected_version_not_resent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        cache = seeded_cache()
        async with serving(cache) as srv, \
                grpc.aio.insecure_channel(f"127.0.0.1:{srv.plain_port}") as ch:
            c = Conn(ch)
            await c.subscribe_all()
            cache.apply(ADDRESS_TYPE_URL, {"u/a": wl("u/a", 7, name="bad")})
            bad = await c.recv()
            with caplog.at_level(logging.WARNING, logger="controlplane.xds"):
                await c.send(ADDRESS_TYPE_URL, nonce=bad.nonce,
                             error="u/a: the proxy could not use it")
                await until(lambda: "NACK" in caplog.text)
            assert NODE in caplog.text and "rejected u/a:" in caplog.text
            assert "the proxy could not use it" in caplog.text
            cache.apply(ADDRESS_TYPE_URL, {"u/z": wl("u/z", 26)})
            nxt = await c.recv()
            assert names(nxt) == ["u/z"]  # u/a at the NACKed version is not re-sent
            c.call.cancel()

    run(main())


def test_reconnect_resumes_from_initial_resource_versions() -> None:
    async def main() -> None:
        cache = seeded_cache()
        async with serving(cache) as srv:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.plain_port}") as ch:
                c = Conn(ch)
                held = {t: {r.name: r.version for r in resp.resources}
                        for t, resp in (await c.subscribe_all()).items()}
                c.call.cancel()
            await until(lambda: not srv.ads.streams)
            # While disconnected: one change, one removal, one addition; policies untouched.
            cache.apply(ADDRESS_TYPE_URL, {"u/b": wl("u/b", 20), "u/new": wl("u/new", 30)},
                        {"u/a"})
            async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.plain_port}") as ch:
                c = Conn(ch)
                await c.send(ADDRESS_TYPE_URL, node=NODE, initial=held[ADDRESS_TYPE_URL])
                await c.send(AUTHORIZATION_TYPE_URL, initial=held[AUTHORIZATION_TYPE_URL])
                got = {}
                for _ in range(2):
                    r = await c.recv()
                    got[r.type_url] = r
                addr = got[ADDRESS_TYPE_URL]
                assert names(addr) == ["u/b", "u/new"]
                assert list(addr.removed_resources) == ["u/a"]
                pols = got[AUTHORIZATION_TYPE_URL]
                assert names(pols) == [] and list(pols.removed_resources) == []
                assert srv.ads.streams_total == 2
                c.call.cancel()

    run(main())


def test_malformed_node_id_is_invalid_argument() -> None:
    async def main() -> None:
        async with serving(seeded_cache()) as srv, \
                grpc.aio.insecure_channel(f"127.0.0.1:{srv.plain_port}") as ch:
            c = Conn(ch)
            await c.send(ADDRESS_TYPE_URL, node="ztunnel~not-an-ip~pod.ns~ns.svc.cluster.local")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await asyncio.wait_for(c.call.read(), STEP)
            assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "not an IP address" in (e.value.details() or "")
            assert "INSTANCE_IP" in (e.value.details() or "")

    run(main())


def test_extra_servicers_share_the_server() -> None:
    calls: list[bytes] = []

    def echo(request: bytes, context: Any) -> bytes:
        calls.append(request)
        return request[::-1]

    def hook(server: grpc.aio.Server) -> None:
        handler = grpc.method_handlers_generic_handler(
            "test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
        server.add_generic_rpc_handlers((handler,))

    async def main() -> None:
        srv = ControlPlaneServer(seeded_cache(), plain_addr="127.0.0.1:0")
        srv.add_servicer(hook)
        await srv.start()
        try:
            with pytest.raises(ServerError, match="before start"):
                srv.add_servicer(hook)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.plain_port}") as ch:
                out = await ch.unary_unary("/test.Echo/Echo")(b"abc", timeout=STEP)
            assert out == b"cba" and calls == [b"abc"]
        finally:
            await srv.stop(None)

    run(main())


def test_port_in_use_is_a_clear_error() -> None:
    async def main() -> None:
        async with serving(seeded_cache()) as srv:
            other = ControlPlaneServer(SnapshotCache(), plain_addr=f"127.0.0.1:{srv.plain_port}")
            with pytest.raises(ServerError, match="another control plane"):
                await other.start()
        with pytest.raises(ServerError, match="needs the mesh CA"):
            ControlPlaneServer(SnapshotCache(), tls_addr="127.0.0.1:0")

    run(main())


# -- TLS and mTLS ----------------------------------------------------------------------------


def tls_channel(port: int, roots: bytes, cert: Any = None,
                hostname: str = HOSTNAME) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(
        roots, cert.key_pem if cert else None, cert.to_pem_chain() if cert else None)
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds,
                                   options=[("grpc.ssl_target_name_override", hostname)])


def test_mtls_port_identifies_the_client_by_its_certificate() -> None:
    ca = CertificateAuthority.generate()
    ztunnel_id = SpiffeId("cluster.local", "istio-system", "ztunnel")

    async def main() -> None:
        async with serving(seeded_cache(), plain_addr=None, tls_addr="127.0.0.1:0", ca=ca,
                           client_auth="require") as srv:
            assert srv.tls_port and srv.plain_port is None and srv.certificate is not None
            assert srv.certificate.identity.uri == "spiffe://cluster.local/ns/istio-system/sa/istiod"
            cert = ca.issue(ztunnel_id)
            async with tls_channel(srv.tls_port, ca.roots_pem, cert) as ch:
                c = Conn(ch)
                first = await c.subscribe_all()
                assert names(first[ADDRESS_TYPE_URL]) == ["u/a", "u/b"]
                [stream] = srv.ads.streams.values()
                assert stream.caller == Caller(ztunnel_id.uri, "x509", "")
                c.call.cancel()
            # Without a client certificate the handshake fails.
            async with tls_channel(srv.tls_port, ca.roots_pem) as ch:
                c = Conn(ch)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await c.send(ADDRESS_TYPE_URL, node=NODE)
                    await asyncio.wait_for(c.call.read(), STEP)
                assert e.value.code() is grpc.StatusCode.UNAVAILABLE
            # A client certificate from another CA is refused too.
            foreign = CertificateAuthority.generate().issue(ztunnel_id)
            async with tls_channel(srv.tls_port, ca.roots_pem, foreign) as ch:
                c = Conn(ch)
                with pytest.raises(grpc.aio.AioRpcError):
                    await c.send(ADDRESS_TYPE_URL, node=NODE)
                    await asyncio.wait_for(c.call.read(), STEP)

    run(main())


def test_tls_port_serves_istiod_name_and_checks_tokens() -> None:
    """Istio's default: TLS without a client certificate, caller authenticated by its token."""
    ca = CertificateAuthority.generate()

    def token(metadata: dict[str, str], peer: SpiffeId | None) -> Caller:
        if metadata.get("authorization") != "Bearer good-token":
            raise AuthenticationError("the bearer token was not accepted (TokenReview failed)")
        return Caller("spiffe://cluster.local/ns/istio-system/sa/ztunnel", "token",
                      metadata.get("clusterid", ""))

    async def main() -> None:
        auth = first_success(client_certificate, token)
        async with serving(seeded_cache(), tls_addr="127.0.0.1:0", ca=ca,
                           authenticator=auth) as srv:
            assert srv.tls_port is not None
            md = [("authorization", "Bearer good-token"), ("clusterid", "Kubernetes")]
            async with tls_channel(srv.tls_port, ca.roots_pem) as ch:
                c = Conn(ch, md)
                await c.subscribe_all()
                [stream] = srv.ads.streams.values()
                assert stream.caller.method == "token"
                assert stream.caller.cluster_id == "Kubernetes"
                c.call.cancel()
            async with tls_channel(srv.tls_port, ca.roots_pem) as ch:
                c = Conn(ch, [("authorization", "Bearer stolen")])
                await c.send(ADDRESS_TYPE_URL, node=NODE)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await asyncio.wait_for(c.call.read(), STEP)
                assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
                details = e.value.details() or ""
                assert "no client certificate" in details and "TokenReview" in details
            # The server name is checked: a wrong expected hostname fails the handshake.
            async with tls_channel(srv.tls_port, ca.roots_pem, hostname="evil.example") as ch:
                c = Conn(ch, md)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await c.send(ADDRESS_TYPE_URL, node=NODE)
                    await asyncio.wait_for(c.call.read(), STEP)
                assert e.value.code() is grpc.StatusCode.UNAVAILABLE
            # The plaintext port of the same server stays anonymous.
            assert srv.plain_port is not None
            async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.plain_port}") as ch:
                c = Conn(ch)
                await c.subscribe_all()
                assert any(s.caller.anonymous for s in srv.ads.streams.values())
                c.call.cancel()

    run(main())


def test_tls_port_accepts_the_control_planes_node_tokens() -> None:
    """The CA module's local node-token authenticator, adapted for xDS streams."""
    from controlplane.ca_service import LocalTokenAuthenticator
    from controlplane.xds import from_object_authenticator

    ca = CertificateAuthority.generate()
    tokens = LocalTokenAuthenticator(b"s" * 32)
    good = tokens.mint_token("node-1", "istio-system", "ztunnel")
    forged = LocalTokenAuthenticator(b"x" * 32).mint_token("node-1", "istio-system", "ztunnel")

    async def main() -> None:
        auth = from_object_authenticator(tokens, "cluster.local")
        async with serving(seeded_cache(), plain_addr=None, tls_addr="127.0.0.1:0", ca=ca,
                           authenticator=auth) as srv:
            assert srv.tls_port is not None
            async with tls_channel(srv.tls_port, ca.roots_pem) as ch:
                c = Conn(ch, [("authorization", f"Bearer {good}")])
                await c.subscribe_all()
                [stream] = srv.ads.streams.values()
                assert stream.caller == Caller(
                    "spiffe://cluster.local/ns/istio-system/sa/ztunnel", "token", "")
                c.call.cancel()
            async with tls_channel(srv.tls_port, ca.roots_pem) as ch:
                c = Conn(ch, [("authorization", f"Bearer {forged}")])
                await c.send(ADDRESS_TYPE_URL, node=NODE)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await asyncio.wait_for(c.call.read(), STEP)
                assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
                assert "signature does not match" in (e.value.details() or "")

    run(main())
