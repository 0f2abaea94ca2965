"""ZDS end to end in one process: the agent's ZdsServer and ztunnel's WorkloadProxyManager.

Both ends run over a real SOCK_SEQPACKET unix socket in a temporary directory, with real fds
passed by SCM_RIGHTS.  The ztunnel end drives :class:`RecordingZtunnel`, a stand-in for the
pod API of ``ztunnel.proxy.Ztunnel`` (``add_pod``/``del_pod``/``pods``) that records calls and
owns the fds it is given exactly as the real one does; the real proxy opening listeners in
real pod namespaces is covered by ``tests/netns/test_ztunnel_zds.py``.  Here a "netns" is a
plain file: the protocol only carries an fd, and ztunnel tells namespaces apart by the fd's
(st_dev, st_ino), so distinct files behave as distinct namespaces.

Some tests speak raw ZDS on one side (a socket and the ``ambient.zds`` codec) to play a
misbehaving or silent peer.
"""

from __future__ import annotations

import array
import asyncio
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ambient import zds
from cni.zds import ZdsError, ZdsPod, ZdsServer
from ztunnel.inpod import WorkloadProxyManager

STEP = 10.0  # bound for any single wait


_LOOP = {"kind": "asyncio"}


@pytest.fixture(autouse=True, params=["asyncio", "uvloop"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    """Every test runs on both loops: the agent uses asyncio's, ztunnel uvloop's."""
    _LOOP["kind"] = request.param
    return str(request.param)


def run(coro: Any) -> Any:
    if _LOOP["kind"] == "uvloop":
        import uvloop

        return uvloop.run(asyncio.wait_for(coro, 60))
    return asyncio.run(asyncio.wait_for(coro, 60))


class RecordingZtunnel:
    """The pod API of ``Ztunnel`` (same signatures and fd ownership), recording every call."""

    def __init__(self) -> None:
        self.pods: dict[str, tuple[str, str, int]] = {}
        self.adds: list[str] = []
        self.dels: list[str] = []
        self.fail: dict[str, str] = {}  # uid -> reason its listeners "cannot be opened"

    async def add_pod(self, uid: str, name: str, namespace: str, netns: str | int, *,
                      workload_uid: str | None = None, own_netns: bool = False) -> None:
        assert own_netns and isinstance(netns, int)
        os.fstat(netns)  # a live fd, or this raises
        if uid in self.pods:
            await self.del_pod(uid)
        if uid in self.fail:
            os.close(netns)
            raise OSError(98, f"cannot open ztunnel listeners in the netns of pod "
                              f"{namespace}/{name}: {self.fail[uid]}")
        self.pods[uid] = (name, namespace, netns)
        self.adds.append(uid)

    async def del_pod(self, uid: str) -> None:
        pod = self.pods.pop(uid, None)
        if pod is not None:
            os.close(pod[2])
            self.dels.append(uid)


async def until(pred: Callable[[], Any], timeout: float = STEP) -> Any:
    """Wait on the running loop until ``pred()`` is truthy (bounded); return its value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := pred()) and loop.time() < deadline:
        await asyncio.sleep(0.01)
    return value


def fds_on(*paths: str) -> int:
    """How many of this process's fds refer to one of ``paths`` (by st_dev/st_ino)."""
    want = {(st.st_dev, st.st_ino) for st in map(os.stat, paths)}
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            st = os.stat(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        n += (st.st_dev, st.st_ino) in want
    return n


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Any]:
    """A socket path and three distinct "netns" files."""
    netns = {}
    for name in ("a", "b", "c", "d"):
        p = tmp_path / f"netns-{name}"
        p.write_text(name)
        netns[name] = str(p)
    return {"sock": str(tmp_path / "run" / "ztunnel.sock"), "netns": netns, "tmp": tmp_path}


def pod(env: dict[str, Any], name: str, netns: str | None = None) -> ZdsPod:
    return ZdsPod(uid=f"uid-{name}", name=name, namespace="apps", service_account=f"sa-{name}",
                  netns=netns if netns is not None else env["netns"][name])


class Client:
    """A ztunnel end (manager + recording proxy) running as a task."""

    def __init__(self, path: str, **kw: Any) -> None:
        self.zt = RecordingZtunnel()
        self.ready_calls = 0
        self.mgr = WorkloadProxyManager(self.zt, path, on_ready=self._ready,  # type: ignore[arg-type]
                                        backoff_initial=0.01, backoff_cap=0.1, **kw)
        self.task = asyncio.create_task(self.mgr.run())

    def _ready(self) -> None:
        self.ready_calls += 1

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        for uid in list(self.zt.pods):
            await self.zt.del_pod(uid)


# ---------------------------------------------------------------------------- snapshot


def test_snapshot_add_and_keep_then_ready(env):
    async def main() -> None:
        pods = [pod(env, "a"), pod(env, "gone", netns=str(env["tmp"] / "no-such-netns"))]
        server = ZdsServer(env["sock"], lambda: pods)
        await server.start()
        st = os.stat(env["sock"])
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        client = Client(env["sock"])
        try:
            assert await server.wait_connections(1) == 1
            assert await until(lambda: client.ready_calls)
            assert client.zt.adds == ["uid-a"]  # "gone" had no fd: Keep, nothing to start
            assert client.zt.pods["uid-a"][:2] == ("a", "apps")
            state = client.mgr.workload_state()
            assert state["uid-a"] == {
                "info": {"name": "a", "namespace": "apps", "serviceAccount": "sa-a"},
                "state": "Up",
            }
        finally:
            await client.stop()
            await server.close()
        assert not os.path.exists(env["sock"])

    run(main())


def test_reconnect_after_agent_restart(env):
    """Pods stay served while the agent is away; the next snapshot reconciles."""

    async def main() -> None:
        first = [pod(env, "a"), pod(env, "b"), pod(env, "c")]
        server = ZdsServer(env["sock"], lambda: first)
        await server.start()
        client = Client(env["sock"])
        try:
            await server.wait_connections(1)
            await until(lambda: client.ready_calls)
            assert sorted(client.zt.pods) == ["uid-a", "uid-b", "uid-c"]
            await server.close()
            assert await until(lambda: not client.mgr.connected)
            assert sorted(client.zt.pods) == ["uid-a", "uid-b", "uid-c"]  # data path unaffected

            # The restarted agent lost a's netns (keep), still has b (same netns: no re-bind),
            # no longer has c (stale), and later learns about d.
            second = [pod(env, "a", netns=str(env["tmp"] / "lost")), pod(env, "b")]
            server = ZdsServer(env["sock"], lambda: second)
            await server.start()
            assert await server.wait_connections(1) == 1
            assert await until(lambda: "uid-c" not in client.zt.pods)
            assert sorted(client.zt.pods) == ["uid-a", "uid-b"]
            assert client.zt.adds == ["uid-a", "uid-b", "uid-c"]  # nothing re-bound
            assert client.zt.dels == ["uid-c"]
            await server.add(pod(env, "d"))
            assert "uid-d" in client.zt.pods
            assert client.ready_calls == 1  # readiness is marked once, never again
            assert client.mgr.connections == 2
        finally:
            await client.stop()
            await server.close()
        assert fds_on(*env["netns"].values()) == 0  # every netns fd sent was closed on both ends

    run(main())


def test_add_on_another_netns_replaces_and_same_netns_keeps(env):
    async def main() -> None:
        server = ZdsServer(env["sock"], lambda: [])
        await server.start()
        client = Client(env["sock"])
        try:
            await server.wait_connections(1)
            await server.add(pod(env, "a"))
            first_fd = client.zt.pods["uid-a"][2]
            await server.add(pod(env, "a"))  # same netns again: kept, not re-bound
            assert client.zt.adds == ["uid-a"] and client.zt.pods["uid-a"][2] == first_fd
            await server.add(pod(env, "a", netns=env["netns"]["b"]))  # recreated sandbox
            assert client.zt.adds == ["uid-a", "uid-a"] and client.zt.dels == ["uid-a"]
            served_fd = client.zt.pods["uid-a"][2]
            assert os.fstat(served_fd).st_ino == os.stat(env["netns"]["b"]).st_ino
        finally:
            await client.stop()
            await server.close()

    run(main())


# ---------------------------------------------------------------------------- add / del


def test_add_goes_to_newest_and_del_to_all(env):
    async def main() -> None:
        server = ZdsServer(env["sock"], lambda: [])
        await server.start()
        old = Client(env["sock"])
        new = None
        try:
            assert await server.wait_connections(1) == 1
            new = Client(env["sock"])
            assert await server.wait_connections(2) == 2
            await server.add(pod(env, "a"))
            assert "uid-a" in new.zt.pods and "uid-a" not in old.zt.pods
            # The old ztunnel serves a pod from before (as during a rolling restart).
            await old.zt.add_pod("uid-a", "a", "apps", os.open(env["netns"]["a"], os.O_RDONLY),
                                 own_netns=True)
            assert await server.delete("uid-a") == []
            assert "uid-a" not in new.zt.pods and "uid-a" not in old.zt.pods
            assert await server.delete("uid-unknown") == []  # deleting nothing is fine
        finally:
            for c in (old, new):
                if c is not None:
                    await c.stop()
            await server.close()

    run(main())


def test_no_ztunnel_connected(env):
    async def main() -> None:
        server = ZdsServer(env["sock"], lambda: [])
        await server.start()
        try:
            with pytest.raises(ZdsError, match="no ztunnel is connected on this node"):
                await server.add(pod(env, "a"))
            assert await server.delete("uid-a") == []
            client = Client(env["sock"])
            await server.wait_connections(1)
            await client.stop()  # ztunnel goes away: the server notices without a request
            assert await until(lambda: server.connections == 0)
            with pytest.raises(ZdsError, match="no ztunnel is connected"):
                await server.add(pod(env, "a"))
        finally:
            await server.close()

    run(main())


def test_nack_propagates_and_pending_pod_is_retried(env):
    async def main() -> None:
        server = ZdsServer(env["sock"], lambda: [])
        await server.start()
        client = Client(env["sock"], retry_interval=0.05)
        client.zt.fail["uid-a"] = "Address already in use"
        try:
            await server.wait_connections(1)
            with pytest.raises(ZdsError, match="rejected pod apps/a: .*Address already in use"):
                await server.add(pod(env, "a"))
            state = client.mgr.workload_state()["uid-a"]
            assert state["state"] == "Pending" and "Address already in use" in state["error"]
            assert client.mgr.pending == ["uid-a"]
            del client.zt.fail["uid-a"]  # the port frees up: the retry succeeds
            assert await until(lambda: "uid-a" in client.zt.pods)
            assert client.mgr.workload_state()["uid-a"]["state"] == "Up"
            assert client.mgr.pending == []
        finally:
            await client.stop()
            await server.close()

    run(main())


def test_readiness_waits_for_pending_snapshot_pods(env):
    async def main() -> None:
        server = ZdsServer(env["sock"], lambda: [pod(env, "a")])
        await server.start()
        client = Client(env["sock"], retry_interval=0.05)
        client.zt.fail["uid-a"] = "no room"
        try:
            await server.wait_connections(1)  # the snapshot NACK is only logged by the agent
            assert await until(lambda: client.mgr.snapshot_received)
            assert client.ready_calls == 0
            client.zt.fail.clear()
            assert await until(lambda: client.ready_calls == 1)
        finally:
            await client.stop()
            await server.close()

    run(main())


# ---------------------------------------------------------------------------- raw peers


async def raw_client(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.setblocking(False)
    await asyncio.get_running_loop().sock_connect(s, path)
    return s


async def recv(s: socket.socket) -> tuple[bytes, list[int], int]:
    return await asyncio.wait_for(zds.recv_datagram(s), STEP)


def test_ack_timeout_drops_the_connection(env):
    async def main() -> None:
        server = ZdsServer(env["sock"], lambda: [], ack_timeout=0.3)
        await server.start()
        s = await raw_client(env["sock"])
        try:
            await zds.send_datagram(s, zds.encode_hello())
            data, fds, _ = await recv(s)
            assert zds.decode_request(data, fds).request == zds.SnapshotSent()
            await zds.send_datagram(s, zds.encode_ack())
            assert await server.wait_connections(1) == 1
            with pytest.raises(ZdsError, match="no ack for add uid-a"):
                await server.add(pod(env, "a"))  # ztunnel reads it, never answers
            data, fds, _ = await recv(s)
            got = zds.decode_request(data, fds)
            assert isinstance(got.request, zds.Add) and got.fd is not None
            os.close(got.fd)
            assert server.connections == 0
            data, fds, _ = await recv(s)
            assert (data, fds) == (b"", [])  # the agent hung up
        finally:
            s.close()
            await server.close()

    run(main())


def test_snapshot_ack_timeout_drops_the_connection(env):
    async def main() -> None:
        server = ZdsServer(env["sock"], lambda: [pod(env, "a")], ack_timeout=0.3)
        await server.start()
        s = await raw_client(env["sock"])
        try:
            await zds.send_datagram(s, zds.encode_hello())
            data, fds, _ = await recv(s)
            zds.close_fds(fds)
            data, fds, _ = await recv(s)  # no ack sent: the agent gives up on us
            assert (data, fds) == (b"", [])
            assert server.connections == 0
        finally:
            s.close()
            await server.close()

    run(main())


@pytest.mark.parametrize("version", [0, 2])
def test_other_hello_versions_are_rejected(env, version):
    async def main() -> None:
        server = ZdsServer(env["sock"], lambda: [pod(env, "a")])
        await server.start()
        s = await raw_client(env["sock"])
        try:
            await zds.send_datagram(s, zds.encode_hello(version))
            data, fds, _ = await recv(s)
            assert (data, fds) == (b"", [])  # closed without sending the snapshot
            assert server.connections == 0
        finally:
            s.close()
            await server.close()

    run(main())


async def raw_server(path: str) -> socket.socket:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(path)
    s.listen(4)
    s.setblocking(False)
    return s


def send_raw(s: socket.socket, data: bytes, fds: list[int]) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    s.sendmsg([data], anc)


# (id, datagram, number of fds attached, words the NACK must contain)
BAD_FROM_AGENT = [
    ("fd on del", zds.encode_request(zds.Del("uid-a")), 1, "only add"),
    ("fd on snapshot sent", zds.encode_request(zds.SnapshotSent()), 1, "only add"),
    ("two fds on add", zds.encode_request(zds.Add("uid-a", zds.WorkloadInfo("a", "x", "y"))), 2,
     "at most 1 fd"),
    ("three fds on add", zds.encode_request(zds.Add("uid-a", zds.WorkloadInfo("a", "x", "y"))),
     3, "ancillary data was truncated"),
    ("add without fd", zds.encode_request(zds.Add("uid-a", zds.WorkloadInfo("a", "x", "y"))), 0,
     "must be sent as keep"),
    ("oversize", b"\x1a\x00" + b"\x00" * 1100, 0, "truncated"),
    ("garbage", b"\xff\xff\xff", 0, "not a valid protobuf"),
]  # fmt: skip


@pytest.mark.parametrize("data,nfds,words", [c[1:] for c in BAD_FROM_AGENT],
                         ids=[c[0] for c in BAD_FROM_AGENT])
def test_ztunnel_nacks_malformed_datagrams_and_reconnects(env, data, nfds, words):
    async def main() -> None:
        loop = asyncio.get_running_loop()
        srv = await raw_server(env["sock"])
        client = Client(env["sock"])
        conns: list[socket.socket] = []
        try:
            c, _ = await asyncio.wait_for(loop.sock_accept(srv), STEP)
            c.setblocking(False)
            conns.append(c)
            hello, _, _ = await recv(c)
            assert zds.decode_hello(hello, []) == zds.VERSION_V1
            fds = [os.open(env["netns"]["a"], os.O_RDONLY) for _ in range(nfds)]
            try:
                send_raw(c, data, fds)
            finally:
                zds.close_fds(fds)
            answer, _, _ = await recv(c)
            error = zds.decode_ack(answer, [])
            assert "protocol error" in error and words in error
            closed, _, _ = await recv(c)
            assert closed == b""  # ztunnel dropped the connection...
            c2, _ = await asyncio.wait_for(loop.sock_accept(srv), STEP)  # ...and came back
            conns.append(c2)
            assert client.zt.adds == []
        finally:
            await client.stop()
            for c in conns:
                c.close()
            srv.close()
        assert fds_on(env["netns"]["a"]) == 0  # the fds that came with bad datagrams were closed

    run(main())


def test_keep_after_snapshot_is_a_protocol_error(env):
    async def main() -> None:
        loop = asyncio.get_running_loop()
        srv = await raw_server(env["sock"])
        client = Client(env["sock"])
        try:
            c, _ = await asyncio.wait_for(loop.sock_accept(srv), STEP)
            c.setblocking(False)
            await recv(c)  # hello
            send_raw(c, zds.encode_request(zds.SnapshotSent()), [])
            assert zds.decode_ack((await recv(c))[0], []) == ""
            send_raw(c, zds.encode_request(zds.Keep("uid-a")), [])
            assert "after the snapshot" in zds.decode_ack((await recv(c))[0], [])
            assert (await recv(c))[0] == b""
            c.close()
        finally:
            await client.stop()
            srv.close()

    run(main())


# ---------------------------------------------------------------------------- socket, rate


def test_accept_rate_is_limited(env):
    """Five connections per second: with time frozen, each accept after the first waits
    0.2 s of (fake) time."""

    async def main() -> None:
        now = [1000.0]
        slept: list[float] = []

        async def fake_sleep(d: float) -> None:
            slept.append(d)
            now[0] += d
            await asyncio.sleep(0)

        server = ZdsServer(env["sock"], lambda: [], clock=lambda: now[0], sleep=fake_sleep)
        await server.start()
        socks = []
        try:
            for _ in range(4):
                s = await raw_client(env["sock"])
                socks.append(s)
                await zds.send_datagram(s, zds.encode_hello())
            assert await until(lambda: server.accepted == 4)
            assert slept[:3] == pytest.approx([0.2, 0.2, 0.2])
        finally:
            for s in socks:
                s.close()
            await server.close()

    run(main())


def test_stale_socket_replaced_and_non_socket_refused(env):
    async def main() -> None:
        os.makedirs(os.path.dirname(env["sock"]))
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        stale.bind(env["sock"])
        stale.close()  # a crashed agent's leftover
        server = ZdsServer(env["sock"], lambda: [])
        await server.start()
        client = Client(env["sock"])
        try:
            assert await server.wait_connections(1) == 1
        finally:
            await client.stop()
            await server.close()
        Path(env["sock"]).write_text("not a socket")
        with pytest.raises(ZdsError, match="is not a socket"):
            await ZdsServer(env["sock"], lambda: []).start()

    run(main())


# ---------------------------------------------------------------------------- the process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _ready_status(port: int) -> int | None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        line = await asyncio.wait_for(reader.readline(), STEP)
        return int(line.split()[1]) if line else None
    finally:
        writer.close()


def test_ztunnel_process_is_ready_only_after_the_snapshot(env):
    """``python -m ztunnel`` with INPOD_UDS: /healthz/ready says 500 while no agent is there,
    200 once the agent's snapshot arrived (readiness task "workload proxy manager")."""
    import sys

    from ambient.ca import CertificateAuthority

    async def main() -> None:
        ca_dir = env["tmp"] / "ca"
        CertificateAuthority.generate("cluster.local").save_dir(ca_dir)
        ready_port = _free_port()
        proc_env = {
            **os.environ, "INPOD_UDS": env["sock"], "LOCAL_XDS": "workloads: []\n",
            "CA_DIR": str(ca_dir), "FAKE_CA": "true",
            "ADMIN_ADDR": f"127.0.0.1:{_free_port()}", "STATS_ADDR": f"127.0.0.1:{_free_port()}",
            "READINESS_ADDR": f"127.0.0.1:{ready_port}",
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ztunnel", env=proc_env, cwd=str(Path(__file__).parents[2]),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        server = ZdsServer(env["sock"], lambda: [])
        try:
            status = None
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while status is None and loop.time() < deadline and proc.returncode is None:
                status = await _ready_status(ready_port)
                await asyncio.sleep(0.05)
            assert status == 500  # up, but no agent has sent a snapshot
            await server.start()
            assert await server.wait_connections(1, timeout=20) == 1
            deadline = loop.time() + 20
            while status != 200 and loop.time() < deadline:
                status = await _ready_status(ready_port)
                await asyncio.sleep(0.05)
            assert status == 200
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 15)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            await server.close()

    run(main())
