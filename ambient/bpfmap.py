"""The raw ``bpf(2)`` syscall through ctypes, and the pinned original-destination map.

Role: ztunnel must read the eBPF capture backend's ``amb_origdst`` map without importing bcc
(bcc is a node-agent dependency, and compiling is not ztunnel's job).  This module is the small
syscall layer both sides share: ``BPF_OBJ_GET``/``BPF_OBJ_PIN`` on a pin path, element
lookup/update/delete, and the map/program queries (``BPF_OBJ_GET_INFO_BY_FD``,
``BPF_PROG_QUERY``) the loaders and the kernel splice use to inspect what is pinned or attached.

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
from dataclasses import dataclass

SO_NETNS_COOKIE = 71
PIN_DIR = "/sys/fs/bpf/ambient"
ORIGDST_MAP = "amb_origdst"

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16

_SYSCALL_NR = {"x86_64": 321, "aarch64": 280}.get(platform.machine())
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

_CONN_KEY = struct.Struct("=Q4sHH")  # netns cookie, ip (net order), port (net order), pad
_ADDR = struct.Struct("=4sHH")  # ip (net order), port (net order), pad
ATTR_SIZE = 128
_MAP_INFO_SIZE = 40  # through bpf_map_info.max_entries
_PROG_INFO_SIZE = 80  # through bpf_prog_info.name


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


def obj_pin(fd: int, path: str) -> None:
    """Pin the map or program behind ``fd`` at ``path`` (on a bpffs)."""
    p = ctypes.create_string_buffer(os.fsencode(path))
    bpf(BPF_OBJ_PIN, attr((0, "=Q", addr_of(p)), (8, "=I", fd)))


def map_info(fd: int) -> tuple[int, int, int, int, int]:
    """(type, id, key size, value size, max entries) of the map behind ``fd``."""
    info = ctypes.create_string_buffer(_MAP_INFO_SIZE)
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr((0, "=I", fd), (4, "=I", _MAP_INFO_SIZE),
                                     (8, "=Q", addr_of(info))))
    mtype, mid, key, value, entries = struct.unpack_from("=IIIII", info)
    return mtype, mid, key, value, entries


def prog_query(target_fd: int, attach_type: int, limit: int = 256) -> list[int]:
    """IDs of the programs attached to ``target_fd`` (a cgroup, a sockmap...) for
    ``attach_type``."""
    ids = (ctypes.c_uint32 * limit)()
    a = attr((0, "=I", target_fd), (4, "=I", attach_type), (16, "=Q", ctypes.addressof(ids)),
             (24, "=I", limit))
    bpf(BPF_PROG_QUERY, a)
    count = struct.unpack_from("=I", a, 24)[0]
    return [int(ids[i]) for i in range(min(count, limit))]


@dataclass(frozen=True)
class ProgInfo:
    prog_id: int
    tag: bytes
    name: str
    map_ids: tuple[int, ...]


def prog_info(prog_fd: int) -> ProgInfo:
    """Id, tag, name and (up to 16) map ids of a loaded program."""
    ids = (ctypes.c_uint32 * 16)()
    info = ctypes.create_string_buffer(_PROG_INFO_SIZE)
    struct.pack_into("=IQ", info, 52, 16, ctypes.addressof(ids))  # nr_map_ids, map_ids
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr((0, "=I", prog_fd), (4, "=I", _PROG_INFO_SIZE),
                                     (8, "=Q", addr_of(info))))
    pid = struct.unpack_from("=I", info, 4)[0]
    nmaps = struct.unpack_from("=I", info, 52)[0]
    name = info.raw[64:80].split(b"\0", 1)[0].decode(errors="replace")
    return ProgInfo(int(pid), info.raw[8:16], name,
                    tuple(int(ids[i]) for i in range(min(nmaps, 16))))


def prog_info_by_id(prog_id: int) -> ProgInfo:
    fd = bpf(BPF_PROG_GET_FD_BY_ID, attr((0, "=I", prog_id)))
    try:
        return prog_info(fd)
    finally:
        os.close(fd)


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
