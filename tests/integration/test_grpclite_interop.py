"""ambient.grpclite against real grpcio servers on loopback (plaintext and TLS).

A small generic-handler service exercises what the ADS and CA clients rely on: unary calls,
error statuses, deadlines, a bidirectional stream, the server ending or going away, bad
certificates, size limits, metadata, cancellation and keepalive.  The control plane's own xDS
and CA services are covered through the ztunnel clients (test_ztunnel_xds_client.py,
test_grpc_ca_provider.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest

from ambient.ca import CertificateAuthority
from ambient.grpclite import Channel, GrpcError, StatusCode, client_tls_context
from controlplane.server import istiod_certificate

SVC = "test.Echo"


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


class Echo:
    """The service's behaviour, and what it observed."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []
        self.remaining: list[float | None] = []
        self.cancelled = asyncio.Event()
        self.release = asyncio.Event()
        self.entered = asyncio.Event()

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.metadata.append({k: v for k, v in context.invocation_metadata() or ()})
        self.remaining.append(context.time_remaining())
        if request.startswith(b"fail"):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "node-1 may not ask for "
                                "spiffe://x/ns/a/sa/b: caf\u00e9 100%")
        if request == b"slow":
            context.add_done_callback(lambda _: self.cancelled.set())
            self.entered.set()
            await asyncio.sleep(30)
        if request == b"wait":
            self.entered.set()
            await self.release.wait()
        if request.startswith(b"big:"):
            return b"x" * int(request[4:])
        return b"echo:" + request

    async def bidi(self, requests: AsyncIterator[bytes],
                   context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        context.add_done_callback(lambda _: self.cancelled.set())
        async for req in requests:
            if req == b"end":
                return
            if req == b"hang":
                self.entered.set()
                await asyncio.sleep(30)
            yield b"re:" + req
            yield b"re2:" + req


def _ident(b: bytes) -> bytes:
    return b


@asynccontextmanager
async def serving(echo: Echo, tls: tuple[bytes, bytes] | None = None,
                  options: list[tuple[str, Any]] | None = None,
                  ) -> AsyncIterator[tuple[grpc.aio.Server, int]]:
    server = grpc.aio.server(options=options or [])
    handler = grpc.method_handlers_generic_handler(SVC, {
        "Unary": grpc.unary_unary_rpc_method_handler(echo.unary, _ident, _ident),
        "Bidi": grpc.stream_stream_rpc_method_handler(echo.bidi, _ident, _ident),
    })
    server.add_generic_rpc_handlers((handler,))
    if tls is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([tls]))
    await server.start()
    try:
        yield server, port
    finally:
        await server.stop(None)


UNARY, BIDI = f"/{SVC}/Unary", f"/{SVC}/Bidi"


def test_unary_ok_with_metadata_and_deadline() -> None:
    async def main() -> None:
        echo = Echo()
        async with serving(echo) as (_, port), Channel(f"127.0.0.1:{port}") as ch:
            reply = await ch.unary(UNARY, b"hi", metadata=[("authorization", "Bearer t"),
                                                          ("clusterid", "c1")], timeout=30)
            assert reply == b"echo:hi"
            assert await ch.unary(UNARY, b"") == b"echo:"  # an empty message, no deadline
        assert echo.metadata[0]["authorization"] == "Bearer t"
        assert echo.metadata[0]["clusterid"] == "c1"
        assert echo.metadata[0]["user-agent"].startswith("ambient-grpclite/")
        # The deadline travelled as grpc-timeout; without one the server sees none.
        first, second = echo.remaining
        assert first is not None and 0 < first <= 30 and second is None

    run(main())


def test_unary_error_status_and_message() -> None:
    async def main() -> None:
        async with serving(Echo()) as (_, port), Channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(GrpcError) as e:
                await ch.unary(UNARY, b"fail")
            assert e.value.code is StatusCode.PERMISSION_DENIED
            assert e.value.details == "node-1 may not ask for spiffe://x/ns/a/sa/b: caf\u00e9 100%"
            with pytest.raises(GrpcError) as e:
                await ch.unary("/test.Echo/Nope", b"x")
            assert e.value.code is StatusCode.UNIMPLEMENTED
            assert await ch.unary(UNARY, b"again") == b"echo:again"  # the connection lives on

    run(main())


def test_deadline_exceeded_cancels_the_server_side() -> None:
    async def main() -> None:
        echo = Echo()
        async with serving(echo) as (_, port), Channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(GrpcError) as e:
                await ch.unary(UNARY, b"slow", timeout=0.5)
            assert e.value.code is StatusCode.DEADLINE_EXCEEDED
            await asyncio.wait_for(echo.cancelled.wait(), 20)  # the server let go too
            assert await ch.unary(UNARY, b"ok", timeout=20) == b"echo:ok"

    run(main())


