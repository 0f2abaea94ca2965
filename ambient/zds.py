"""ZDS, the node agent <-> ztunnel protocol: codec, rules and per-side state machines.

Role: everything about ZDS that needs no socket.  The wire format is Istio's
``istio.workload.zds`` (contract C.2): one protobuf message per ``SOCK_SEQPACKET`` datagram, no
length prefix, at most :data:`MAX_DATAGRAM` bytes; a network-namespace fd rides along an
``AddWorkload`` as ``SCM_RIGHTS`` ancillary data, and on no other message.  ztunnel connects
and sends ``ZdsHello{V1}``; the agent replays its pods as Add (with an fd) or Keep (without
one), waiting for an ``Ack`` after each, then sends ``SnapshotSent``; afterwards only Add and
Del flow.  An ``Ack`` with a non-empty ``error`` is a NACK.

Invariants:
- The codec never touches file descriptors: :func:`decode_request` is given the fds that came
  with a datagram and only judges them; the caller owns them and must close every one of them
  when decoding raises (and the non-Add ones never reach it).
- Every decoder raises :class:`ZdsProtocolError` and nothing else for any input; unknown
  protobuf fields are tolerated (forward compatibility), a missing ``oneof`` is not.
- The encoders refuse to build a datagram the peer would reject as over-size.
- The state machines (:class:`ZtunnelSession`, :class:`AgentSession`) are pure: they are told
  what was sent and received and answer with what to do or a :class:`ZdsProtocolError`.

The bottom of the module holds the thin asyncio edge both ends share (non-blocking
``recvmsg``/``sendmsg`` driven by ``loop.add_reader``/``add_writer``): asyncio's
``sock_recv`` cannot return ancillary data, so fds would otherwise need a thread.
"""

from __future__ import annotations

import array
import asyncio
import enum
import os
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError

from ambient.api.istio.workload.zds import zds_pb2 as pb

#: Istio's default socket path (``INPOD_UDS``); the CNI node agent serves it.
DEFAULT_SOCKET_PATH = "/var/run/ztunnel/ztunnel.sock"
#: ztunnel reads each datagram into a buffer of this size; longer ones arrive truncated.
MAX_DATAGRAM = 1024
#: Ancillary space for one fd.  On 64-bit Linux CMSG_SPACE(4) has room for two ints, so a
#: two-fd message still arrives whole (and is rejected as such); three set MSG_CTRUNC.
ANCILLARY_SPACE = socket.CMSG_SPACE(array.array("i").itemsize)
#: The agent's read/write deadline for each message and its Ack.
ACK_TIMEOUT_S = 5.0
#: The agent accepts at most this many new ztunnel connections per second.
ACCEPT_RATE_PER_S = 5.0
VERSION_V1 = pb.V1


class ZdsProtocolError(ValueError):
    """A datagram or a message order that breaks the ZDS contract; the text is for operators."""


# ---------------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class WorkloadInfo:
    name: str
    namespace: str
    service_account: str


@dataclass(frozen=True)
class Add:
    """Start (or refresh) the in-pod proxy; the netns fd travels beside it, not in it."""

    uid: str
    info: WorkloadInfo | None


@dataclass(frozen=True)
class Keep:
    """During the snapshot: keep serving a pod the agent has no fd for."""

    uid: str


@dataclass(frozen=True)
class Del:
    """Stop serving the pod at once."""

    uid: str


@dataclass(frozen=True)
class SnapshotSent:
    """The replay is complete."""


Request = Add | Keep | Del | SnapshotSent


@dataclass(frozen=True)
class Received:
    """A decoded request and, for an Add, the netns fd that came with it."""

    request: Request
    fd: int | None = None


def describe(req: Request) -> str:
    """A short human name for logs: ``add <uid> (ns/name)``."""
    if isinstance(req, Add):
        who = f" ({req.info.namespace}/{req.info.name})" if req.info else ""
        return f"add {req.uid}{who}"
    if isinstance(req, Keep):
        return f"keep {req.uid}"
    if isinstance(req, Del):
        return f"del {req.uid}"
    return "snapshot-sent"


