"""Network-namespace primitives shared by ztunnel, the CNI agent and the local cluster.

Role: enter a network namespace on the *calling thread only*, and create sockets that live in
another namespace while the rest of the process stays where it is (the "in-pod" listener
trick: ztunnel opens 15001/15006/15008 inside each pod netns and serves them all from one event
loop).

Invariants:
- ``setns(2)`` with ``CLONE_NEWNET`` switches only the calling thread.  ``in_netns`` saves the
  thread's own netns first (``/proc/self/task/<tid>/ns/net``; ``/proc/1/ns/net`` is not
  readable here) and always switches back, also when the body raises.
- A socket keeps the netns it was created in for its whole life, so ``socket_in_netns`` switches
  in, calls ``socket()``, and switches back before returning; bind/connect/listen afterwards act
  in the socket's netns from any thread.
- A target may be a path (``/var/run/netns/<name>``, ``/proc/<pid>/ns/net``), a bare name from
  ``ip netns`` (resolved under ``/var/run/netns``), or an already-open netns fd (as ZDS hands
  them over).  An fd passed in is never closed here.

Thread-safety: both helpers are safe to call concurrently from different threads, because
each thread has its own netns.  Do not ``await`` (or otherwise yield to other code that runs on
the same thread) inside ``in_netns``: everything that runs on that thread meanwhile would act
in the wrong namespace.  In asyncio code, call ``socket_in_netns`` (it is short and does not
block) or run the body in a worker thread with ``asyncio.to_thread``.

Python 3.11 has no ``os.setns``; libc's ``setns`` is called through ctypes.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/var/run/netns"

_T = TypeVar("_T")
_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int

NetnsRef = str | int


def netns_path(name_or_path: str) -> str:
    """Return the path of a netns given a bare ``ip netns`` name or a path."""
    if "/" in name_or_path:
        return name_or_path
    return os.path.join(NETNS_RUN_DIR, name_or_path)


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """Move the calling thread into the namespace referred to by ``fd``."""
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns({fd}): {os.strerror(err)}")


def current_netns_path() -> str:
    """Path of the calling thread's current netns (per-thread, not per-process)."""
    return f"/proc/self/task/{threading.get_native_id()}/ns/net"


def netns_inode(target: NetnsRef) -> int:
    """Inode number identifying a netns (equal inodes = same netns)."""
    if isinstance(target, int):
        return os.fstat(target).st_ino
    return os.stat(netns_path(target)).st_ino


@contextmanager
def in_netns(target: NetnsRef) -> Iterator[None]:
    """Run the body with the calling thread inside ``target``'s network namespace.

    ``target`` is a netns path, an ``ip netns`` name, or an open netns fd (not closed here).
    The thread returns to its original netns on exit, also on error.  If returning fails
    (which would leave the thread in a foreign netns) the error is raised, never swallowed.
    """
    own = os.open(current_netns_path(), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if isinstance(target, int):
            setns(target)
        else:
            fd = os.open(netns_path(target), os.O_RDONLY | os.O_CLOEXEC)
            try:
                setns(fd)
            finally:
                os.close(fd)
        try:
            yield
        finally:
            setns(own)
    finally:
        os.close(own)


def socket_in_netns(
    target: NetnsRef,
    family: int = socket.AF_INET,
    type: int = socket.SOCK_STREAM,  # noqa: A002 - mirrors socket.socket()
    proto: int = 0,
) -> socket.socket:
    """Create a socket that lives in ``target``'s netns; the caller's thread stays put.

    The returned socket stays in that netns forever: binding, connecting and listening act
    there, from any thread.  ``target`` as in :func:`in_netns`.
    """
    with in_netns(target):
        return socket.socket(family, type, proto)


def run_in_netns(target: NetnsRef, fn: Callable[[], _T], timeout: float = 30.0) -> _T:
    """Run ``fn()`` on a fresh short-lived thread inside ``target`` and return its result.

    Useful for one-off work (``/proc/sys/net`` writes, ``python3-nftables`` calls) without
    touching the netns of any thread the caller owns.
    """
    box: dict[str, object] = {}

    def runner() -> None:
        try:
            with in_netns(target):
                box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            box["error"] = exc

    t = threading.Thread(target=runner, name="ambient-netns", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"run_in_netns: work in {target!r} did not finish in {timeout}s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


def sysctl_path(key: str) -> str:
    """``/proc/sys/<key>`` for ``net.ipv4.ip_forward`` or ``net/ipv4/ip_forward``.

    A key holding a ``/`` is taken as a path (its dots, as in ``eth0.100``, are kept).
    """
    return "/proc/sys/" + (key if "/" in key else key.replace(".", "/"))


def read_sysctl(target: NetnsRef, key: str) -> str:
    """A per-netns sysctl of ``target``, read from a thread switched into it (stripped)."""
    def read() -> str:
        with open(sysctl_path(key), encoding="ascii") as f:
            return f.read().strip()

    return run_in_netns(target, read)


def write_sysctl(target: NetnsRef, key: str, value: str | int) -> None:
    """Write a per-netns sysctl of ``target`` (``/proc/sys/net`` resolves per thread)."""
    def write() -> None:
        with open(sysctl_path(key), "w", encoding="ascii") as f:
            f.write(f"{value}\n")

    run_in_netns(target, write)
