"""The raw ``bpf(2)`` syscall through ctypes, and the pinned original-destination map.

Role: ztunnel must read the eBPF capture backend's ``amb_origdst`` map without importing bcc
(bcc is a node-agent dependency, and compiling is not ztunnel's job).  This module is the small
syscall layer both sides share: ``BPF_OBJ_GET`` on a pin path, element lookup/update/delete,
and the program queries the loader uses to find attachments a crashed agent left behind.

Invariants:
- Key and value layouts are defined once here (``pack_conn_key``/``unpack_addr``) and match
  ``struct amb_conn_key``/``struct amb_addr`` in ``bpf/capture.c``: addresses and ports in
  network byte order, the netns cookie in host order, explicit padding.
- ``OrigDstMap`` never keeps a stale map: it re-opens the pin when its inode changes (the agent
  re-created the maps) and drops the fd when the pin is gone.
- Every failure is an ``OSError`` with the errno the kernel gave.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import socket
import struct
import threading

SO_NETNS_COOKIE = 71
PIN_DIR = "/sys/fs/bpf/ambient"
ORIGDST_MAP = "amb_origdst"

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_DETACH = 9
BPF_OBJ_GET = 7
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16

_SYSCALL_NR = {"x86_64": 321, "aarch64": 280}.get(platform.machine())
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

_CONN_KEY = struct.Struct("=Q4sHH")  # netns cookie, ip (net order), port (net order), pad
_ADDR = struct.Struct("=4sHH")  # ip (net order), port (net order), pad
ATTR_SIZE = 128


def bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    """Call ``bpf(cmd, attr, sizeof attr)``; returns the result or raises OSError."""
    if _SYSCALL_NR is None:
        raise OSError(errno.ENOSYS, f"bpf(2) number unknown on {platform.machine()}")
    ret = _libc.syscall(ctypes.c_long(_SYSCALL_NR), ctypes.c_int(cmd), attr,
                        ctypes.c_uint(len(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf(cmd={cmd}): {os.strerror(err)}")
    return int(ret)


def attr(*fields: tuple[int, str, int]) -> ctypes.Array[ctypes.c_char]:
    """A zeroed ``union bpf_attr`` with ``(offset, struct format, value)`` fields set."""
    buf = ctypes.create_string_buffer(ATTR_SIZE)
    for offset, fmt, value in fields:
        struct.pack_into(fmt, buf, offset, value)
    return buf


def addr_of(buf: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buf)


def obj_get(path: str) -> int:
    """An fd for the map or program pinned at ``path``."""
    p = ctypes.create_string_buffer(os.fsencode(path))
    return bpf(BPF_OBJ_GET, attr((0, "=Q", addr_of(p))))


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value stored under ``key``, or None when there is none."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    try:
        bpf(BPF_MAP_LOOKUP_ELEM, attr((0, "=I", map_fd), (8, "=Q", addr_of(k)),
                                      (16, "=Q", addr_of(v))))
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def map_update(map_fd: int, key: bytes, value: bytes) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    bpf(BPF_MAP_UPDATE_ELEM, attr((0, "=I", map_fd), (8, "=Q", addr_of(k)),
                                  (16, "=Q", addr_of(v))))


def map_delete(map_fd: int, key: bytes) -> bool:
    """Delete ``key``; False when it was not there."""
    k = ctypes.create_string_buffer(key, len(key))
    try:
        bpf(BPF_MAP_DELETE_ELEM, attr((0, "=I", map_fd), (8, "=Q", addr_of(k))))
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def map_keys(map_fd: int, key_size: int, limit: int = 1 << 20) -> list[bytes]:
    """Every key of a hash map (``BPF_MAP_GET_NEXT_KEY``), at most ``limit``."""
    keys: list[bytes] = []
    cur: ctypes.Array[ctypes.c_char] | None = None
    for _ in range(limit):
        nxt = ctypes.create_string_buffer(key_size)
        fields = [(0, "=I", map_fd), (16, "=Q", addr_of(nxt))]
        if cur is not None:
            fields.append((8, "=Q", addr_of(cur)))
        try:
            bpf(BPF_MAP_GET_NEXT_KEY, attr(*fields))
        except OSError as e:
            if e.errno == errno.ENOENT:
                break
            raise
        keys.append(nxt.raw)
        cur = nxt
    return keys


def pack_conn_key(netns_cookie: int, ip: str, port: int) -> bytes:
    """Key of ``amb_origdst``: the client's (netns cookie, ip, port)."""
    return _CONN_KEY.pack(netns_cookie, socket.inet_aton(ip), socket.htons(port), 0)


def pack_addr(ip: str, port: int) -> bytes:
    return _ADDR.pack(socket.inet_aton(ip), socket.htons(port), 0)


def unpack_addr(raw: bytes) -> tuple[str, int]:
    ip, port, _ = _ADDR.unpack_from(raw)
    return socket.inet_ntoa(ip), socket.ntohs(port)


def netns_cookie(sock: socket.socket) -> int:
    """The cookie of the netns ``sock`` lives in (``SO_NETNS_COOKIE``, Linux >= 5.14)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    return int(struct.unpack("=Q", raw)[0])


class OrigDstMap:
    """Lookups in the pinned ``amb_origdst`` map, re-opened when the pin changes."""

    def __init__(self, pin_dir: str = PIN_DIR) -> None:
        self.path = os.path.join(pin_dir, ORIGDST_MAP)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._ino: int | None = None

    def _current_fd(self) -> int | None:
        """The fd of the map pinned now (caller holds the lock)."""
        try:
            ino = os.stat(self.path).st_ino
        except FileNotFoundError:
            self._drop()
            return None
        if self._fd is None or ino != self._ino:
            self._drop()
            self._fd, self._ino = obj_get(self.path), ino
        return self._fd

    def _drop(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = self._ino = None

    def available(self) -> bool:
        return os.path.exists(self.path)

    def lookup(self, netns: int, client: tuple[str, int]) -> tuple[str, int] | None:
        """The original destination of the connection from ``client`` in netns ``netns``."""
        with self._lock:
            fd = self._current_fd()
            if fd is None:
                return None
            raw = map_lookup(fd, pack_conn_key(netns, client[0], client[1]), _ADDR.size)
        return None if raw is None else unpack_addr(raw)

    def close(self) -> None:
        with self._lock:
            self._drop()
