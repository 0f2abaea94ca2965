"""Kernel splice of two sockets ztunnel owns, through the node agent's pinned eBPF sockmaps.

Role: for a same-node connection ztunnel holds ``a`` (accepted in the client pod; its peer is
the client app) and ``b`` (dialled in the server pod to the server app).  Instead of copying
bytes between them in userspace, :class:`KernelSplice` puts both sockets into the maps that
``bpf/splice.py`` (node agent) pinned, and an ``SK_SKB`` verdict program (``bpf/splice.c``)
redirects every skb one socket receives to the egress of the other.  ztunnel then only watches
for FIN/RST (which the kernel does not carry over) and does the byte accounting.  No bcc here:
only the ``bpf(2)`` layer of :mod:`ambient.bpfmap`.

Invariants:
- Order at hand-over: ``pending`` (bytes a StreamReader had already taken from ``a``) is
  written to ``b`` before the verdict runs on ``a``; bytes already queued in a socket when it
  joins are pushed through the verdict (``SO_RCVLOWAT`` -> ``tcp_data_ready``) in order.
- Fallback: both peer entries go in first, with no program involved; if either insert fails
  both are removed and :class:`SpliceUnavailable` is raised with the sockets untouched and
  still open, so the caller can relay in userspace.  After that point ``splice`` always
  returns a result and has closed both sockets.
- A FIN seen on one side is passed on (``shutdown(SHUT_WR)`` of the other) only after every
  byte that side received has entered the other's send queue (``tcpi_bytes_acked`` +
  ``SIOCOUTQ``), so the FIN never overtakes data the kernel is still moving.
- Errors (RST, cancellation) abort both sockets with ``SO_LINGER`` 0, so each peer sees a RST.
- Byte counts come from ``TCP_INFO`` and are exact: a->b is everything ``a`` received from its
  peer from the first byte of ``pending`` on, b->a everything ``b`` received.
- Map fds are opened per pin generation (the pin's inode) and closed only when no splice uses
  them any more, so an agent that re-creates the pins never breaks a running splice.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import select
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from ambient.bpfmap import (
    map_delete,
    map_info,
    map_update,
    obj_get,
    prog_info_by_id,
    prog_query,
)

log = logging.getLogger("ambient.splicemap")

SPLICE_MAP = "amb_splice"  # membership; the verdict program is attached here
PEER_MAP = "amb_splice_peer"  # redirect targets
VERDICT_PROG = "amb_splice_v"
DEFAULT_MAX_ENTRIES = 65536  # sockets the maps hold: two per spliced connection
MAP_TYPE_SOCKHASH = 18
SK_SKB_STREAM_VERDICT = 5  # enum bpf_attach_type
SO_COOKIE = 57
SIOCINQ = 0x541B
SIOCOUTQ = 0x5411

_KEY = struct.Struct("=Q")
_TCPI_BYTES_ACKED = 120
_TCPI_BYTES_RECEIVED = 128
TCP_INFO_MIN = 136
TCP_ESTABLISHED = 1
# states in which the peer's FIN was received: CLOSE_WAIT, LAST_ACK, CLOSING, TIME_WAIT
_FIN_RECEIVED = frozenset({8, 9, 11, 6})
_EV_ERR = select.EPOLLERR | select.EPOLLHUP
# Only FIN/RST wake us: bytes passed locally (no peer entry) also come with a FIN or an error
# on the peer.  EPOLLIN would wake ztunnel for every skb the kernel moves.
_EV_WATCH = select.EPOLLRDHUP | _EV_ERR
_FLUSH_POLL_S = (0.0005, 0.002, 0.01, 0.05)  # back-off while the kernel drains a queue


class SpliceUnavailable(Exception):  # noqa: N818 - reads as a condition, like TimeoutError
    """The kernel splice cannot take this connection; nothing moved, the sockets are the
    caller's again (still open): relay in userspace."""


# -- pure parts -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TcpCounters:
    state: int  # TCP_ESTABLISHED, ...
    bytes_acked: int  # by the peer: what we sent and it acknowledged (+1 for SYN and FIN)
    bytes_received: int  # in order from the peer, read or still queued (+1 for a FIN)


