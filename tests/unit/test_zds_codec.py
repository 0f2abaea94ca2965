"""ZDS codec and state machines (``ambient.zds``): bytes computed by hand from contract C.2.

Field numbers: WorkloadRequest{add=1, del=2, snapshot_sent=3, keep=5}, AddWorkload{uid=1,
workload_info=2}, WorkloadInfo{name=1, namespace=2, service_account=3}, KeepWorkload{uid=1},
DelWorkload{uid=2}, WorkloadResponse{ack=1}, Ack{error=1}, ZdsHello{version=1}, V1=1.
"""

from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ambient import zds
from ambient.zds import (
    Add,
    AddAction,
    AgentSession,
    Del,
    Keep,
    Phase,
    Received,
    SnapshotSent,
    WorkloadInfo,
    ZdsProtocolError,
    ZtunnelSession,
)

INFO = WorkloadInfo("n", "ns", "sa")
FD = 7  # the codec only judges fds; it never uses them

# (id, request, bytes on the wire)
WIRE = [
    # 0a=field1 LEN; 10=16 bytes: 0a 01 'u' | 12 0b (0a 01 'n' 12 02 'ns' 1a 02 'sa')
    ("add", Add("u", INFO), "0a10" "0a0175" "120b" "0a016e" "12026e73" "1a027361"),
    ("add without info", Add("u", None), "0a03" "0a0175"),
    ("keep: field 5, uid field 1", Keep("k"), "2a03" "0a016b"),
    ("del: field 2, uid field 2", Del("d"), "1203" "120164"),
    ("snapshot sent: field 3, empty", SnapshotSent(), "1a00"),
]  # fmt: skip


@pytest.mark.parametrize("req,hexbytes", [c[1:] for c in WIRE], ids=[c[0] for c in WIRE])
def test_request_bytes(req, hexbytes):
    data = bytes.fromhex(hexbytes)
    assert zds.encode_request(req) == data
    fds = [FD] if isinstance(req, Add) else []
    got = zds.decode_request(data, fds, 0)
    assert got == Received(req, FD if fds else None)


@pytest.mark.parametrize("error,hexbytes", [("", "0a00"), ("x", "0a03" "0a0178")])
def test_ack_bytes(error, hexbytes):
    assert zds.encode_ack(error) == bytes.fromhex(hexbytes)
    assert zds.decode_ack(bytes.fromhex(hexbytes), [], 0) == error


def test_hello_bytes():
    assert zds.encode_hello() == bytes.fromhex("0801")
    assert zds.decode_hello(bytes.fromhex("0801"), [], 0) == zds.VERSION_V1
    assert zds.decode_hello(b"", [], 0) == 0  # NOT_USED: the agent rejects it, not the codec


# (id, data hex, fds, flags, words the error must contain)
MALFORMED = [
    ("truncated datagram", "1a00", [], socket.MSG_TRUNC, "truncated"),
    ("truncated ancillary data", "0a03" "0a0175", [FD], socket.MSG_CTRUNC, "ancillary"),
    ("fd on del", "1203" "120164", [FD], 0, "only add"),
    ("fd on keep", "2a03" "0a016b", [FD], 0, "only add"),
    ("fd on snapshot sent", "1a00", [FD], 0, "only add"),
    ("two fds on add", "0a03" "0a0175", [FD, FD + 1], 0, "at most 1 fd"),
    ("add without fd", "0a03" "0a0175", [], 0, "keep"),
    ("empty oneof", "", [], 0, "no payload"),
    ("only unknown fields", "4801", [], 0, "no payload"),
    ("garbage", "ffffffff", [], 0, "not a valid protobuf"),
    ("length past the end", "0a10" "0a01", [], 0, "not a valid protobuf"),
    ("invalid utf-8 uid", "2a03" "0a01ff", [], 0, "not a valid protobuf"),
    ("oversize", "1a00" + "00" * 1023, [], 0, "exceeds"),
]  # fmt: skip


@pytest.mark.parametrize("hexbytes,fds,flags,words", [c[1:] for c in MALFORMED],
                         ids=[c[0] for c in MALFORMED])
def test_malformed_requests(hexbytes, fds, flags, words):
    with pytest.raises(ZdsProtocolError, match=words):
        zds.decode_request(bytes.fromhex(hexbytes), fds, flags)


