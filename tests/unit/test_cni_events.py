"""Plugin <-> agent event framing: encode/decode tables, fuzzing, a real unix-socket round trip."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import struct
import tempfile
from collections.abc import Iterator

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cni.events import (
    MAX_FRAME,
    AgentReply,
    AgentUnreachable,
    FrameDecoder,
    FrameError,
    PluginEvent,
    encode_frame,
    send_event,
    serve_events,
)

EVENT = PluginEvent(cmd="add", container_id="c0ffee", netns="/var/run/netns/p1", ifname="eth0",
                    pod_name="p1", pod_namespace="default", pod_uid="u-1",
                    ips=["10.1.0.5", "fd00::5"], interfaces=["eth0"])
REPLY = AgentReply(ok=False, enrolled=True, code=11, message="ztunnel not connected")


def frame_of(obj: object) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


# ------------------------------------------------------------------ framing tables


def test_round_trip_and_byte_at_a_time() -> None:
    data = encode_frame(EVENT) + encode_frame(REPLY) + encode_frame(EVENT)
    assert FrameDecoder().feed(data) == [EVENT, REPLY, EVENT]
    dec = FrameDecoder()
    got = []
    for i in range(len(data)):
        got += dec.feed(data[i:i + 1])
    assert got == [EVENT, REPLY, EVENT]
    assert dec.pending == 0


def test_header_is_big_endian_length_of_a_msgpack_map() -> None:
    data = encode_frame(REPLY)
    (n,) = struct.unpack(">I", data[:4])
    assert n == len(data) - 4
    assert msgpack.unpackb(data[4:]) == {"v": 1, "kind": "reply", "ok": False, "enrolled": True,
                                         "code": 11, "message": "ztunnel not connected"}


def test_partial_frame_waits() -> None:
    data = encode_frame(EVENT)
    dec = FrameDecoder()
    assert dec.feed(data[:-1]) == []
    assert dec.pending == len(data) - 1
    assert dec.feed(data[-1:]) == [EVENT]


def test_unknown_keys_ignored_and_defaults_applied() -> None:
    m = {"v": 1, "kind": "event", "cmd": "del", "container_id": "c", "future": [1, 2]}
    assert FrameDecoder().feed(frame_of(m)) == [PluginEvent(
        cmd="del", container_id="c", netns="", ifname="", pod_name="", pod_namespace="",
        pod_uid="")]
    assert FrameDecoder().feed(frame_of({"v": 1, "kind": "reply", "ok": True})) == [
        AgentReply(ok=True)]


@pytest.mark.parametrize("obj, needle", [
    ([1, 2], "map"),
    ({"kind": "reply", "ok": True}, "version"),
    ({"v": 2, "kind": "reply", "ok": True}, "version"),
    ({"v": 1, "kind": "other"}, "kind"),
    ({"v": 1, "kind": "event", "cmd": "ADD"}, "cmd"),
    ({"v": 1, "kind": "event", "cmd": "add", "netns": 5}, "netns"),
    ({"v": 1, "kind": "event", "cmd": "add", "ips": "10.0.0.1"}, "ips"),
    ({"v": 1, "kind": "event", "cmd": "add", "ips": [b"\x0a\x00\x00\x01"]}, "ips"),
    ({"v": 1, "kind": "reply"}, "ok"),
    ({"v": 1, "kind": "reply", "ok": 1}, "ok"),
    ({"v": 1, "kind": "reply", "ok": True, "code": True}, "code"),
    ({"v": 1, "kind": "reply", "ok": True, "code": "7"}, "code"),
])
def test_invalid_messages(obj: object, needle: str) -> None:
    with pytest.raises(FrameError, match=needle):
        FrameDecoder().feed(frame_of(obj))


@pytest.mark.parametrize("data, needle", [
    (b"\x00\x00\x00\x00", "length 0"),
    (struct.pack(">I", MAX_FRAME + 1), "length"),
    (b"\xff\xff\xff\xff", "length"),
    (b"\x00\x00\x00\x02\xc1\xc1", "msgpack"),  # 0xc1 is never used in msgpack
    (b"\x00\x00\x00\x02\x80\x80", "msgpack"),  # two maps in one frame: extra data
])
def test_bad_frames(data: bytes, needle: str) -> None:
    with pytest.raises(FrameError, match=needle):
        FrameDecoder().feed(data)


def test_decoder_stays_broken_after_an_error() -> None:
    dec = FrameDecoder()
    with pytest.raises(FrameError):
        dec.feed(b"\x00\x00\x00\x00")
    with pytest.raises(FrameError):
        dec.feed(encode_frame(EVENT))


def test_oversize_message_refused_by_encoder() -> None:
    big = PluginEvent(cmd="add", container_id="c", netns="n", ifname="eth0", pod_name="p",
                      pod_namespace="d", pod_uid="u", ips=["x" * 1000] * 70)
    with pytest.raises(FrameError, match="exceeds"):
        encode_frame(big)


def test_largest_frame_accepted() -> None:
    filler = "x" * (MAX_FRAME - 200)
    m = {"v": 1, "kind": "reply", "ok": True, "message": filler}
    body = msgpack.packb(m)
    m["message"] = filler + "y" * (MAX_FRAME - len(body))
    data = frame_of(m)
    assert len(data) == 4 + MAX_FRAME
    assert FrameDecoder().feed(data)[0].message.endswith("y")  # type: ignore[union-attr]


# ------------------------------------------------------------------ fuzzing

events = st.builds(
    PluginEvent, cmd=st.sampled_from(["add", "del", "check"]), container_id=st.text(),
    netns=st.text(), ifname=st.text(max_size=15), pod_name=st.text(), pod_namespace=st.text(),
    pod_uid=st.text(), ips=st.lists(st.text(max_size=40), max_size=8),
    interfaces=st.lists(st.text(max_size=15), max_size=4))
replies = st.builds(AgentReply, ok=st.booleans(), enrolled=st.booleans(),
                    code=st.integers(-(2**63), 2**64 - 1), message=st.text())


@given(st.binary(max_size=2048), st.lists(st.integers(1, 64), max_size=32))
@settings(max_examples=400, deadline=None)
def test_arbitrary_bytes_only_raise_frame_error(data: bytes, cuts: list[int]) -> None:
    dec = FrameDecoder()
    pos = 0
    try:
        for n in [*cuts, len(data)]:
            dec.feed(data[pos:pos + n])
            pos += n
    except FrameError:
        pass


MSGPACK_INTS = st.integers(-(2**63), 2**64 - 1)


@given(st.recursive(st.none() | st.booleans() | MSGPACK_INTS | st.floats() | st.text()
                    | st.binary(), lambda kids: st.lists(kids) | st.dictionaries(
                        st.text() | MSGPACK_INTS, kids), max_leaves=20),
       st.sampled_from(["event", "reply", None]))
@settings(max_examples=300, deadline=None)
def test_arbitrary_msgpack_only_raises_frame_error(obj: object, kind: str | None) -> None:
    if kind is not None and isinstance(obj, dict):
        obj = {**obj, "v": 1, "kind": kind}
    try:
        FrameDecoder().feed(frame_of(obj))
    except FrameError:
        pass


@given(st.lists(events | replies, min_size=1, max_size=5), st.integers(1, 97))
@settings(max_examples=200, deadline=None)
def test_any_message_round_trips_in_any_chunking(msgs: list, step: int) -> None:
    data = b"".join(encode_frame(m) for m in msgs)
    dec = FrameDecoder()
    got = []
    for i in range(0, len(data), step):
        got += dec.feed(data[i:i + step])
    assert got == msgs


# ------------------------------------------------------------------ real unix socket


@pytest.fixture
def sock_dir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="amb-ev-") as d:
        yield d


def _serve_in_thread(path: str, handler) -> tuple[asyncio.AbstractEventLoop, object]:
    import threading

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, object] = {}

    def runner() -> None:
        asyncio.set_event_loop(loop)
        box["server"] = loop.run_until_complete(serve_events(path, handler))
        ready.set()
        loop.run_forever()

    t = threading.Thread(target=runner, daemon=True)
    t.start()
    assert ready.wait(10)
    return loop, (t, box["server"])


def _stop(loop: asyncio.AbstractEventLoop, state: object) -> None:
    t, server = state  # type: ignore[misc]

    async def close() -> None:
        server.close()
        await server.wait_closed()

    asyncio.run_coroutine_threadsafe(close(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    t.join(10)
    loop.close()


def test_round_trip_over_unix_socket(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "run", "pluginevent.sock")
    seen: list[PluginEvent] = []

    async def handler(ev: PluginEvent) -> AgentReply:
        seen.append(ev)
        if ev.cmd == "check":
            raise RuntimeError("rules drifted")
        return AgentReply(ok=True, enrolled=ev.pod_namespace == "default", message="captured")

    loop, state = _serve_in_thread(path, handler)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        reply = send_event(path, EVENT, timeout=10)
        assert reply == AgentReply(ok=True, enrolled=True, message="captured")
        assert seen == [EVENT]
        # a handler exception becomes a refusal, and the server keeps serving
        check = PluginEvent(**{**EVENT.__dict__, "cmd": "check"})
        reply = send_event(path, check, timeout=10)
        assert (reply.ok, reply.code) == (False, 100)
        assert "rules drifted" in reply.message
        # garbage on one connection does not hurt the next one
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(path)
            s.sendall(b"\x00\x00\x00\x00")
            assert s.recv(100) == b""  # closed by the agent
        assert send_event(path, EVENT, timeout=10).ok
        # two events on one connection get two replies, in order
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(path)
            s.sendall(encode_frame(EVENT) + encode_frame(check))
            dec, got = FrameDecoder(), []
            for _ in range(100):
                if len(got) == 2:
                    break
                got += dec.feed(s.recv(65536))
            assert [r.ok for r in got] == [True, False]  # type: ignore[union-attr]
    finally:
        _stop(loop, state)


def test_stale_socket_replaced_live_one_refused(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "pluginevent.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays; nobody listens: a crashed agent's leftover

    async def handler(ev: PluginEvent) -> AgentReply:
        return AgentReply(ok=True)

    loop, state = _serve_in_thread(path, handler)
    try:
        assert send_event(path, EVENT, timeout=10).ok

        async def second() -> None:
            await serve_events(path, handler)

        with pytest.raises(FileExistsError, match="already listening"):
            asyncio.run(second())
        assert send_event(path, EVENT, timeout=10).ok  # the first agent still owns it
    finally:
        _stop(loop, state)


def test_regular_file_not_clobbered(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "pluginevent.sock")
    with open(path, "w") as fh:
        fh.write("keep me")

    async def go() -> None:
        await serve_events(path, handler=None)  # type: ignore[arg-type]

    with pytest.raises(FileExistsError, match="not a socket"):
        asyncio.run(go())
    with open(path) as fh:
        assert fh.read() == "keep me"


def test_unreachable_agent(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "pluginevent.sock")
    with pytest.raises(AgentUnreachable, match="pluginevent.sock"):
        send_event(path, EVENT, timeout=5)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    try:
        with pytest.raises(AgentUnreachable):  # bound, not listening: refused
            send_event(path, EVENT, timeout=5)
        s.listen(1)  # listening but never answering: the timeout ends the wait
        with pytest.raises(AgentUnreachable, match="timed out|no reply"):
            send_event(path, EVENT, timeout=0.2)
    finally:
        s.close()


def test_agent_closing_without_reply_and_garbage_reply(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "pluginevent.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(2)
    import threading

    def agent() -> None:
        for answer in (b"", b"\x00\x00\x00\x00"):
            conn, _ = s.accept()
            with conn:
                conn.recv(65536)
                if answer:
                    conn.sendall(answer)

    t = threading.Thread(target=agent, daemon=True)
    t.start()
    try:
        with pytest.raises(AgentUnreachable, match="without a reply"):
            send_event(path, EVENT, timeout=10)
        with pytest.raises(FrameError):
            send_event(path, EVENT, timeout=10)
    finally:
        t.join(10)
        s.close()
