"""The kernel splice (bpf/splice.py + ambient/splicemap.py) against the real kernel.

A "client" and a "server" netns; the test process plays ztunnel: it owns ``a`` (accepted from
the client app inside the client netns) and ``b`` (dialled to the server app inside the server
netns) and splices them.  The apps are blocking sockets driven from threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from ambient.bpfmap import map_keys, obj_get
from ambient.cluster import netlink
from ambient.netns import socket_in_netns
from ambient.splicemap import PEER_MAP, SPLICE_MAP, KernelSplice, SpliceUnavailable
from bpf import splice as loader

pytestmark = pytest.mark.netns

TIMEOUT = 30.0


@dataclass
class Env:
    client_ns: str
    server_ns: str
    pin_dir: str


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    tag = secrets.token_hex(3)
    e = Env(f"ksc{tag}", f"kss{tag}", f"/sys/fs/bpf/ambtest-splice-{tag}")
    try:
        netlink.create_netns(e.client_ns)
        netlink.create_netns(e.server_ns)
        assert loader.load_splice(e.pin_dir, max_entries=64) is True
        yield e
    finally:
        loader.unload_splice(e.pin_dir)
        netlink.delete_netns(e.client_ns)
        netlink.delete_netns(e.server_ns)
    assert not os.path.exists(e.pin_dir)


@dataclass
class Conn:
    client: socket.socket  # the client app's socket
    a: socket.socket  # ztunnel's, accepted in the client netns
    b: socket.socket  # ztunnel's, dialled in the server netns
    server: socket.socket  # the server app's socket

    def close(self) -> None:
        for s in (self.client, self.a, self.b, self.server):
            s.close()


def listener(ns: str) -> socket.socket:
    s = socket_in_netns(ns)
    s.bind(("127.0.0.1", 0))
    s.listen(4)
    s.settimeout(TIMEOUT)
    return s


def connect(env: Env) -> Conn:
    lc, ls = listener(env.client_ns), listener(env.server_ns)
    try:
        client = socket_in_netns(env.client_ns)
        client.settimeout(TIMEOUT)
        client.connect(lc.getsockname())
        a, _ = lc.accept()
        b = socket_in_netns(env.server_ns)
        b.settimeout(TIMEOUT)
        b.connect(ls.getsockname())
        server, _ = ls.accept()
    finally:
        lc.close()
        ls.close()
    for s in (a, b):
        s.setblocking(False)
    server.settimeout(TIMEOUT)
    return Conn(client, a, b, server)


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - checked by the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def joined(t: threading.Thread, box: dict[str, Any]) -> Any:
    t.join(TIMEOUT)
    assert not t.is_alive(), "an app thread did not finish"
    if "error" in box:
        raise box["error"]
    return box["result"]


def recv_all(s: socket.socket) -> bytes:
    out = bytearray()
    while chunk := s.recv(1 << 20):
        out += chunk
    return bytes(out)


def splice(ks: KernelSplice, conn: Conn, pending: bytes = b"") -> tuple[int, int, Any]:
    async def go() -> tuple[int, int, Any]:
        return await asyncio.wait_for(ks.splice(conn.a, conn.b, pending=pending), TIMEOUT)
    return asyncio.run(go())


@pytest.fixture
def ks(env: Env) -> Iterator[KernelSplice]:
    k = KernelSplice.open(env.pin_dir)
    assert k is not None, KernelSplice.why
    try:
        yield k
    finally:
        k.close()
        fd = obj_get(os.path.join(env.pin_dir, SPLICE_MAP))
        pfd = obj_get(os.path.join(env.pin_dir, PEER_MAP))
        try:  # every splice removed its entries
            assert map_keys(fd, 8) == [] and map_keys(pfd, 8) == []
        finally:
            os.close(fd)
            os.close(pfd)


def test_request_sent_before_the_splice_is_answered(env: Env, ks: KernelSplice) -> None:
    conn = connect(env)
    try:
        conn.client.sendall(b"GET / request-before-splice\n")
        # ztunnel read part of it (one partly read skb stays queued: must not be repeated)
        pending = b""
        while len(pending) < 4:
            with contextlib.suppress(BlockingIOError):
                pending += conn.a.recv(4 - len(pending))

        def server() -> bytes:
            req = conn.server.recv(100)
            conn.server.sendall(b"200 " + req)
            conn.server.shutdown(socket.SHUT_WR)
            return req + recv_all(conn.server)

        def client() -> bytes:
            reply = conn.client.recv(100)  # hangs if the queued request were stuck
            conn.client.shutdown(socket.SHUT_WR)
            return reply + recv_all(conn.client)

        ts, tc = in_thread(server), in_thread(client)
        sent, received, error = splice(ks, conn, pending)
        assert joined(*ts) == b"GET / request-before-splice\n"
        assert joined(*tc) == b"200 GET / request-before-splice\n"
        assert (sent, received, error) == (28, 32, None)
    finally:
        conn.close()


def test_64_mib_each_way_with_data_in_flight_at_hand_over(env: Env, ks: KernelSplice) -> None:
    conn = connect(env)
    size, chunk = 64 << 20, os.urandom(1 << 20)
    try:
        def send_then_read(s: socket.socket, seed: bytes) -> tuple[str, str, int]:
            h = hashlib.sha256()
            for i in range(size // len(chunk)):
                block = seed + chunk[len(seed):] if i == 0 else chunk
                s.sendall(block)
                h.update(block)
            s.shutdown(socket.SHUT_WR)
            got = recv_all(s)
            return h.hexdigest(), hashlib.sha256(got).hexdigest(), len(got)

        def concurrent(s: socket.socket, seed: bytes) -> tuple[str, str, int]:
            box: dict[str, Any] = {}
            reader = threading.Thread(target=lambda: box.update(got=recv_all(s)), daemon=True)
            reader.start()
            h = hashlib.sha256()
            for i in range(size // len(chunk)):
                block = seed + chunk[len(seed):] if i == 0 else chunk
                s.sendall(block)
                h.update(block)
            s.shutdown(socket.SHUT_WR)
            reader.join(TIMEOUT)
            got = box["got"]
            return h.hexdigest(), hashlib.sha256(got).hexdigest(), len(got)

        # both apps start sending before the splice exists: bytes queue on a and b
        tc = in_thread(lambda: concurrent(conn.client, b"client"))
        ts = in_thread(lambda: concurrent(conn.server, b"server"))
        sent, received, error = splice(ks, conn)
        c_sent, c_got, c_len = joined(*tc)
        s_sent, s_got, s_len = joined(*ts)
        assert error is None
        assert (c_len, s_len) == (size, size)
        assert c_sent == s_got and s_sent == c_got
        assert (sent, received) == (size, size)
    finally:
        conn.close()


@pytest.mark.parametrize("first", ["client", "server"])
def test_half_close_each_way(env: Env, ks: KernelSplice, first: str) -> None:
    """The side that closes first still receives everything the other sends afterwards."""
    conn = connect(env)
    closer, talker = (conn.client, conn.server) if first == "client" else (
        conn.server, conn.client)
    tail = os.urandom(3 << 20)
    try:
        def close_first() -> bytes:
            assert closer.recv(1) == b"r"  # came through: the splice is in place
            closer.sendall(b"bye")
            closer.shutdown(socket.SHUT_WR)
            return recv_all(closer)

        def keep_talking() -> bytes:
            talker.sendall(b"r")
            got = recv_all(talker)  # returns at the FIN, passed on after "bye"
            talker.sendall(tail)
            talker.shutdown(socket.SHUT_WR)
            return got

        t1, t2 = in_thread(close_first), in_thread(keep_talking)
        sent, received, error = splice(ks, conn)
        assert joined(*t2) == b"bye"
        assert joined(*t1) == tail
        assert error is None
        expect = (3, 1 + len(tail)) if first == "client" else (1 + len(tail), 3)
        assert (sent, received) == expect
    finally:
        conn.close()


def test_reset_is_passed_on(env: Env, ks: KernelSplice) -> None:
    conn = connect(env)
    try:
        def server() -> None:
            assert conn.server.recv(10) == b"hi"
            conn.server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.server.close()

        def client() -> str:
            conn.client.sendall(b"hi")
            try:
                data = conn.client.recv(10)
            except ConnectionResetError:
                return "reset"
            return f"got {data!r}"

        ts, tc = in_thread(server), in_thread(client)
        sent, received, error = splice(ks, conn)
        joined(*ts)
        assert joined(*tc) == "reset"
        assert isinstance(error, ConnectionResetError)
        assert (sent, received) == (2, 0)
    finally:
        conn.close()


def test_cancelled_splice_resets_both_and_removes_its_entries(env: Env,
                                                              ks: KernelSplice) -> None:
    conn = connect(env)
    try:
        async def go() -> None:
            task = asyncio.create_task(ks.splice(conn.a, conn.b))
            conn.client.sendall(b"ping")
            assert await asyncio.to_thread(conn.server.recv, 10) == b"ping"  # spliced
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(go())
        for app in (conn.client, conn.server):
            with pytest.raises(ConnectionResetError):
                app.recv(10)
    finally:
        conn.close()


def test_connection_closed_before_the_splice_is_refused(env: Env, ks: KernelSplice) -> None:
    """A sockhash takes only established sockets: the caller relays this one itself."""
    conn = connect(env)
    try:
        conn.client.sendall(b"all at once")
        conn.client.shutdown(socket.SHUT_WR)
        conn.a.setblocking(True)
        assert conn.a.recv(100) == b"all at once"  # the FIN is behind it
        conn.a.setblocking(False)
        with pytest.raises(SpliceUnavailable, match="peer closed"):
            splice(ks, conn)
        conn.b.sendall(b"still ours")
        assert conn.server.recv(100) == b"still ours"
    finally:
        conn.close()


def test_missing_pin_gives_no_splice(tmp_path: Any) -> None:
    assert KernelSplice.open(str(tmp_path)) is None
    assert KernelSplice.why is not None and "not loaded" in KernelSplice.why


def test_full_map_refuses_before_any_byte_moves(env: Env) -> None:
    pin = f"{env.pin_dir}-small"
    loader.load_splice(pin, max_entries=2)
    ks = KernelSplice.open(pin)
    assert ks is not None
    one, two = connect(env), connect(env)
    try:
        async def go() -> None:
            first = asyncio.create_task(ks.splice(one.a, one.b))
            one.client.sendall(b"1")
            assert await asyncio.to_thread(one.server.recv, 10) == b"1"  # the map is full now
            two.client.sendall(b"queued")
            with pytest.raises(SpliceUnavailable, match="full"):
                await ks.splice(two.a, two.b)
            # nothing moved and the sockets are still the caller's
            two.a.setblocking(True)
            assert two.a.recv(10) == b"queued"
            two.b.sendall(b"by hand")
            assert await asyncio.to_thread(two.server.recv, 10) == b"by hand"
            one.client.shutdown(socket.SHUT_WR)
            one.server.shutdown(socket.SHUT_WR)
            assert (await first)[2] is None

        asyncio.run(go())
    finally:
        one.close()
        two.close()
        ks.close()
        assert loader.unload_splice(pin) == []
    assert not os.path.exists(pin)


def test_load_is_idempotent_and_replaces_other_pins(env: Env) -> None:
    pin = f"{env.pin_dir}-reload"
    try:
        assert loader.load_splice(pin, max_entries=8) is True
        ino = os.stat(os.path.join(pin, SPLICE_MAP)).st_ino
        assert loader.load_splice(pin, max_entries=8) is False
        assert os.stat(os.path.join(pin, SPLICE_MAP)).st_ino == ino
        assert loader.load_splice(pin, max_entries=16) is True  # another size: replaced
        assert os.stat(os.path.join(pin, SPLICE_MAP)).st_ino != ino
        assert sorted(os.listdir(pin)) == sorted([SPLICE_MAP, PEER_MAP])
    finally:
        assert loader.unload_splice(pin) == []
    assert not os.path.exists(pin)


def test_agent_loads_the_splice_unless_told_not_to(env: Env) -> None:
    from cni.agent_main import parse_args, start_kernel_splice

    pin = f"{env.pin_dir}-agent"
    try:
        off = parse_args(["run", "--bpf-pin-dir", pin, "--kernel-splice", "off"])
        assert start_kernel_splice(off) is False
        assert not os.path.exists(os.path.join(pin, SPLICE_MAP))
        on = parse_args(["run", "--bpf-pin-dir", pin, "--kernel-splice-entries", "32"])
        assert start_kernel_splice(on) is True
        k = KernelSplice.open(pin)
        assert k is not None
        k.close()
        assert start_kernel_splice(on) is True  # a restarted agent reuses it
    finally:
        assert loader.unload_splice(pin) == []
    assert not os.path.exists(pin)
