"""``GET /tap`` on the admin port over real loopback sockets: connection events arrive as
newline-delimited JSON, the ``ambientctl tap`` client merges several ztunnels, and a reader
that does not keep up loses events (counted) instead of slowing the data path."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from ambient.model import Workload
from ambient.ops.tap import TapFilter, tap_events
from ambient.ops.targets import AdminTarget, open_stream
from ztunnel.admin import AdminServer
from ztunnel.result import ConnectionResult, ConnectionTracker, ResponseFlags
from ztunnel.tap import TapHub

DB = Workload(uid="Kubernetes//Pod/shop/db", name="db", namespace="shop", service_account="db")
FRONT = Workload(uid="Kubernetes//Pod/shop/frontend", name="frontend", namespace="shop",
                 service_account="frontend")


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def _connection(tracker: ConnectionTracker, allowed: bool, n: int = 0) -> ConnectionResult:
    res = ConnectionResult.open(None, tracker=tracker, reporter="destination",
                                src=("10.244.1.2", 40000 + n), dst=("10.244.2.3", 8080),
                                src_workload=FRONT, dst_workload=DB,
                                src_identity=FRONT.identity(), security_policy="mutual_tls")
    if allowed:
        res.set_decision(True, "shop/db-allow-frontend", "allowed by policy shop/db-allow-frontend")
        res.close(10, 20)
    else:
        reason = "denied: allow policies exist, but none allowed"
        res.set_decision(False, None, reason)
        res.close(0, 0, error=reason, response_flags=ResponseFlags.DENY)
    return res


async def _line(reader: asyncio.StreamReader) -> dict[str, Any]:
    while True:
        raw = await asyncio.wait_for(reader.readline(), 10)
        assert raw, "stream ended"
        if raw.strip():
            return json.loads(raw)  # type: ignore[no-any-return]


def test_events_arrive_in_order_with_the_policy_decision() -> None:
    async def main() -> None:
        tracker = ConnectionTracker()
        srv = AdminServer(connections=tracker)
        host, port = await srv.start("127.0.0.1", 0)
        try:
            reader, writer = await open_stream(AdminTarget("zt", host, port), "/tap")
            assert (await _line(reader))["event"] == "subscribed"
            _connection(tracker, allowed=False)
            _connection(tracker, allowed=True, n=1)
            evs = [await _line(reader) for _ in range(4)]
            assert [e["event"] for e in evs] == ["open", "close", "open", "close"]
            denied = evs[1]
            assert denied["srcWorkload"] == "frontend" and denied["dstNamespace"] == "shop"
            assert denied["srcIdentity"] == "spiffe://cluster.local/ns/shop/sa/frontend"
            assert denied["dstIdentity"] == "spiffe://cluster.local/ns/shop/sa/db"
            assert denied["policy"]["decision"] == "deny" and denied["responseFlags"] == "DENY"
            allowed = evs[3]
            assert allowed["policy"] == {"decision": "allow", "policy": "shop/db-allow-frontend",
                                         "reason": "allowed by policy shop/db-allow-frontend"}
            assert (allowed["bytesSent"], allowed["bytesRecv"]) == (10, 20)
            assert "durationMs" in allowed and allowed["error"] is None
            writer.close()
            # The subscription ends with the client.
            for _ in range(100):
                if not srv.tap or not srv.tap.subscribers:
                    break
                _connection(tracker, allowed=True, n=2)  # a write notices the closed socket
                await asyncio.sleep(0.05)
            assert srv.tap is not None and not srv.tap.subscribers
        finally:
            await srv.close()

    run(main())


def test_client_merges_several_ztunnels_and_filters() -> None:
    async def main() -> None:
        trackers = [ConnectionTracker(), ConnectionTracker()]
        servers = [AdminServer(connections=t) for t in trackers]
        targets = []
        for i, s in enumerate(servers):
            host, port = await s.start("127.0.0.1", 0)
            targets.append(AdminTarget(f"node-{i}", host, port))
        got: list[dict[str, Any]] = []
        subscribed = asyncio.Event()

        def on_sub(n: int) -> None:
            if n == 2:
                subscribed.set()

        task = asyncio.create_task(tap_events(
            targets, TapFilter(denied=True), got.append, count=2, duration=30,
            warn=lambda m: None, on_subscribed=on_sub))
        try:
            await asyncio.wait_for(subscribed.wait(), 10)
            _connection(trackers[0], allowed=True)
            _connection(trackers[0], allowed=False)
            _connection(trackers[1], allowed=False, n=1)
            assert await asyncio.wait_for(task, 20) == 2
        finally:
            for s in servers:
                await s.close()
        assert sorted(e["node"] for e in got) == ["node-0", "node-1"]
        assert all(e["responseFlags"] == "DENY" for e in got)

    run(main())


@pytest.mark.parametrize("other", ["dead", "stuck"])
def test_unreachable_ztunnel_is_reported_and_others_stream(other: str) -> None:
    """``dead`` refuses the connection; ``stuck`` accepts and never confirms its subscription,
    so it is still connecting when the tap ends (count reached): both are reported."""
    async def main() -> None:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # until the tap hangs up
            writer.close()

        stuck = await asyncio.start_server(silent, "127.0.0.1", 0)
        other_port = 1 if other == "dead" else stuck.sockets[0].getsockname()[1]
        label = f"127.0.0.1:{other_port}"  # unnamed targets are labelled host:port
        tracker = ConnectionTracker()
        srv = AdminServer(connections=tracker)
        host, port = await srv.start("127.0.0.1", 0)
        warnings: list[str] = []
        ready = asyncio.Event()
        got: list[dict[str, Any]] = []
        task = asyncio.create_task(tap_events(
            [AdminTarget(label, "127.0.0.1", other_port), AdminTarget("live", host, port)],
            TapFilter(), got.append, count=1, duration=30, warn=warnings.append,
            on_subscribed=lambda n: ready.set()))
        try:
            await asyncio.wait_for(ready.wait(), 10)
            _connection(tracker, allowed=True)
            assert await asyncio.wait_for(task, 20) == 1
        finally:
            await srv.close()
            stuck.close()
        assert [e["node"] for e in got] == ["live"]
        mine = [w for w in warnings if w.startswith(f"tap: {label}:")]
        assert len(mine) == 1 and "not reachable" in mine[0], warnings
        if other == "stuck":
            assert mine[0].endswith("not reachable before the tap ended (no subscription "
                                    "confirmed)"), mine
        assert not [w for w in warnings if "live" in w], warnings

    run(main())


def test_slow_reader_drops_and_counts_without_blocking_the_publisher() -> None:
    async def main() -> None:
        tracker = ConnectionTracker()
        hub = TapHub(tracker, queue_size=16)
        srv = AdminServer(connections=tracker, tap=hub)
        host, port = await srv.start("127.0.0.1", 0)
        try:
            reader, writer = await open_stream(AdminTarget("zt", host, port), "/tap")
            assert (await _line(reader))["event"] == "subscribed"
            # The client reads nothing while 4000 connections open and close (8000 events,
            # several MB): the socket buffers fill, the stream's drain waits, the queue fills.
            for i in range(4000):
                _connection(tracker, allowed=i % 2 == 0, n=i)
                if i % 50 == 0:
                    await asyncio.sleep(0)  # let the stream run, as the data path would
            assert hub.published == 8000
            assert hub.dropped_total > 0
            (sub,) = hub.subscribers
            assert sub.queue.qsize() <= 16
            # Reading now: we get what was queued, then a "dropped" notice with the count.
            seen: list[dict[str, Any]] = []
            while not any(e["event"] == "dropped" for e in seen) and len(seen) < 9000:
                seen.append(await _line(reader))
            dropped = next(e for e in seen if e["event"] == "dropped")
            assert 0 < dropped["count"] <= hub.dropped_total
            writer.close()
        finally:
            await srv.close()
        assert not hub.subscribers

    run(main())


def test_tap_without_tracker_is_503_and_post_is_405() -> None:
    from ambient.ops.targets import TargetError

    async def main() -> None:
        srv = AdminServer()
        host, port = await srv.start("127.0.0.1", 0)
        try:
            try:
                await open_stream(AdminTarget("zt", host, port), "/tap")
            except TargetError as e:
                assert "503" in str(e)
            else:
                raise AssertionError("expected 503")
        finally:
            await srv.close()

    run(main())
