"""The waypoint's upstream HTTP/1.1 pool, in-process on loopback (real HBONE, real servers).

A connection is reused across requests and downstream clients after a clean exchange, never
after ``Connection: close``, an error or a cut body; idle ones expire and their number is
bounded; a pooled connection that died unnoticed costs one resend on a fresh connection.
Metrics and access-log lines stay one per request. Nothing here asserts a duration.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from test_waypoint_helpers import H1, REVIEWS_VIP, http_get, world

from ambient.hbone.aio import StreamResetError
from waypoint.h1 import H1Client
from ztunnel.accesslog import IstioFormatter

VIP = f"{REVIEWS_VIP}:80"
V1 = "10.244.0.11:8081"  # reviews-v1, where "/" routes


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 120))


async def until(cond: Callable[[], bool], what: str, rounds: int = 2000) -> None:
    for _ in range(rounds):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def access_lines(w, path: str) -> list[str]:  # type: ignore[no-untyped-def]
    fmt = IstioFormatter("plain")
    lines = [fmt.format(r) for r in w.access if r.getMessage() == "request complete"]
    return [ln for ln in lines if f'http.path="{path}"' in ln]


def upstream_connects(w) -> int:  # type: ignore[no-untyped-def]
    return sum(1 for authority, _ in w.connects if authority == V1)


async def concurrent_slow(w, n: int, tag: str) -> list[H1]:  # type: ignore[no-untyped-def]
    """``n`` downstream clients, each with one request held upstream until all ``n`` are
    there (so each needs its own upstream connection); all must answer 200."""
    clients = [H1(await w.tunnel(VIP)) for _ in range(n)]
    hits = w.hits["reviews-v1"]
    hits.release.clear()
    reqs = [asyncio.ensure_future(c.request("GET", f"/slow/{tag}{i}"))
            for i, c in enumerate(clients)]
    await until(lambda: sum(v for k, v in hits.by_path.items()
                            if k.startswith(f"/slow/{tag}")) == n, f"{n} requests upstream")
    hits.release.set()
    assert [r.status for r in await asyncio.gather(*reqs)] == [200] * n
    return clients


def test_reused_across_requests_and_downstream_clients_with_per_request_telemetry() -> None:
    async def main() -> None:
        async with world() as w:
            for n in range(2):  # two downstream connections, one after the other
                c = H1(await w.tunnel(VIP))
                for i in range(4):
                    r = await c.request("POST", f"/c{n}/{i}", body=b"b" * (i + 1))
                    assert r.status == 200 and r.json()["path"] == f"/c{n}/{i}"
                    assert r.json()["body"] == "b" * (i + 1)
            up = w.wp.upstreams
            assert up.h1_opened == 1 and upstream_connects(w) == 1
            assert up.idle_connections == 1 and up.stale_retries == 0
            for n in range(2):
                for i in range(4):
                    (line,) = access_lines(w, f"/c{n}/{i}")
                    assert "http.status=200" in line
            _, text = await http_get(w.wp.stats.address[1], "/metrics")
            total = sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                        if ln.startswith("istio_requests_total{") and 'response_code="200"' in ln)
            assert total == 8

    run(main())


def test_concurrent_requests_use_separate_connections_then_all_pooled() -> None:
    async def main() -> None:
        async with world() as w:
            clients = await concurrent_slow(w, 3, "a")
            up = w.wp.upstreams
            assert up.h1_opened == 3 and up.idle_connections == 3
            for c in clients:  # sequential now: the pooled ones serve everything
                assert (await c.request("GET", "/again")).status == 200
            assert up.h1_opened == 3

    run(main())


def test_pool_is_bounded_per_endpoint() -> None:
    async def main() -> None:
        async with world() as w:
            up = w.wp.upstreams
            up.max_idle = 2
            await concurrent_slow(w, 4, "b")
            assert up.h1_opened == 4 and up.idle_connections == 2

    run(main())


@pytest.mark.parametrize("path", ["/close", "/status/500"])
def test_connection_close_is_not_reused_but_error_statuses_are(path: str) -> None:
    async def main() -> None:
        async with world() as w:
            c = H1(await w.tunnel(VIP))
            r = await c.request("GET", path)
            assert r.status == (200 if path == "/close" else 500)
            up = w.wp.upstreams
            # an error *status* is a clean exchange; "Connection: close" is not reusable
            assert up.idle_connections == (0 if path == "/close" else 1)
            assert (await c.request("GET", "/next")).status == 200
            assert up.h1_opened == (2 if path == "/close" else 1)
            assert up.stale_retries == 0

    run(main())


def test_cut_response_body_is_not_reused() -> None:
    async def main() -> None:
        async with world() as w:
            c = H1(await w.tunnel(VIP))
            with pytest.raises(StreamResetError):  # the downstream sees its response cut
                await c.request("GET", "/short")
            up = w.wp.upstreams
            assert up.idle_connections == 0
            assert (await H1(await w.tunnel(VIP)).request("GET", "/after")).status == 200
            assert up.h1_opened == 2 and up.idle_connections == 1
            assert len(access_lines(w, "/short")) == 1

    run(main())


def test_upstream_that_closed_while_idle_is_not_taken() -> None:
    async def main() -> None:
        async with world() as w:
            c = H1(await w.tunnel(VIP))
            assert (await c.request("GET", "/hangup")).status == 200
            up = w.wp.upstreams
            pooled = [cl for st in up._eps.values() for cl in st.idle_h1]
            assert len(pooled) == 1
            await until(lambda: pooled[0].stale, "the server's close to reach the waypoint")
            r = await c.request("POST", "/fresh", body=b"xyz")
            assert r.status == 200 and r.json()["body"] == "xyz"
            assert up.h1_opened == 2 and up.stale_retries == 0

    run(main())


def test_dead_pooled_connection_is_retried_once_on_a_fresh_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with world() as w:
            c = H1(await w.tunnel(VIP))
            assert (await c.request("GET", "/hangup")).status == 200
            up = w.wp.upstreams
            pooled = [cl for st in up._eps.values() for cl in st.idle_h1]
            await until(lambda: pooled[0].stale, "the server's close to reach the waypoint")
            # The close races with our send: the check at checkout does not see it.
            monkeypatch.setattr(H1Client, "stale", property(lambda self: False))
            r = await c.request("POST", "/resent", body=b"payload")
            assert r.status == 200 and r.json()["body"] == "payload"
            assert up.stale_retries == 1 and up.h1_opened == 2
            assert w.hits["reviews-v1"].by_path.get("/resent") == 1
            (line,) = access_lines(w, "/resent")
            assert "http.status=200" in line

    run(main())


def test_idle_connections_expire() -> None:
    async def main() -> None:
        async with world() as w:
            up = w.wp.upstreams
            up.idle_timeout = 0.05
            c = H1(await w.tunnel(VIP))
            assert (await c.request("GET", "/one")).status == 200
            assert up.idle_connections == 1
            await until(lambda: up.idle_connections == 0, "the idle sweep")
            assert (await c.request("GET", "/two")).status == 200
            assert up.h1_opened == 2

    run(main())