# ---------------------------------------------------------------------------------- encoding


def _checked(data: bytes, what: str) -> bytes:
    if len(data) > MAX_DATAGRAM:
        raise ZdsProtocolError(
            f"{what} would be a {len(data)}-byte datagram, over the {MAX_DATAGRAM}-byte ZDS "
            "limit; are the pod's uid, name or namespace absurdly long?"
        )
    return data


def encode_request(req: Request) -> bytes:
    """The WorkloadRequest datagram for ``req`` (an Add's fd is sent separately)."""
    msg = pb.WorkloadRequest()
    if isinstance(req, Add):
        msg.add.uid = req.uid
        if req.info is not None:
            msg.add.workload_info.name = req.info.name
            msg.add.workload_info.namespace = req.info.namespace
            msg.add.workload_info.service_account = req.info.service_account
    elif isinstance(req, Keep):
        msg.keep.uid = req.uid
    elif isinstance(req, Del):
        getattr(msg, "del").uid = req.uid  # "del" is a Python keyword
    else:
        msg.snapshot_sent.SetInParent()
    return _checked(msg.SerializeToString(), describe(req))


def encode_ack(error: str = "") -> bytes:
    """A WorkloadResponse{ack}: an empty ``error`` acknowledges, anything else is a NACK."""
    msg = pb.WorkloadResponse()
    if len(error.encode()) > MAX_DATAGRAM - 16:
        error = error.encode()[: MAX_DATAGRAM - 32].decode(errors="ignore") + " (truncated)"
    msg.ack.error = error
    return _checked(msg.SerializeToString(), "ack")


def encode_hello(version: int = VERSION_V1) -> bytes:
    return pb.ZdsHello(version=version).SerializeToString()  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- decoding

def _frame_checks(data: bytes, flags: int, what: str) -> None:
    if flags & socket.MSG_TRUNC:
        raise ZdsProtocolError(
            f"received a truncated {what} (over {MAX_DATAGRAM} bytes); the peer speaks a "
            "different ZDS, check that node agent and ztunnel versions match"
        )
    if flags & socket.MSG_CTRUNC:
        raise ZdsProtocolError(
            f"received a {what} whose ancillary data was truncated (more fds than one); "
            "the peer is not following ZDS"
        )
    if len(data) > MAX_DATAGRAM:
        raise ZdsProtocolError(f"{what} of {len(data)} bytes exceeds the {MAX_DATAGRAM}-byte limit")


def _parse(cls: Any, data: bytes, what: str) -> object:
    try:
        return cls.FromString(data)
    except (DecodeError, ValueError, RuntimeError, TypeError, UnicodeError) as e:
        raise ZdsProtocolError(f"{what} is not a valid protobuf message: {e}") from None


def decode_request(data: bytes, fds: list[int], flags: int = 0) -> Received:
    """Judge one datagram from the agent (with its fds and ``recvmsg`` flags).

    Rejects truncation, over-size, unparseable bytes, an empty ``payload``, more than one fd,
    an fd on anything but Add, and an Add without one (an fd-less pod must be a Keep).  On
    error the caller closes ``fds``.
    """
    _frame_checks(data, flags, "workload request")
    if len(fds) > 1:
        raise ZdsProtocolError(f"expected at most 1 fd with a workload request, got {len(fds)}")
    msg = _parse(pb.WorkloadRequest, data, "workload request")
    assert isinstance(msg, pb.WorkloadRequest)
    kind = msg.WhichOneof("payload")
    fd = fds[0] if fds else None
    if kind is None:
        raise ZdsProtocolError("workload request has no payload (empty oneof)")
    if kind == "add":
        if fd is None:
            raise ZdsProtocolError(
                f"add for pod {msg.add.uid!r} came without a netns fd; a pod without one must "
                "be sent as keep"
            )
        info = None
        if msg.add.HasField("workload_info"):
            wi = msg.add.workload_info
            info = WorkloadInfo(wi.name, wi.namespace, wi.service_account)
        return Received(Add(msg.add.uid, info), fd)
    if fd is not None:
        raise ZdsProtocolError(f"a {kind} request carried an fd; only add may carry one")
    if kind == "keep":
        return Received(Keep(msg.keep.uid))
    if kind == "del":
        return Received(Del(getattr(msg, "del").uid))
    return Received(SnapshotSent())