def test_bidi_stream_several_messages_and_server_end() -> None:
    async def main() -> None:
        async with serving(Echo()) as (_, port), Channel(f"127.0.0.1:{port}") as ch:
            call = await ch.stream(BIDI, metadata=[("clusterid", "c")])
            got = []
            for word in (b"a", b"b", b"c"):
                await call.write(word)
                got += [await call.read(), await call.read()]
            assert got == [b"re:a", b"re2:a", b"re:b", b"re2:b", b"re:c", b"re2:c"]
            await call.write(b"end")  # the server returns: the stream ends OK
            assert await call.read() is None
            assert call.status == (StatusCode.OK, "")
            await call.write(b"late")  # writing after a clean end is a no-op
            # The client half-closes: the server's loop ends, so does the call.
            call2 = await ch.stream(BIDI)
            await call2.write(b"x")
            await call2.done_writing()
            assert [await call2.read(), await call2.read(), await call2.read()] == [
                b"re:x", b"re2:x", None]

    run(main())


def test_cancelling_a_stream_reaches_the_server() -> None:
    async def main() -> None:
        echo = Echo()
        async with serving(echo) as (_, port), Channel(f"127.0.0.1:{port}") as ch:
            async with await ch.stream(BIDI) as call:
                await call.write(b"one")
                assert await call.read() == b"re:one"
            # Leaving the block reset the stream (RST_STREAM CANCEL).
            await asyncio.wait_for(echo.cancelled.wait(), 20)
            with pytest.raises(GrpcError) as e:
                await call.read()
            assert e.value.code is StatusCode.CANCELLED
            # A task cancelled while waiting for a unary answer resets that call too.
            echo.cancelled.clear()
            task = asyncio.create_task(ch.unary(UNARY, b"slow"))
            await asyncio.wait_for(echo.entered.wait(), 20)
            task.cancel()
            await asyncio.wait_for(echo.cancelled.wait(), 20)

    run(main())


def test_server_going_away_mid_stream() -> None:
    """A graceful stop (GOAWAY): the calls in flight finish, new calls go elsewhere."""

    async def main() -> None:
        echo = Echo()
        async with serving(echo) as (server, port):
            ch = Channel(f"127.0.0.1:{port}")
            call = await ch.stream(BIDI)
            await call.write(b"a")
            assert [await call.read(), await call.read()] == [b"re:a", b"re2:a"]
            inflight = asyncio.create_task(ch.unary(UNARY, b"wait"))
            await asyncio.wait_for(echo.entered.wait(), 20)
            stopping = asyncio.create_task(server.stop(grace=30))
            conn = ch._conn
            assert conn is not None
            for _ in range(2000):
                if conn.core.goaway is not None:
                    break
                await asyncio.sleep(0.01)
            assert conn.core.goaway is not None and "GOAWAY NO_ERROR" in conn.core.goaway
            echo.release.set()
            assert await asyncio.wait_for(inflight, 20) == b"echo:wait"
            await call.write(b"b")  # the accepted stream goes on after GOAWAY
            assert [await call.read(), await call.read()] == [b"re:b", b"re2:b"]
            # New calls do not use the draining connection; nothing else listens.
            with pytest.raises(GrpcError) as e:
                await ch.unary(UNARY, b"x", timeout=10)
            assert e.value.code is StatusCode.UNAVAILABLE and "cannot connect" in e.value.details
            await call.done_writing()
            assert await call.read() is None
            await asyncio.wait_for(stopping, 20)
            await ch.close()

    run(main())


def test_server_killed_mid_stream_fails_the_stream() -> None:
    async def main() -> None:
        async with serving(Echo()) as (server, port):
            ch = Channel(f"127.0.0.1:{port}")
            call = await ch.stream(BIDI)
            await call.write(b"a")
            assert await call.read() == b"re:a"
            await server.stop(None)
            with pytest.raises(GrpcError) as e:
                for _ in range(5):
                    await call.read()
            assert e.value.code in (StatusCode.UNAVAILABLE, StatusCode.CANCELLED)
            await ch.close()

    run(main())


def test_message_size_limits_both_ways() -> None:
    async def main() -> None:
        async with serving(Echo()) as (_, port), Channel(f"127.0.0.1:{port}",
                                                         max_receive=100_000) as ch:
            assert len(await ch.unary(UNARY, b"big:100000")) == 100_000
            with pytest.raises(GrpcError) as e:
                await ch.unary(UNARY, b"big:100001")
            assert e.value.code is StatusCode.RESOURCE_EXHAUSTED
            assert "100006 bytes" not in e.value.details and "limit of 100000" in e.value.details
            # The server's own 4 MiB receive limit: our 5 MB request crosses several windows.
            with pytest.raises(GrpcError) as e:
                await ch.unary(UNARY, b"y" * 5_000_000)
            assert e.value.code is StatusCode.RESOURCE_EXHAUSTED
            # 3 MB fits: sent through flow control, echoed back within a per-call limit.
            reply = await ch.unary(UNARY, b"z" * 3_000_000, max_receive=4_000_000)
            assert reply == b"echo:" + b"z" * 3_000_000

    run(main())


