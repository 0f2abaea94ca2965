"""Socket helpers for the in-pod data path: listeners and dials inside a pod's netns.

Every socket ztunnel opens in a pod carries ``SO_MARK`` = PACKET_MARK (1337) so the pod's
capture rules skip it.  Listeners use ``SO_REUSEPORT`` so an old and a new ztunnel can serve
the same pod during a restart.  Inbound dials to the application use ``IP_TRANSPARENT`` and
bind to the original client address, so the application sees the real client IP.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from ambient.netns import socket_in_netns

SO_ORIGINAL_DST = 80
IP_TRANSPARENT = 19
IP_FREEBIND = 15


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """The pre-REDIRECT destination of an accepted IPv4 socket (SO_ORIGINAL_DST)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


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