def test_unknown_fields_are_tolerated():
    # The add of WIRE plus: inside WorkloadInfo the retired field 4 (trust_domain "td"),
    # inside AddWorkload an unknown field 9 (varint 1), at the top an unknown field 15.
    info = "0a016e" "12026e73" "1a027361" "22027464"
    add = "0a0175" "12" + f"{len(info) // 2:02x}" + info + "4801"
    data = bytes.fromhex("0a" + f"{len(add) // 2:02x}" + add + "7801")
    assert zds.decode_request(data, [FD], 0) == Received(Add("u", INFO), FD)
    assert zds.decode_ack(bytes.fromhex("0a00" "1001"), [], 0) == ""


def test_responses_never_carry_fds_or_empty_payloads():
    with pytest.raises(ZdsProtocolError, match="fd"):
        zds.decode_ack(bytes.fromhex("0a00"), [FD], 0)
    with pytest.raises(ZdsProtocolError, match="no payload"):
        zds.decode_ack(b"", [], 0)
    with pytest.raises(ZdsProtocolError, match="fd"):
        zds.decode_hello(bytes.fromhex("0801"), [FD], 0)
    with pytest.raises(ZdsProtocolError, match="truncated"):
        zds.decode_ack(bytes.fromhex("0a00"), [], socket.MSG_TRUNC)


def test_encoder_refuses_oversize_datagrams():
    with pytest.raises(ZdsProtocolError, match="1024"):
        zds.encode_request(Add("u" * 1100, INFO))
    long_error = "e" * 5000  # a NACK reason is cut to fit, never refused
    data = zds.encode_ack(long_error)
    assert len(data) <= zds.MAX_DATAGRAM
    assert zds.decode_ack(data, [], 0).endswith("(truncated)")


def test_fds_from_ancdata():
    import array

    two = array.array("i", [3, 4]).tobytes()
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, two),
           (socket.SOL_SOCKET, socket.SCM_CREDENTIALS, b"\0" * 12),
           (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [5]).tobytes() + b"\1")]
    assert zds.fds_from_ancdata(anc) == [3, 4, 5]
    assert zds.fds_from_ancdata([]) == []


# ---------------------------------------------------------------------------- fuzzing

TEXT = st.text(max_size=40)
REQUESTS = st.one_of(
    st.builds(Add, TEXT, st.one_of(st.none(), st.builds(WorkloadInfo, TEXT, TEXT, TEXT))),
    st.builds(Keep, TEXT),
    st.builds(Del, TEXT),
    st.just(SnapshotSent()),
)


@given(REQUESTS)
@settings(max_examples=400, deadline=None)
def test_round_trip(req):
    data = zds.encode_request(req)
    assert len(data) <= zds.MAX_DATAGRAM
    fd = FD if isinstance(req, Add) else None
    assert zds.decode_request(data, [fd] if fd is not None else [], 0) == Received(req, fd)


@given(st.text(max_size=300))
@settings(max_examples=200, deadline=None)
def test_ack_round_trip(error):
    assert zds.decode_ack(zds.encode_ack(error), [], 0) == error


FLAGS = st.sampled_from([0, socket.MSG_TRUNC, socket.MSG_CTRUNC, socket.MSG_EOR])


@given(st.binary(max_size=1100), st.lists(st.integers(0, 1000), max_size=3), FLAGS)
@settings(max_examples=1500, deadline=None)
def test_arbitrary_bytes_only_raise_protocol_errors(data, fds, flags):
    for decode in (zds.decode_request, zds.decode_ack, zds.decode_hello):
        try:
            decode(data, fds, flags)
        except ZdsProtocolError:
            pass


@given(REQUESTS, st.data())
@settings(max_examples=300, deadline=None)
def test_mutated_requests_only_raise_protocol_errors(req, data):
    raw = bytearray(zds.encode_request(req))
    for _ in range(data.draw(st.integers(1, 4))):
        if raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        zds.decode_request(bytes(raw), [FD], 0)
    except ZdsProtocolError:
        pass


# ---------------------------------------------------------------------------- ztunnel side


def test_ztunnel_session_snapshot_then_add_del():
    s = ZtunnelSession()
    with pytest.raises(ZdsProtocolError, match="before ztunnel sent its hello"):
        s.receive(Keep("a"))
    s.hello_sent()
    assert s.receive(Add("a", INFO)) is None
    assert s.receive(Keep("b")) is None
    assert s.receive(Add("c", INFO)) is None
    assert s.receive(Del("c")) is None  # deleted during the snapshot: not named any more
    assert s.receive(SnapshotSent()) == {"a", "b"}
    assert s.phase is Phase.READY
    assert s.receive(Add("d", INFO)) is None
    assert s.receive(Del("a")) is None


