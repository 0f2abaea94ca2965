"""Namespaces, links, addresses, routes and sysctls for the local cluster.

Role: thin wrappers over iproute2 (``/usr/sbin/ip``, absolute path) so that every namespace is
``ip netns`` compatible (bind-mounted under ``/var/run/netns``; ``ip netns exec`` works on it).

Invariants:
- Every command names a namespace explicitly (``ip -n <ns> ...``) or creates one; nothing here
  touches the host netns.  Veth pairs are created inside a namespace with the peer placed
  directly in another, so no interface ever appears in the host netns.
- Deletions are idempotent: a missing namespace or link is success.
- sysctls are written by a short-lived thread switched into the namespace, because
  ``/proc/sys/net`` resolves against the calling thread's netns.
"""

from __future__ import annotations

import os
import subprocess

from ambient.netns import netns_path, read_sysctl, write_sysctl

IP = "/usr/sbin/ip"
_CMD_TIMEOUT = 30.0


class NetlinkError(RuntimeError):
    """An iproute2 command failed; the message carries the command and its stderr."""


def _ip(*args: str, input: str | None = None) -> str:  # noqa: A002
    cmd = [IP, *args]
    proc = subprocess.run(
        cmd, input=input, capture_output=True, text=True, timeout=_CMD_TIMEOUT, check=False
    )
    if proc.returncode != 0:
        raise NetlinkError(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def netns_exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


def list_netns() -> list[str]:
    """Names of all namespaces under /var/run/netns (what ``ip netns list`` shows)."""
    try:
        return sorted(os.listdir("/var/run/netns"))
    except FileNotFoundError:
        return []


def create_netns(name: str) -> str:
    """Create a named netns with ``lo`` up; return its path.  Fails if it already exists."""
    _ip("netns", "add", name)
    _ip("-n", name, "link", "set", "lo", "up")
    return netns_path(name)


def delete_netns(name: str) -> None:
    """Remove a named netns (idempotent).  The kernel frees it once no process or fd holds it."""
    if not netns_exists(name):
        return
    try:
        _ip("netns", "del", name)
    except NetlinkError:
        if netns_exists(name):
            raise


def add_bridge(ns: str, name: str) -> None:
    _ip("-n", ns, "link", "add", name, "type", "bridge")
    _ip("-n", ns, "link", "set", name, "up")


def add_veth(ns: str, name: str, peer_ns: str, peer_name: str) -> None:
    """Create a veth pair with ``name`` in ``ns`` and ``peer_name`` in ``peer_ns``; both up."""
    _ip("-n", ns, "link", "add", name, "type", "veth", "peer", "name", peer_name,
        "netns", peer_ns)
    _ip("-n", ns, "link", "set", name, "up")
    _ip("-n", peer_ns, "link", "set", peer_name, "up")


def set_master(ns: str, link: str, bridge: str) -> None:
    _ip("-n", ns, "link", "set", link, "master", bridge)


def delete_link(ns: str, name: str) -> None:
    """Delete a link (idempotent: a missing netns or link is success)."""
    if not netns_exists(ns):
        return
    try:
        _ip("-n", ns, "link", "del", name)
    except NetlinkError as exc:
        if "Cannot find device" not in str(exc) and "does not exist" not in str(exc):
            raise


def add_address(ns: str, link: str, cidr: str) -> None:
    _ip("-n", ns, "addr", "add", cidr, "dev", link)


def add_route(ns: str, dst: str, *, via: str | None = None, dev: str | None = None,
              table: str | None = None, route_type: str | None = None) -> None:
    args = ["-n", ns, "route", "add"]
    if route_type:
        args.append(route_type)
    args.append(dst)
    if via:
        args += ["via", via]
    if dev:
        args += ["dev", dev]
    if table:
        args += ["table", table]
    _ip(*args)


def ip_in(ns: str, *args: str) -> str:
    """Run ``ip -n <ns> <args>`` and return stdout (raises NetlinkError)."""
    return _ip("-n", ns, *args)


def set_sysctl(ns: str, key: str, value: str | int) -> None:
    """Write ``/proc/sys/<key>`` (dots or slashes) inside ``ns``."""
    write_sysctl(netns_path(ns), key, value)


def get_sysctl(ns: str, key: str) -> str:
    return read_sysctl(netns_path(ns), key)