def parse_tcp_info(raw: bytes) -> TcpCounters:
    """The two byte counters of a ``struct tcp_info`` (Linux >= 4.1).  Pure."""
    if len(raw) < TCP_INFO_MIN:
        raise ValueError(f"TCP_INFO is {len(raw)} bytes; the byte counters need "
                         f"{TCP_INFO_MIN} (Linux >= 4.1)")
    acked, received = struct.unpack_from("=QQ", raw, _TCPI_BYTES_ACKED)
    return TcpCounters(raw[0], int(acked), int(received))


def received_base(received: int, queued: int, pending: int) -> int:
    """``bytes_received`` before the first byte this splice carries.  Pure.

    ``received`` counts bytes still queued (``queued``, SIOCINQ) and the ``pending`` bytes the
    caller already read from the socket; both are part of the splice.
    """
    base = received - queued - pending
    if base < 0:
        raise ValueError(f"pending ({pending}) is more than the socket ever received "
                         f"({received - queued} read)")
    return base


def check_map(name: str, info: tuple[int, int, int, int], max_entries: int | None = None) -> (
        str | None):
    """Why the map ``info`` = (type, key size, value size, max entries) cannot be one of the
    splice maps, or None.  Pure."""
    mtype, key, value, entries = info
    if mtype != MAP_TYPE_SOCKHASH:
        return f"{name} is a map of type {mtype}, not a sockhash ({MAP_TYPE_SOCKHASH})"
    if key != _KEY.size or value not in (4, 8):
        return f"{name} has key/value sizes {key}/{value}, not 8/4"
    if max_entries is not None and entries != max_entries:
        return f"{name} holds {entries} entries, not {max_entries}"
    return None


# -- bpf(2) queries both sides use ----------------------------------------------------------


def attached_verdicts(map_fd: int) -> list[int]:
    """IDs of the stream-verdict programs attached to a sockmap/sockhash."""
    return prog_query(map_fd, SK_SKB_STREAM_VERDICT, 8)


def pin_problem(splice_fd: int, peer_fd: int, max_entries: int | None = None) -> str | None:
    """Why the two opened pins do not make a working splice, or None."""
    s_type, _, s_key, s_val, s_n = map_info(splice_fd)
    p_type, p_id, p_key, p_val, p_n = map_info(peer_fd)
    for name, info in ((SPLICE_MAP, (s_type, s_key, s_val, s_n)),
                       (PEER_MAP, (p_type, p_key, p_val, p_n))):
        why = check_map(name, info, max_entries)
        if why:
            return why
    if s_n != p_n:
        return f"{SPLICE_MAP} and {PEER_MAP} differ in size ({s_n} vs {p_n})"
    progs = attached_verdicts(splice_fd)
    if not progs:
        return f"no verdict program is attached to {SPLICE_MAP}"
    verdict = prog_info_by_id(progs[0])
    if p_id not in verdict.map_ids:
        return f"the verdict program on {SPLICE_MAP} redirects through another {PEER_MAP}"
    return None


def socket_cookie(sock: socket.socket) -> int:
    return int(_KEY.unpack(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0])


def tcp_counters(sock: socket.socket) -> TcpCounters:
    return parse_tcp_info(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256))