def decode_ack(data: bytes, fds: list[int], flags: int = 0) -> str:
    """The ``error`` of a WorkloadResponse{ack} ("" = acknowledged)."""
    _frame_checks(data, flags, "workload response")
    if fds:
        raise ZdsProtocolError("a workload response carried an fd; responses never do")
    msg = _parse(pb.WorkloadResponse, data, "workload response")
    assert isinstance(msg, pb.WorkloadResponse)
    if msg.WhichOneof("payload") != "ack":
        raise ZdsProtocolError("workload response has no payload (empty oneof)")
    return msg.ack.error


def decode_hello(data: bytes, fds: list[int], flags: int = 0) -> int:
    """The version in a ZdsHello (not checked here: see :meth:`AgentSession.hello`)."""
    _frame_checks(data, flags, "hello")
    if fds:
        raise ZdsProtocolError("the hello carried an fd; only add may carry one")
    msg = _parse(pb.ZdsHello, data, "hello")
    assert isinstance(msg, pb.ZdsHello)
    return int(msg.version)


def fds_from_ancdata(ancdata: Iterable[tuple[int, int, bytes]]) -> list[int]:
    """The fds in ``recvmsg`` ancillary data (SCM_RIGHTS), in order; other cmsgs ignored."""
    fds: list[int] = []
    size = array.array("i").itemsize
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % size)])
            fds.extend(arr)
    return fds


# ---------------------------------------------------------------------------------- ztunnel side


class Phase(enum.Enum):
    HELLO = "hello"  # connected, hello not sent yet
    SNAPSHOT = "snapshot"  # receiving the replay (add/keep/del)
    READY = "ready"  # snapshot done: add/del only


@dataclass
class ZtunnelSession:
    """ztunnel's view of one agent connection: order rules and the snapshot's pod names."""

    phase: Phase = Phase.HELLO
    named: set[str] = field(default_factory=set)

    def hello_sent(self) -> None:
        self.phase = Phase.SNAPSHOT

    def receive(self, req: Request) -> set[str] | None:
        """Check ``req`` against the sequence; for SnapshotSent return the uids to keep."""
        if self.phase is Phase.HELLO:
            raise ZdsProtocolError(f"{describe(req)} arrived before ztunnel sent its hello")
        if isinstance(req, Add):
            if req.info is None:
                raise ZdsProtocolError(f"add for pod {req.uid!r} has no workload_info")
            if self.phase is Phase.SNAPSHOT:
                self.named.add(req.uid)
        elif isinstance(req, Keep):
            if self.phase is Phase.READY:
                raise ZdsProtocolError(f"keep for pod {req.uid!r} arrived after the snapshot")
            self.named.add(req.uid)
        elif isinstance(req, Del):
            self.named.discard(req.uid)
        else:
            if self.phase is Phase.READY:
                raise ZdsProtocolError("a second snapshot-sent arrived on one connection")
            self.phase = Phase.READY
            keep, self.named = self.named, set()
            return keep
        return None


NetnsId = tuple[int, int]


def netns_id(fd: int) -> NetnsId:
    """(st_dev, st_ino) of a netns fd: equal ids mean the same network namespace."""
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


class AddAction(enum.Enum):
    START = "start"  # not served yet
    KEEP = "keep"  # already served in this very netns: do not re-bind
    REPLACE = "replace"  # served in another netns (the pod was recreated): tear down, start


def add_action(served: NetnsId | None, new: NetnsId) -> AddAction:
    if served is None:
        return AddAction.START
    return AddAction.KEEP if served == new else AddAction.REPLACE


# ---------------------------------------------------------------------------------- agent side