def _tls_server(names: list[str]) -> tuple[CertificateAuthority, tuple[bytes, bytes]]:
    ca = CertificateAuthority.generate()
    cert = istiod_certificate(ca, dns_names=names)
    return ca, (cert.key_pem, cert.chain_pem)


def test_tls_verified_against_the_root_and_name() -> None:
    async def main() -> None:
        ca, pair = _tls_server(["istiod.istio-system.svc"])
        other, _ = _tls_server(["istiod.istio-system.svc"])
        async with serving(Echo(), tls=pair) as (_, port):
            target = f"127.0.0.1:{port}"
            async with Channel(target, tls=client_tls_context(ca.roots_pem),
                               server_hostname="istiod.istio-system.svc") as ch:
                assert await ch.unary(UNARY, b"tls") == b"echo:tls"
            async with Channel(target, tls=client_tls_context(other.roots_pem),
                               server_hostname="istiod.istio-system.svc") as ch:
                with pytest.raises(GrpcError) as e:
                    await ch.unary(UNARY, b"x")
            assert e.value.code is StatusCode.UNAVAILABLE
            assert "certificate was refused" in e.value.details
            assert "configured root" in e.value.details
            async with Channel(target, tls=client_tls_context(ca.roots_pem),
                               server_hostname="nope.example") as ch:
                with pytest.raises(GrpcError) as e:
                    await ch.unary(UNARY, b"x")
            assert "nope.example" in e.value.details and "refused" in e.value.details
            # Plaintext gRPC to a TLS port is not a hang: it fails.
            async with Channel(target, connect_timeout=10) as ch:
                with pytest.raises(GrpcError) as e:
                    await ch.unary(UNARY, b"x", timeout=10)
            assert e.value.code in (StatusCode.UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED)
        with pytest.raises(GrpcError, match="do not load"):
            client_tls_context(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")

    run(main())


def test_tls_under_uvloop() -> None:
    """ztunnel runs on uvloop: the dial, ALPN check and refusal behave the same there."""
    import uvloop

    async def main() -> None:
        ca, pair = _tls_server(["cp.example"])
        other, _ = _tls_server(["cp.example"])
        async with serving(Echo(), tls=pair) as (_, port):
            async with Channel(f"127.0.0.1:{port}", tls=client_tls_context(ca.roots_pem),
                               server_hostname="cp.example") as ch:
                call = await ch.stream(BIDI)
                await call.write(b"u")
                assert await call.read() == b"re:u"
                call.cancel()
            async with Channel(f"127.0.0.1:{port}", tls=client_tls_context(other.roots_pem),
                               server_hostname="cp.example") as ch:
                with pytest.raises(GrpcError, match="certificate was refused"):
                    await ch.unary(UNARY, b"x")

    uvloop.run(asyncio.wait_for(main(), 60))


def test_keepalive_drops_a_server_that_stops_answering() -> None:
    """A peer that completes the HTTP/2 handshake, then goes silent (a half-dead network):
    the keepalive ping times out and the call fails instead of waiting forever."""
    import h2.config
    import h2.connection

    async def main() -> None:
        silent = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
            conn.initiate_connection()
            writer.write(conn.data_to_send())
            conn.receive_data(await reader.read(65536))  # preface, settings, the call
            writer.write(conn.data_to_send())
            silent.set()
            await reader.read(1 << 20)  # then never answer anything again
            await asyncio.sleep(30)

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        try:
            ch = Channel(f"127.0.0.1:{port}", keepalive=0.2, keepalive_timeout=0.3)
            call = await ch.stream(BIDI)
            await call.write(b"a")
            with pytest.raises(GrpcError) as e:
                await call.read()
            assert e.value.code is StatusCode.UNAVAILABLE
            assert "keepalive ping" in e.value.details
            assert silent.is_set()
            await ch.close()
        finally:
            srv.close()

    run(main())


def test_connection_refused_is_unavailable() -> None:
    async def main() -> None:
        async with serving(Echo()) as (_, port):
            pass
        async with Channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(GrpcError) as e:
                await ch.unary(UNARY, b"x", timeout=10)
        assert e.value.code is StatusCode.UNAVAILABLE
        assert f"cannot connect to 127.0.0.1:{port}" in e.value.details

    run(main())
