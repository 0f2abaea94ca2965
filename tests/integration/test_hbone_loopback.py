"""HBONE client -> server over real mTLS on loopback: relay, statuses, pooling, identity."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import socket
from typing import Any

import pytest
import uvloop
from test_hbone_helpers import (
    CLIENT_ID,
    OTHER_ID,
    SERVER_ID,
    TD,
    Seen,
    client_ctx,
    dial,
    relay_handler,
    server_ctx,
    start_echo,
    transfer,
)

from ambient.hbone.aio import HboneConnectError, Incoming, serve_hbone, start_hbone_server
from ambient.hbone.pool import HbonePool, PoolKey
from ambient.hbone.protocol import build_request_headers

LOOP = ipaddress.IPv4Address("127.0.0.1")


async def _ctx_for(_ident):
    return client_ctx(CLIENT_ID)


def _pool(port: int, dial_fn=dial, **pool_kw) -> tuple[HbonePool, PoolKey]:
    """A client pool (CLIENT_ID) and its key for the server on 127.0.0.1:``port``."""
    pool = HbonePool(dial_fn, _ctx_for, trust_domain=TD, **pool_kw)
    return pool, PoolKey(CLIENT_ID, frozenset({SERVER_ID}), None, (LOOP, port))


def _listening_socket() -> socket.socket:
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    lsock.setblocking(False)
    return lsock


async def _setup(status: int = 200, server_id=SERVER_ID, **pool_kw):
    seen = Seen()
    echo, echo_port = await start_echo()
    srv = await start_hbone_server(
        relay_handler(seen, status), server_ctx(server_id), trust_domain=TD, host="127.0.0.1"
    )
    pool, key = _pool(srv.sockets[0].getsockname()[1], **pool_kw)
    return seen, echo, echo_port, srv, pool, key


async def _teardown(echo, srv, pool) -> None:
    await pool.close()
    srv.close()
    echo.close()


def run(coro, *, use_uvloop: bool = False):
    if use_uvloop:
        return uvloop.run(asyncio.wait_for(coro, 120))
    return asyncio.run(asyncio.wait_for(coro, 120))


@pytest.mark.parametrize("use_uvloop", [False, True], ids=["asyncio", "uvloop"])
def test_echo_large_transfer_both_ways_with_half_close(use_uvloop: bool) -> None:
    async def main() -> None:
        seen, echo, echo_port, srv, pool, key = await _setup()
        try:
            authority = f"127.0.0.1:{echo_port}"
            hdrs = build_request_headers(authority, forwarded_for="10.0.0.9:4444",
                                         baggage="k8s.namespace.name=default")
            stream = await pool.connect(key, authority, hdrs[2:])
            assert stream.peer_identity == SERVER_ID
            payload = os.urandom(20 * 1024 * 1024)
            back = await transfer(stream, payload)
            assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
            await asyncio.sleep(0.05)
            req = seen.requests[0]
            assert req.authority == authority and req.port == echo_port
            assert req.headers["forwarded"] == 'for="10.0.0.9:4444"'
            assert req.headers["baggage"] == "k8s.namespace.name=default"
            assert req.headers["traceparent"].startswith("00-")
            assert seen.peers == [CLIENT_ID]
            for _ in range(100):
                if seen.results:
                    break
                await asyncio.sleep(0.02)
            res = seen.results[0]
            assert res.to_stream == len(payload) and res.from_stream == len(payload)
        finally:
            await _teardown(echo, srv, pool)

    run(main(), use_uvloop=use_uvloop)


@pytest.mark.parametrize("status", [401, 503])
def test_error_status_is_reported(status: int) -> None:
    async def main() -> None:
        _seen, echo, echo_port, srv, pool, key = await _setup(status)
        try:
            with pytest.raises(HboneConnectError) as ei:
                await pool.connect(key, f"127.0.0.1:{echo_port}")
            assert ei.value.status == status
            # the connection survives a refused stream
            assert len(pool.connections(key)) == 1
        finally:
            await _teardown(echo, srv, pool)

    run(main())


def test_upstream_refused_gives_503_and_illegal_port_503() -> None:
    async def main() -> None:
        _seen, echo, _echo_port, srv, pool, key = await _setup()
        try:
            with pytest.raises(HboneConnectError) as ei:
                await pool.connect(key, "127.0.0.1:1")  # nothing listens on port 1
            assert ei.value.status == 503
            with pytest.raises(HboneConnectError) as ei:
                await pool.connect(key, "127.0.0.1:15008")
            assert ei.value.status == 503
            with pytest.raises(HboneConnectError) as ei:
                await pool.connect(key, "example.com:80")
            assert ei.value.status == 400
        finally:
            await _teardown(echo, srv, pool)

    run(main())


def test_pool_shares_connection_and_opens_second_beyond_max_streams() -> None:
    async def main() -> None:
        _seen, echo, echo_port, srv, pool, key = await _setup(max_streams=3)
        try:
            authority = f"127.0.0.1:{echo_port}"
            # concurrent first requests share one dial
            first = await asyncio.gather(*(pool.connect(key, authority) for _ in range(2)))
            assert len(pool.connections(key)) == 1
            assert first[0].connection is first[1].connection
            more = await asyncio.gather(*(pool.connect(key, authority) for _ in range(2)))
            assert len(pool.connections(key)) == 2
            streams = first + more
            for i, s in enumerate(streams):
                assert await transfer(s, b"hello %d" % i) == b"hello %d" % i
            # all finished: a new stream reuses an existing connection
            s = await pool.connect(key, authority)
            assert len(pool.connections(key)) == 2
            assert await transfer(s, b"again") == b"again"
        finally:
            await _teardown(echo, srv, pool)

    run(main())


def test_pool_releases_idle_connections() -> None:
    async def main() -> None:
        _seen, echo, echo_port, srv, pool, key = await _setup(idle_timeout=0.2)
        try:
            s = await pool.connect(key, f"127.0.0.1:{echo_port}")
            assert await transfer(s, b"x") == b"x"
            conn = s.connection
            await asyncio.wait_for(asyncio.shield(conn.closed), 5)
            assert pool.connections(key) == []
            # and a later request dials again
            s = await pool.connect(key, f"127.0.0.1:{echo_port}")
            assert await transfer(s, b"y") == b"y"
        finally:
            await _teardown(echo, srv, pool)

    run(main())


def test_pool_evicts_dead_connections() -> None:
    async def main() -> None:
        _seen, echo, echo_port, srv, pool, key = await _setup()
        try:
            s = await pool.connect(key, f"127.0.0.1:{echo_port}")
            conn = s.connection
            conn.abort()
            await asyncio.wait_for(asyncio.shield(conn.closed), 5)
            with pytest.raises(ConnectionResetError):
                await s.read()
            s2 = await pool.connect(key, f"127.0.0.1:{echo_port}")
            assert s2.connection is not conn
            assert await transfer(s2, b"z") == b"z"
        finally:
            await _teardown(echo, srv, pool)

    run(main())


def test_wrong_server_identity_is_refused() -> None:
    async def main() -> None:
        _seen, echo, echo_port, srv, pool, key = await _setup(server_id=OTHER_ID)
        try:
            with pytest.raises(HboneConnectError) as ei:
                await pool.connect(key, f"127.0.0.1:{echo_port}")
            assert ei.value.reason == "identity"
            assert "impostor" in str(ei.value)
        finally:
            await _teardown(echo, srv, pool)

    run(main())


def test_connect_timeout_message_names_network_policy() -> None:
    async def main() -> None:
        async def slow_dial(_dst):
            await asyncio.sleep(10)

        async def ctx_for(_ident):
            return client_ctx()

        pool = HbonePool(slow_dial, ctx_for, trust_domain=TD, connect_timeout=0.1)
        key = PoolKey(CLIENT_ID, frozenset({SERVER_ID}), None,
                      (ipaddress.IPv4Address("10.0.0.2"), 15008))
        with pytest.raises(HboneConnectError) as ei:
            await pool.connect(key, "10.0.0.2:80")
        assert ei.value.reason == "timeout"
        assert "10.0.0.2:15008" in str(ei.value) and "NetworkPolicy" in str(ei.value)

    run(main())


def test_serve_hbone_on_an_accepted_socket() -> None:
    """The per-socket entry point ztunnel uses for sockets accepted in a pod netns."""

    async def main() -> None:
        seen = Seen()
        echo, echo_port = await start_echo()
        lsock = _listening_socket()
        loop = asyncio.get_running_loop()

        async def accept_one() -> None:
            sock, _ = await loop.sock_accept(lsock)
            await serve_hbone(sock, server_ctx(), relay_handler(seen), trust_domain=TD)

        server_task = asyncio.ensure_future(accept_one())
        pool, key = _pool(lsock.getsockname()[1])
        try:
            s = await pool.connect(key, f"127.0.0.1:{echo_port}")
            assert await transfer(s, b"via accepted socket") == b"via accepted socket"
            await pool.close()
            await asyncio.wait_for(server_task, 5)  # returns once the connection closes
            assert seen.peers == [CLIENT_ID]
        finally:
            server_task.cancel()
            lsock.close()
            echo.close()

    run(main())


def _refusing_handler(seen: Seen, refuse: int, *, goaway: bool = False):
    """Leaves the first ``refuse`` CONNECTs unprocessed (REFUSED_STREAM, or closing the
    connection: its GOAWAY's last stream id is below them), as a draining server does; relays
    the rest."""
    relay_ok = relay_handler(seen)

    async def handler(req, peer, incoming: Incoming) -> None:
        if len(seen.requests) < refuse:
            seen.requests.append(req)
            if goaway:  # its GOAWAY names the last CONNECT answered: none
                incoming.connection.close()
            incoming.refuse()  # after the GOAWAY, no reset goes out
            return
        await relay_ok(req, peer, incoming)

    return handler


async def _refusing_setup(refuse: int, *, goaway: bool = False):
    seen = Seen()
    echo, echo_port = await start_echo()
    srv = await start_hbone_server(_refusing_handler(seen, refuse, goaway=goaway), server_ctx(),
                                   trust_domain=TD, host="127.0.0.1")
    dials: list[socket.socket] = []

    async def counting_dial(dst):
        dials.append(await dial(dst))
        return dials[-1]

    pool, key = _pool(srv.sockets[0].getsockname()[1], counting_dial)
    return seen, echo, echo_port, srv, pool, key, dials


@pytest.mark.parametrize("goaway", [False, True], ids=["refused-stream", "goaway"])
@pytest.mark.parametrize("use_uvloop", [False, True], ids=["asyncio", "uvloop"])
def test_unprocessed_connect_is_retried_on_a_new_connection(goaway: bool, use_uvloop: bool) -> None:
    """A draining server leaves new CONNECTs on a live connection unprocessed; the pool sends
    the CONNECT again on a new connection and never picks the refusing one again."""
    async def main() -> None:
        seen, echo, echo_port, srv, pool, key, dials = await _refusing_setup(1, goaway=goaway)
        try:
            first = await pool.connect(key, f"127.0.0.1:{echo_port}")  # refused, retried
            assert await transfer(first, b"through the retry") == b"through the retry"
            assert len(dials) == 2 and len(seen.requests) == 2
            refusing = [c for c in pool._conns[key] if c is not first.connection]
            # The refusing connection is closed once idle (it had no other stream).
            for c in refusing:
                await asyncio.wait_for(asyncio.shield(c.closed), 5)
            assert pool.connections(key) == [first.connection]
            second = await pool.connect(key, f"127.0.0.1:{echo_port}")
            assert second.connection is first.connection and len(dials) == 2
            assert await transfer(second, b"again") == b"again"
        finally:
            await _teardown(echo, srv, pool)

    run(main(), use_uvloop=use_uvloop)


def test_refusing_connection_keeps_its_live_streams() -> None:
    """A refused CONNECT stops new streams on that connection, not the ones already open."""
    async def main() -> None:
        seen = Seen()
        echo, echo_port = await start_echo()
        relay_ok = relay_handler(seen)
        refuse_now = False

        async def handler(req, peer, incoming: Incoming) -> None:
            if refuse_now:
                incoming.refuse()
                return
            await relay_ok(req, peer, incoming)

        srv = await start_hbone_server(handler, server_ctx(), trust_domain=TD, host="127.0.0.1")
        pool, key = _pool(srv.sockets[0].getsockname()[1])
        try:
            live = await pool.connect(key, f"127.0.0.1:{echo_port}")
            await live.write(b"before\n")
            assert await live.read() == b"before\n"
            refuse_now = True
            with pytest.raises(HboneConnectError) as ei:  # every connection refuses now
                await pool.connect(key, f"127.0.0.1:{echo_port}")
            assert ei.value.reason == "unprocessed" and "draining" in str(ei.value)
            assert live.connection.refusing and not live.connection.closed.done()
            await live.write(b"after\n")
            assert await live.read() == b"after\n"
            live.write_eof()
            assert await live.read() == b""
            await asyncio.wait_for(asyncio.shield(live.connection.closed), 5)
        finally:
            await _teardown(echo, srv, pool)

    run(main())


@pytest.mark.parametrize("use_uvloop", [False, True], ids=["asyncio", "uvloop"])
def test_cancelled_server_connection_lets_the_client_retry_in_flight_connects(
    use_uvloop: bool,
) -> None:
    """Cancelling ``serve_hbone`` (ztunnel's del_pod, or the end of a drain) sends a GOAWAY
    naming the last CONNECT answered: one still waiting for its answer is sent again on a new
    connection instead of failing."""
    async def main() -> None:
        seen = Seen()
        echo, echo_port = await start_echo()
        lsock = _listening_socket()
        loop = asyncio.get_running_loop()
        arrived = asyncio.Event()
        relay_ok = relay_handler(seen)

        async def stuck(req, peer, incoming: Incoming) -> None:  # never answers
            seen.requests.append(req)
            arrived.set()
            await asyncio.Event().wait()

        served: list[asyncio.Future[Any]] = []

        async def serve_two() -> None:  # the first connection is stuck, the second answers
            for handler in (stuck, relay_ok):
                sock, _ = await loop.sock_accept(lsock)
                served.append(asyncio.ensure_future(
                    serve_hbone(sock, server_ctx(), handler, trust_domain=TD)))

        acceptor = asyncio.ensure_future(serve_two())
        pool, key = _pool(lsock.getsockname()[1])
        try:
            pending = asyncio.ensure_future(pool.connect(key, f"127.0.0.1:{echo_port}"))
            await asyncio.wait_for(arrived.wait(), 10)
            served[0].cancel()
            stream = await asyncio.wait_for(pending, 10)
            assert len(seen.requests) == 2  # the stuck one, then the retry
            assert await transfer(stream, b"retried") == b"retried"
        finally:
            await pool.close()
            for t in (acceptor, *served):
                t.cancel()
            await asyncio.gather(acceptor, *served, return_exceptions=True)
            lsock.close()
            echo.close()

    run(main(), use_uvloop=use_uvloop)
