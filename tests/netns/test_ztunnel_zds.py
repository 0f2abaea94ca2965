"""A real in-process ztunnel receiving pods over ZDS from a real node-agent ZdsServer.

Pods are fresh network namespaces (unique names, removed at the end).  The agent opens each
pod's netns at send time and passes the fd by SCM_RIGHTS; ztunnel opens 15001/15006/15008
inside that netns.  Listening sockets are read from ``/proc/thread-self/net/tcp`` on a thread
inside the pod netns, so checking them sends no traffic.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ztunnel_fixtures import start_node, stop_node

from ambient.ca import CertificateAuthority
from ambient.cluster import netlink
from ambient.netns import netns_path, run_in_netns, socket_in_netns
from cni.zds import ZdsError, ZdsPod, ZdsServer
from ztunnel.admin import Readiness
from ztunnel.inpod import WorkloadProxyManager
from ztunnel.main import config_dump

pytestmark = pytest.mark.netns

PORTS = {15001, 15006, 15008}
STEP = 10.0


def listening(ns: str) -> set[int]:
    """TCP ports in LISTEN state inside ``ns`` (IPv4 and IPv6)."""

    def read() -> set[int]:
        ports = set()
        for table in ("tcp", "tcp6"):
            with open(f"/proc/thread-self/net/{table}") as f:
                for line in f.readlines()[1:]:
                    fields = line.split()
                    if fields[3] == "0A":  # TCP_LISTEN
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        return ports

    return run_in_netns(netns_path(ns), read)


def fds_on(ns: str) -> int:
    """How many of this process's fds refer to the netns ``ns`` (by st_dev/st_ino)."""
    st = os.stat(netns_path(ns))
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            fst = os.stat(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if (fst.st_dev, fst.st_ino) == (st.st_dev, st.st_ino):
            n += 1
    return n


async def until(pred: Callable[[], Any], timeout: float = STEP) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := pred()) and loop.time() < deadline:
        await asyncio.sleep(0.02)
    return value


@pytest.fixture
def pods() -> Iterator[list[str]]:
    names = [f"zds-{secrets.token_hex(3)}-{i}" for i in range(2)]
    try:
        for n in names:
            netlink.create_netns(n)
        yield names
    finally:
        for n in names:
            netlink.delete_netns(n)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.generate("cluster.local")


def zpod(ns: str, uid: str = "uid-1", name: str = "app") -> ZdsPod:
    return ZdsPod(uid=uid, name=name, namespace="apps", service_account="app", netns=ns)


def test_listeners_follow_add_and_del(tmp_path, pods, ca):
    ns1, ns2 = pods

    async def main() -> None:
        sock = str(tmp_path / "ztunnel.sock")
        node = await start_node("node1", ca, [])
        readiness = Readiness()
        task_token = readiness.register("workload proxy manager")
        server = ZdsServer(sock, lambda: [])
        await server.start()
        mgr = WorkloadProxyManager(node.zt, sock, on_ready=task_token.done)
        client = asyncio.create_task(mgr.run())
        try:
            assert await server.wait_connections(1) == 1
            assert await until(lambda: readiness.ready)  # the snapshot (empty) arrived
            assert not PORTS & listening(ns1)

            await server.add(zpod(ns1))
            assert PORTS <= listening(ns1)
            assert fds_on(ns1) == 1  # the pod holds exactly the fd it was given
            dump = config_dump(node.zt, mgr)["workloadState"]
            assert dump["uid-1"]["state"] == "Up"
            assert dump["uid-1"]["info"]["serviceAccount"] == "app"

            await server.add(zpod(ns1))  # same netns again: nothing re-bound, fd closed
            assert node.metrics.proxies_started.value() == 1
            assert fds_on(ns1) == 1

            await server.add(zpod(ns2))  # recreated sandbox under the same uid: moves
            assert PORTS <= listening(ns2)
            assert not PORTS & listening(ns1)
            assert fds_on(ns1) == 0 and fds_on(ns2) == 1

            assert await server.delete("uid-1") == []
            assert not PORTS & listening(ns2)
            assert "uid-1" not in node.zt.pods
            assert fds_on(ns2) == 0
        finally:
            client.cancel()
            await asyncio.gather(client, return_exceptions=True)
            await server.close()
            await stop_node(node)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_add_that_cannot_bind_is_nacked_with_the_reason(tmp_path, pods, ca):
    ns1, _ = pods

    async def main() -> None:
        sock = str(tmp_path / "ztunnel.sock")
        node = await start_node("node1", ca, [])
        server = ZdsServer(sock, lambda: [])
        await server.start()
        mgr = WorkloadProxyManager(node.zt, sock, retry_interval=0.05)
        client = asyncio.create_task(mgr.run())
        # Something in the pod already holds 15008 (no SO_REUSEPORT): ztunnel cannot bind.
        blocker = socket_in_netns(netns_path(ns1))
        try:
            blocker.bind(("0.0.0.0", 15008))
            blocker.listen()
            assert await server.wait_connections(1) == 1
            with pytest.raises(ZdsError, match="rejected pod apps/app: .*Address already in use"):
                await server.add(zpod(ns1))
            assert "uid-1" not in node.zt.pods
            assert not {15001, 15006} & listening(ns1)  # nothing half-open left behind
            dump = config_dump(node.zt, mgr)["workloadState"]
            assert dump["uid-1"]["state"] == "Pending"
            assert fds_on(ns1) == 1  # kept for the retry

            blocker.close()  # the port frees up: the pending pod is retried and comes up
            assert await until(lambda: "uid-1" in node.zt.pods)
            assert PORTS <= listening(ns1)
            assert config_dump(node.zt, mgr)["workloadState"]["uid-1"]["state"] == "Up"
            assert fds_on(ns1) == 1
        finally:
            blocker.close()
            client.cancel()
            await asyncio.gather(client, return_exceptions=True)
            await server.close()
            await stop_node(node)
        assert fds_on(ns1) == 0

    asyncio.run(asyncio.wait_for(main(), 60))


def test_snapshot_from_a_restarted_agent(tmp_path, pods, ca):
    """Agent restart: the pods stay served meanwhile; the new snapshot keeps the one it still
    has (same netns: not re-bound) and removes the one it no longer knows."""
    ns1, ns2 = pods

    async def main() -> None:
        sock = str(tmp_path / "ztunnel.sock")
        node = await start_node("node1", ca, [])
        first = [zpod(ns1, "uid-1", "one"), zpod(ns2, "uid-2", "two")]
        server = ZdsServer(sock, lambda: first)
        await server.start()
        mgr = WorkloadProxyManager(node.zt, sock, backoff_initial=0.01, backoff_cap=0.1)
        client = asyncio.create_task(mgr.run())
        try:
            await server.wait_connections(1)
            assert await until(lambda: mgr.ready)
            assert PORTS <= listening(ns1) and PORTS <= listening(ns2)
            await server.close()
            assert await until(lambda: not mgr.connected)
            assert PORTS <= listening(ns1) and PORTS <= listening(ns2)

            server = ZdsServer(sock, lambda: [first[0]])
            await server.start()
            await server.wait_connections(1)
            assert await until(lambda: "uid-2" not in node.zt.pods)
            assert not PORTS & listening(ns2)
            assert PORTS <= listening(ns1)
            assert node.metrics.proxies_started.value() == 2  # uid-1 never re-bound
        finally:
            client.cancel()
            await asyncio.gather(client, return_exceptions=True)
            await server.close()
            await stop_node(node)

    asyncio.run(asyncio.wait_for(main(), 60))