# (id, messages after hello, the error words of the last one)
ZTUNNEL_VIOLATIONS = [
    ("keep after snapshot", [SnapshotSent(), Keep("a")], "after the snapshot"),
    ("second snapshot sent", [SnapshotSent(), SnapshotSent()], "second snapshot"),
    ("add without workload info", [Add("a", None)], "workload_info"),
]  # fmt: skip


@pytest.mark.parametrize("msgs,words", [c[1:] for c in ZTUNNEL_VIOLATIONS],
                         ids=[c[0] for c in ZTUNNEL_VIOLATIONS])
def test_ztunnel_session_violations(msgs, words):
    s = ZtunnelSession()
    s.hello_sent()
    for m in msgs[:-1]:
        s.receive(m)
    with pytest.raises(ZdsProtocolError, match=words):
        s.receive(msgs[-1])


@pytest.mark.parametrize("served,new,want", [
    (None, (1, 10), AddAction.START),
    ((1, 10), (1, 10), AddAction.KEEP),
    ((1, 10), (1, 11), AddAction.REPLACE),
    ((2, 10), (1, 10), AddAction.REPLACE),  # same inode on another device is another netns
])
def test_add_action(served, new, want):
    assert zds.add_action(served, new) is want


# ---------------------------------------------------------------------------- agent side


def test_agent_session_flow():
    s = AgentSession()
    with pytest.raises(ZdsProtocolError, match="before ztunnel's hello"):
        s.sending(Keep("a"), now=0)
    s.hello(zds.VERSION_V1)
    s.sending(Add("a", INFO), now=10.0)
    assert s.waiting_for_ack and s.deadline == 15.0
    assert not s.expired(14.9) and s.expired(15.0)
    with pytest.raises(ZdsProtocolError, match="awaits its ack"):
        s.sending(Keep("b"), now=11)
    assert s.acked("") == Add("a", INFO)
    s.sending(Keep("b"), now=12)
    s.acked("")
    s.sending(Add("c", INFO), now=12)
    s.acked("cannot bind")  # NACKed: ztunnel still keeps it pending
    assert s.pods == {"a", "b", "c"}
    s.sending(SnapshotSent(), now=13)
    assert s.phase is Phase.SNAPSHOT
    s.acked("")
    assert s.phase is Phase.READY
    with pytest.raises(ZdsProtocolError, match="only allowed during the snapshot"):
        s.sending(Keep("d"), now=14)
    with pytest.raises(ZdsProtocolError, match="only allowed during the snapshot"):
        s.sending(SnapshotSent(), now=14)
    s.sending(Del("a"), now=14)
    s.acked("")
    assert s.pods == {"b", "c"}
    with pytest.raises(ZdsProtocolError, match="no request outstanding"):
        s.acked("")


@pytest.mark.parametrize("version", [0, 2, 99])
def test_agent_rejects_other_versions(version):
    with pytest.raises(ZdsProtocolError, match="only V1"):
        AgentSession().hello(version)


def test_agent_rejects_second_hello():
    s = AgentSession()
    s.hello(1)
    with pytest.raises(ZdsProtocolError, match="second hello"):
        s.hello(1)


# ---------------------------------------------------------------------------- timing rules


def test_rate_limiter_five_per_second():
    lim = zds.RateLimiter(5.0)
    assert lim.reserve(100.0) == 0.0
    assert lim.reserve(100.0) == pytest.approx(0.2)  # reserved in advance
    assert lim.reserve(100.0) == pytest.approx(0.4)
    assert lim.reserve(100.4) == pytest.approx(0.2)
    assert lim.reserve(110.0) == 0.0  # idle time refills only up to the burst (1)
    assert lim.reserve(110.0) == pytest.approx(0.2)


def test_backoff_is_capped_and_jitter_bounded():
    delays = zds.backoff_delays(0.01, 15.0)
    seq = [next(delays) for _ in range(20)]
    assert seq[:3] == [0.01, 0.02, 0.04]
    assert max(seq) == 15.0 and seq[-1] == 15.0
    assert zds.jittered(10.0, 0.2, 0.0) == pytest.approx(8.0)
    assert zds.jittered(10.0, 0.2, 0.999999) == pytest.approx(12.0, abs=1e-4)