def _ioctl_int(sock: socket.socket, request: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(sock.fileno(), request, buf)
    return int(struct.unpack("=i", buf)[0])


def written(sock: socket.socket) -> int:
    """Bytes ever put into ``sock``'s send queue (never more than the truth: the counter is
    read before the queue length, so an ACK in between only makes it smaller)."""
    acked = tcp_counters(sock).bytes_acked
    return acked + _ioctl_int(sock, SIOCOUTQ)


def received_before(sock: socket.socket, pending: int) -> int:
    """:func:`received_base` of an idle socket, from a consistent TCP_INFO/SIOCINQ pair."""
    for _ in range(100):
        before = tcp_counters(sock).bytes_received
        queued = _ioctl_int(sock, SIOCINQ)
        if tcp_counters(sock).bytes_received == before:
            return received_base(before, queued, pending)
    raise SpliceUnavailable("bytes keep arriving faster than their count can be read")


def _abort(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


# -- map generations and the watcher --------------------------------------------------------


class _Maps:
    """The fds of one generation of the pins; closed when retired and unused."""

    def __init__(self, splice_fd: int, peer_fd: int, ino: int) -> None:
        self.splice_fd, self.peer_fd, self.ino = splice_fd, peer_fd, ino
        self.users = 0
        self.retired = False

    def release(self) -> None:
        self.users -= 1
        self._maybe_close()

    def retire(self) -> None:
        self.retired = True
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self.retired and self.users <= 0 and self.splice_fd >= 0:
            os.close(self.splice_fd)
            os.close(self.peer_fd)
            self.splice_fd = self.peer_fd = -1


class _Watcher:
    """One epoll set for every spliced socket, itself watched by the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ep = select.epoll()
        self.handlers: dict[int, Callable[[int], None]] = {}
        loop.add_reader(self.ep.fileno(), self._ready)

    def add(self, fd: int, handler: Callable[[int], None]) -> None:
        self.handlers[fd] = handler
        self.ep.register(fd, _EV_WATCH)

    def quiet(self, fd: int) -> None:
        """Stop reporting EOF (still errors and hang-ups)."""
        self.ep.modify(fd, _EV_ERR)

    def remove(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            try:
                self.ep.unregister(fd)
            except (OSError, ValueError):
                pass

    def _ready(self) -> None:
        for fd, events in self.ep.poll(0, 64):
            handler = self.handlers.get(fd)
            if handler is not None:
                handler(events)

    def close(self) -> None:
        if not self.loop.is_closed():
            self.loop.remove_reader(self.ep.fileno())
        self.ep.close()


# -- the splice -----------------------------------------------------------------------------


class KernelSplice:
    """Splices socket pairs in the kernel through the maps pinned in ``pin_dir``."""

    why: str | None = None  # why the last open() returned None
    _logged: set[str] = set()

    def __init__(self, pin_dir: str, maps: _Maps) -> None:
        self.pin_dir = pin_dir
        self._maps = maps
        self._watcher: _Watcher | None = None
        self.active = 0

    @classmethod
    def open(cls, pin_dir: str) -> KernelSplice | None:
        """The splice over the pins in ``pin_dir``, or None (reason in ``KernelSplice.why``,
        logged once per distinct reason)."""
        try:
            maps = cls._open_maps(pin_dir)
        except SpliceUnavailable as e:
            cls.why = str(e)
            if cls.why not in cls._logged:
                cls._logged.add(cls.why)
                log.info("kernel splice not used: %s", cls.why)
            return None
        cls.why = None
        return cls(pin_dir, maps)

    @staticmethod
    def _open_maps(pin_dir: str) -> _Maps:
        spath, ppath = os.path.join(pin_dir, SPLICE_MAP), os.path.join(pin_dir, PEER_MAP)
        try:
            ino = os.stat(spath).st_ino
            sfd = obj_get(spath)
        except OSError as e:
            raise SpliceUnavailable(f"{spath} is not there ({e.strerror}): the node agent has "
                                    "not loaded the kernel splice (KERNEL_SPLICE=off, or no "
                                    "eBPF support; see its log)") from None
        try:
            pfd = obj_get(ppath)
        except OSError as e:
            os.close(sfd)
            raise SpliceUnavailable(f"{ppath}: {e.strerror}; restart the node agent") from None
        try:
            why = pin_problem(sfd, pfd)
        except OSError as e:
            why = f"inspecting the pinned maps failed: {e}"
        if why:
            os.close(sfd)
            os.close(pfd)
            raise SpliceUnavailable(f"{why}; restart the node agent to re-create {pin_dir}")
        return _Maps(sfd, pfd, ino)

    def _current(self) -> _Maps:
        """The maps pinned now (re-opened when the agent re-created them)."""
        try:
            ino = os.stat(os.path.join(self.pin_dir, SPLICE_MAP)).st_ino
        except OSError:
            raise SpliceUnavailable(f"{self.pin_dir}/{SPLICE_MAP} is gone (node agent "
                                    "uninstalled or restarting)") from None
        if ino != self._maps.ino or self._maps.splice_fd < 0:
            fresh = self._open_maps(self.pin_dir)
            self._maps.retire()
            self._maps = fresh
        return self._maps

    def _watch(self) -> _Watcher:
        loop = asyncio.get_running_loop()
        if self._watcher is None or self._watcher.loop is not loop:
            if self._watcher is not None and not self._watcher.handlers:
                self._watcher.close()
            self._watcher = _Watcher(loop)
        return self._watcher

    async def splice(self, a: socket.socket, b: socket.socket, *,
                     pending: bytes = b"") -> tuple[int, int, BaseException | None]:
        """Let the kernel move bytes between ``a`` and ``b`` until both directions ended or
        one failed.  Returns (bytes a->b including ``pending``, bytes b->a, error or None) and
        closes both sockets.  Raises :class:`SpliceUnavailable` (sockets untouched and open)
        when the maps cannot take the pair."""
        maps = self._current()
        maps.users += 1
        try:
            s = _Session(a, b, pending, maps, self._watch())
            s.join_peers()
        except BaseException:
            maps.release()
            raise
        self.active += 1
        try:
            return await s.run()
        finally:
            self.active -= 1
            maps.release()

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        self._maps.retire()


class _Session:
    """One spliced pair; side 0 is ``a``, side 1 is ``b``."""

    def __init__(self, a: socket.socket, b: socket.socket, pending: bytes, maps: _Maps,
                 watcher: _Watcher) -> None:
        self.socks = (a, b)
        self.pending = pending
        self.maps = maps
        self.watcher = watcher
        self.wake = asyncio.Event()
        self.events = [0, 0]
        self.eof = [False, False]  # side i's peer app sent FIN
        self.shut = [False, False]  # FIN passed on to side i's peer app
        self.error: BaseException | None = None
        try:
            self.cookies = (socket_cookie(a), socket_cookie(b))
            # Side i received this much before the splice's first byte ...
            self.rx_base = (received_before(a, len(pending)), received_before(b, 0))
            # ... and had this much in its send queue.
            self.tx_base = (written(a), written(b))
        except OSError as e:
            raise SpliceUnavailable(f"reading socket state failed: {e}") from None
        self.keys = tuple(_KEY.pack(c) for c in self.cookies)
        self.peers_in = False
        self.members_in = [False, False]

    def join_peers(self) -> None:
        """Both redirect targets, or neither (then SpliceUnavailable)."""
        a, b = self.socks
        try:
            map_update(self.maps.peer_fd, self.keys[0], struct.pack("=I", b.fileno()))
        except OSError as e:
            raise SpliceUnavailable(self._why_insert(e)) from None
        try:
            map_update(self.maps.peer_fd, self.keys[1], struct.pack("=I", a.fileno()))
        except OSError as e:
            map_delete(self.maps.peer_fd, self.keys[0])
            raise SpliceUnavailable(self._why_insert(e)) from None
        self.peers_in = True

    @staticmethod
    def _why_insert(e: OSError) -> str:
        if e.errno in (errno.E2BIG, errno.ENOSPC):
            return "the splice map is full (raise the node agent's --kernel-splice-entries)"
        if e.errno == errno.EOPNOTSUPP:
            return ("a socket is no longer an established TCP connection (its peer closed "
                    "it already?)")
        return f"inserting into the splice map failed: {e}"

    async def run(self) -> tuple[int, int, BaseException | None]:
        a, b = self.socks
        loop = asyncio.get_running_loop()
        try:
            # The verdict would re-send the already-read head of a partly read skb
            # (tcp_read_skb ignores the read offset): empty both queues into userspace first.
            to_b = self.pending + _drain(a)
            to_a = _drain(b)
            if to_b:
                await loop.sock_sendall(b, to_b)
            if to_a:
                await loop.sock_sendall(a, to_a)
            for i in (0, 1):
                self._join(i)
            for i in (0, 1):
                self.watcher.add(self.socks[i].fileno(), self._handler(i))
                if self.members_in[i]:
                    # Bytes queued before the socket joined go through the verdict now.
                    self.socks[i].setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            await self._loop()
        except asyncio.CancelledError:
            self._finish(abort=True)
            raise
        except OSError as e:
            self.error = e
        return self._finish(abort=self.error is not None)

    def _join(self, i: int) -> None:
        """Turn the verdict on for side ``i``.  A side whose app closed meanwhile (the apps
        may have answered the bytes forwarded above) cannot join; it will not receive more
        than what is queued, which the event handler forwards, with the FIN."""
        sock = self.socks[i]
        try:
            map_update(self.maps.splice_fd, self.keys[i], struct.pack("=I", sock.fileno()))
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP or tcp_counters(sock).state == TCP_ESTABLISHED:
                raise
            return
        self.members_in[i] = True

    def _handler(self, i: int) -> Callable[[int], None]:
        def on_event(events: int) -> None:
            self.events[i] |= events
            self.wake.set()
        return on_event

    async def _loop(self) -> None:
        poll = 0
        while not (self.shut[0] and self.shut[1]) and self.error is None:
            waiting = any(self.eof[i] and not self.shut[1 - i] for i in (0, 1))
            if waiting:
                try:
                    await asyncio.wait_for(self.wake.wait(), _FLUSH_POLL_S[poll])
                except TimeoutError:
                    pass
                poll = min(poll + 1, len(_FLUSH_POLL_S) - 1)
            else:
                await self.wake.wait()
                poll = 0
            self.wake.clear()
            for i in (0, 1):
                events, self.events[i] = self.events[i], 0
                if events:
                    await self._on_events(i, events)
                if self.error is None and self.eof[i] and not self.shut[1 - i]:
                    self._pass_fin(i)
            for i in (0, 1):
                if self.eof[i] and self.shut[i]:  # both ways closed: nothing more to see
                    self.watcher.remove(self.socks[i].fileno())

    async def _on_events(self, i: int, events: int) -> None:
        sock, peer = self.socks[i], self.socks[1 - i]
        loop = asyncio.get_running_loop()
        for _ in range(1024):  # bytes the verdict left here (no peer entry), then EOF
            try:
                data = sock.recv(256 * 1024, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as e:
                self.error = e
                return
            if not data:
                if not self.eof[i]:
                    self.eof[i] = True
                    self.watcher.quiet(sock.fileno())
                break
            await loop.sock_sendall(peer, data)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.error = ConnectionResetError(err, os.strerror(err))
        elif events & select.EPOLLHUP and not self.eof[i]:
            self.error = ConnectionResetError(errno.ECONNRESET, "connection closed")

    def _received(self, i: int) -> int:
        """Payload bytes side ``i`` received within the splice (a FIN counts one in
        ``tcpi_bytes_received``; it is not payload)."""
        info = tcp_counters(self.socks[i])
        n = info.bytes_received - self.rx_base[i]
        return n - 1 if self.eof[i] or info.state in _FIN_RECEIVED else n

    def _pass_fin(self, i: int) -> None:
        """Shut the other side's sending half once all that side ``i`` received went out."""
        peer = 1 - i
        try:
            carried = self._received(i)
            queued = written(self.socks[peer]) - self.tx_base[peer]
            if queued < carried:
                return  # the kernel is still moving bytes into the peer's send queue
            self.socks[peer].shutdown(socket.SHUT_WR)
        except OSError as e:
            self.error = e
            return
        self.shut[peer] = True

    def _finish(self, *, abort: bool) -> tuple[int, int, BaseException | None]:
        counts = [0, 0]
        for i in (0, 1):
            try:
                counts[i] = self._received(i)
            except OSError:
                pass
        for i in (0, 1):
            self.watcher.remove(self.socks[i].fileno())
            if self.members_in[i]:
                _delete(self.maps.splice_fd, self.keys[i])
        if self.peers_in:
            for key in self.keys:
                _delete(self.maps.peer_fd, key)
        for sock in self.socks:
            if abort:
                _abort(sock)
            else:
                sock.close()
        return counts[0], counts[1], self.error


def _drain(sock: socket.socket) -> bytes:
    """Everything queued in ``sock`` now (it is not spliced yet)."""
    out = bytearray()
    for _ in range(4096):
        try:
            data = sock.recv(256 * 1024, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        if not data:
            break
        out += data
    return bytes(out)


def _delete(fd: int, key: bytes) -> None:
    try:
        map_delete(fd, key)
    except OSError as e:  # a closed socket left on its own; anything else is worth a line
        log.warning("removing a kernel splice entry failed: %s", e)
