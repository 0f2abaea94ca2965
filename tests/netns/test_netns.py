"""ambient.netns against the real kernel: sockets land in the right netns, threads come back."""

from __future__ import annotations

import errno
import os
import secrets
import socket
import threading

import pytest

from ambient.cluster import netlink
from ambient.netns import (
    current_netns_path,
    in_netns,
    netns_inode,
    netns_path,
    run_in_netns,
    socket_in_netns,
)

pytestmark = pytest.mark.netns

ONLY_THERE = "192.0.2.77"  # TEST-NET-1, added to lo of the test netns only


@pytest.fixture
def ns():
    name = f"ambt-{secrets.token_hex(4)}"
    try:
        netlink.create_netns(name)
        netlink.ip_in(name, "addr", "add", f"{ONLY_THERE}/32", "dev", "lo")
        yield name
    finally:
        netlink.delete_netns(name)
    assert name not in netlink.list_netns()


def _here() -> int:
    return os.stat(current_netns_path()).st_ino


def test_socket_in_netns_binds_address_that_only_exists_there(ns):
    with socket.socket() as host_sock:
        with pytest.raises(OSError) as exc:
            host_sock.bind((ONLY_THERE, 0))
        assert exc.value.errno == errno.EADDRNOTAVAIL
    before = _here()
    with socket_in_netns(netns_path(ns)) as s:
        assert _here() == before
        s.bind((ONLY_THERE, 0))
        s.listen()
        # Connect from another socket in the same netns, driven from this thread.
        with socket_in_netns(ns) as c:
            c.settimeout(5)
            c.connect(s.getsockname())
            conn, peer = s.accept()
            conn.close()
            assert peer[0] == ONLY_THERE


def test_socket_in_netns_accepts_open_fd(ns):
    fd = os.open(netns_path(ns), os.O_RDONLY)
    try:
        with socket_in_netns(fd, socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((ONLY_THERE, 0))
        os.fstat(fd)  # still open: never closed by the helper
    finally:
        os.close(fd)


def test_in_netns_switches_and_restores_thread(ns):
    before = _here()
    with in_netns(ns):
        assert _here() == netns_inode(ns) != before
    assert _here() == before
    with pytest.raises(RuntimeError):
        with in_netns(ns):
            raise RuntimeError("boom")
    assert _here() == before


def test_in_netns_only_affects_calling_thread(ns):
    main_before = _here()
    entered, release = threading.Event(), threading.Event()
    seen: dict[str, int] = {}

    def worker() -> None:
        seen["start"] = _here()
        with in_netns(ns):
            seen["inside"] = _here()
            entered.set()
            release.wait(10)
        seen["after"] = _here()

    t = threading.Thread(target=worker)
    t.start()
    try:
        assert entered.wait(10)
        assert _here() == main_before  # main thread untouched while worker is inside
    finally:
        release.set()
        t.join(10)
    assert seen["inside"] == netns_inode(ns)
    assert seen["after"] == seen["start"]


def test_run_in_netns_and_sysctl(ns):
    assert run_in_netns(ns, _here) == netns_inode(ns)
    netlink.set_sysctl(ns, "net.ipv4.ip_forward", 1)
    assert netlink.get_sysctl(ns, "net.ipv4.ip_forward") == "1"
    with pytest.raises(ZeroDivisionError):
        run_in_netns(ns, lambda: 1 / 0)


def test_missing_netns_raises_and_thread_stays():
    before = _here()
    with pytest.raises(FileNotFoundError):
        with in_netns("ambt-does-not-exist-" + secrets.token_hex(3)):
            pass
    assert _here() == before