@dataclass
class AgentSession:
    """The agent's view of one ztunnel connection.

    Tracks the phase, the single outstanding request (ZDS is strictly request/ack), its
    deadline (time is passed in), and which pods this ztunnel has been told about.
    """

    phase: Phase = Phase.HELLO
    outstanding: Request | None = None
    deadline: float | None = None
    pods: set[str] = field(default_factory=set)

    def hello(self, version: int) -> None:
        if self.phase is not Phase.HELLO:
            raise ZdsProtocolError("ztunnel sent a second hello")
        if version != VERSION_V1:
            raise ZdsProtocolError(
                f"ztunnel speaks ZDS version {version}, this node agent only V1 ({VERSION_V1}); "
                "upgrade the older of the two"
            )
        self.phase = Phase.SNAPSHOT

    def sending(self, req: Request, now: float, timeout: float = ACK_TIMEOUT_S) -> None:
        if self.phase is Phase.HELLO:
            raise ZdsProtocolError(f"cannot send {describe(req)} before ztunnel's hello")
        if self.outstanding is not None:
            raise ZdsProtocolError(
                f"cannot send {describe(req)} while {describe(self.outstanding)} awaits its ack"
            )
        if isinstance(req, Keep | SnapshotSent) and self.phase is Phase.READY:
            raise ZdsProtocolError(f"{describe(req)} is only allowed during the snapshot")
        self.outstanding = req
        self.deadline = now + timeout

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def acked(self, error: str) -> Request:
        """Record the Ack for the outstanding request and return that request."""
        req = self.outstanding
        if req is None:
            raise ZdsProtocolError("ztunnel sent an ack with no request outstanding")
        self.outstanding = None
        self.deadline = None
        if isinstance(req, Add | Keep):
            self.pods.add(req.uid)  # even on a NACK: ztunnel keeps a failed add pending
        elif isinstance(req, Del):
            self.pods.discard(req.uid)
        elif isinstance(req, SnapshotSent):
            self.phase = Phase.READY
        return req

    @property
    def waiting_for_ack(self) -> bool:
        return self.outstanding is not None


class RateLimiter:
    """A token bucket: ``rate`` events per second, bursts of ``burst``; time is passed in."""

    def __init__(self, rate: float = ACCEPT_RATE_PER_S, burst: int = 1) -> None:
        self.interval = 1.0 / rate
        self.burst = burst
        self._tokens = float(burst)
        self._last: float | None = None

    def reserve(self, now: float) -> float:
        """Take a token (possibly in advance); return how long to wait before using it."""
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._last) / self.interval)
        self._last = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens * self.interval


def backoff_delays(initial: float, cap: float, factor: float = 2.0) -> Iterator[float]:
    """Exponential delays without jitter: initial, initial*factor, ... capped at ``cap``."""
    delay = initial
    while True:
        yield min(delay, cap)
        delay = min(delay * factor, cap)


def jittered(delay: float, fraction: float, unit: float) -> float:
    """``delay`` spread by +-``fraction``, given ``unit`` in [0, 1) (random, passed in)."""
    return delay * (1.0 - fraction + 2.0 * fraction * unit)


# ---------------------------------------------------------------------------------- asyncio edge


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


async def _wait_io(sock: socket.socket, *, write: bool) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    if write:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def recv_datagram(sock: socket.socket) -> tuple[bytes, list[int], int]:
    """Receive one datagram from a non-blocking SEQPACKET socket: (data, fds, flags).

    ``data == b""`` with no fds means the peer closed.  The fds belong to the caller.
    """
    while True:
        try:
            data, anc, flags, _ = sock.recvmsg(
                MAX_DATAGRAM, ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            await _wait_io(sock, write=False)
            continue
        return data, fds_from_ancdata(anc), flags


async def send_datagram(sock: socket.socket, data: bytes, fd: int | None = None) -> None:
    """Send one datagram (with ``fd`` as SCM_RIGHTS) on a non-blocking SEQPACKET socket."""
    anc = []
    if fd is not None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
    while True:
        try:
            sock.sendmsg([data], anc)
            return
        except (BlockingIOError, InterruptedError):
            await _wait_io(sock, write=True)
