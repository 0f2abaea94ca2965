"""Socket helpers for the in-pod data path: listeners and dials inside a pod's netns.

Every socket ztunnel opens in a pod carries ``SO_MARK`` = PACKET_MARK (1337) so the pod's
capture rules skip it.  Listeners use ``SO_REUSEPORT`` so an old and a new ztunnel can serve
the same pod during a restart.  Inbound dials to the application use ``IP_TRANSPARENT`` and
bind to the original client address, so the application sees the real client IP.

Dials connect with :func:`connect`, never ``loop.sock_connect``: uvloop's passes every
address, IP literals included, through ``getaddrinfo`` on libuv's thread pool, i.e. two
thread hand-offs (futex wake, eventfd) per connection on the data path.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import struct

from ambient.bpfmap import OrigDstMap, netns_cookie
from ambient.netns import socket_in_netns

SO_ORIGINAL_DST = 80
IP_TRANSPARENT = 19


def original_dst(
    sock: socket.socket, *, listen_port: int | None = None, origdst_map: OrigDstMap | None = None
) -> tuple[str, int]:
    """The original destination of an accepted, captured IPv4 socket.

    netfilter capture (REDIRECT): ``SO_ORIGINAL_DST``.  eBPF capture (no conntrack entry):
    outbound, the pinned ``amb_origdst`` map keyed by (netns cookie, peer address); inbound
    (sk_assign/TPROXY), the socket's own local address when it is not the listener's port
    (``listen_port``; unknown: any ztunnel capture port).  Raises OSError when none applies.
    """
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError as exc:
        nf_error = exc
    else:
        port, packed = struct.unpack_from("!2xH4s", raw)
        return socket.inet_ntoa(packed), port
    bpf_map = origdst_map if origdst_map is not None else _ORIGDST_MAP
    mapped = None
    if bpf_map.available():
        try:
            peer = sock.getpeername()
            mapped = bpf_map.lookup(netns_cookie(sock), (peer[0], peer[1]))
        except OSError:
            mapped = None
    local = sock.getsockname()
    found = fallback_original_dst(mapped, (local[0], local[1]), listen_port)
    if found is None:
        raise nf_error
    return found


CAPTURE_LISTEN_PORTS = (15001, 15006)
_ORIGDST_MAP = OrigDstMap()


def use_bpf_pin_dir(pin_dir: str) -> None:
    """Read the eBPF capture's pinned maps from ``pin_dir`` (default /sys/fs/bpf/ambient)."""
    global _ORIGDST_MAP
    _ORIGDST_MAP.close()
    _ORIGDST_MAP = OrigDstMap(pin_dir)


def fallback_original_dst(
    mapped: tuple[str, int] | None, local: tuple[str, int], listen_port: int | None
) -> tuple[str, int] | None:
    """Decide the original destination when SO_ORIGINAL_DST is unavailable.  Pure.

    A map entry wins (eBPF outbound capture).  Otherwise a local address whose port is not
    the listener's is the destination the client asked for (eBPF inbound / TPROXY);  a local
    address on the listener's own port says nothing.
    """
    if mapped is not None:
        return mapped
    ports = CAPTURE_LISTEN_PORTS if listen_port is None else (listen_port,)
    if local[1] in ports:
        return None
    return local


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET


def listener(
    netns: str | int,
    port: int,
    *,
    mark: int,
    reuseport: bool = True,
    transparent: bool = False,
    host: str = "0.0.0.0",
    backlog: int = 1024,
) -> socket.socket:
    """A listening TCP socket created inside ``netns``."""
    sock = socket_in_netns(netns, _family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        if transparent:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def dial_socket(
    netns: str | int | None,
    dst_ip: str,
    *,
    mark: int,
    source: tuple[str, int] | None = None,
) -> socket.socket:
    """An unconnected, non-blocking TCP socket in ``netns`` for a connection to ``dst_ip``.

    With ``source``, the socket binds to that address with IP_TRANSPARENT (original source
    preservation); the pod's policy routing (fwmark 0x111 -> table 100) brings replies back.
    """
    family = _family(dst_ip)
    if netns is None:
        sock = socket.socket(family, socket.SOCK_STREAM)
    else:
        sock = socket_in_netns(netns, family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source is not None:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(source)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def connect(sock: socket.socket, address: tuple[str, int], timeout: float) -> None:
    """Connect the non-blocking ``sock`` to the numeric ``address`` within ``timeout`` s.

    Raises ``TimeoutError`` when the peer does not answer in time and ``OSError`` (errno
    set: ECONNREFUSED, EHOSTUNREACH, ...) when the connection fails.  The socket is left to
    the caller either way.  No resolver and no thread: a non-blocking ``connect`` and one
    wait for writability on the running loop.
    """
    err = sock.connect_ex(address)
    if err == 0:
        return
    if err not in (errno.EINPROGRESS, errno.EAGAIN):
        raise OSError(err, f"connect to {address[0]}:{address[1]}: {os.strerror(err)}")
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        if not done.done():
            done.set_result(None)

    def expire() -> None:
        if not done.done():
            done.set_exception(TimeoutError(f"connect to {address[0]}:{address[1]} timed out"))

    loop.add_writer(fd, ready)
    timer = loop.call_later(timeout, expire)
    try:
        await done
    finally:
        timer.cancel()
        loop.remove_writer(fd)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, f"connect to {address[0]}:{address[1]}: {os.strerror(err)}")
