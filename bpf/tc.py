"""tc (clsact) attachment of our SCHED_CLS programs inside a pod netns, with pyroute2.

Role: bcc has no tc helper.  We add a ``clsact`` qdisc to an interface and one direct-action
bpf filter per (interface, direction) at a fixed priority and handle, so re-applying
*replaces* the program atomically (no window without capture) and removal finds exactly ours.

Invariants:
- Our filters use priority ``PRIO`` and handle ``HANDLE`` and carry a program name starting
  with ``amb_``; nothing else on the interface is touched.
- The ``clsact`` qdisc is added when missing and removed with our last filter only when no
  other filter is left on either direction (a qdisc another tool uses has filters).
- All netlink work happens on a short-lived thread inside the pod netns (``run_in_netns``);
  pyroute2's ``IPRoute(netns=...)`` would silently create a missing netns.
"""

from __future__ import annotations

import errno
from typing import Any

from pyroute2 import IPRoute

from ambient.netns import run_in_netns

INGRESS = 0xFFFFFFF2
EGRESS = 0xFFFFFFF3
CLSACT_HANDLE = 0xFFFF0000
PRIO = 0xA5B  # our fixed filter priority
HANDLE = 1
ETH_P_ALL = 0x0003
NAME_PREFIX = "amb_"


def _index(ipr: IPRoute, ifname: str) -> int:
    idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        raise FileNotFoundError(errno.ENODEV, f"no interface {ifname!r} in the pod netns")
    return int(idx[0])


def _has_clsact(ipr: IPRoute, idx: int) -> bool:
    return any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=idx))


def _filters(ipr: IPRoute, idx: int, parent: int) -> list[Any]:
    try:
        return [f for f in ipr.get_filters(index=idx, parent=parent)
                if f.get_attr("TCA_KIND") is not None]
    except Exception:  # noqa: BLE001 - no clsact: no filters
        return []


def _bpf_name(f: Any) -> str | None:
    opts = f.get_attr("TCA_OPTIONS")
    if opts is None:
        return None
    name = opts.get_attr("TCA_BPF_NAME")
    return str(name) if name is not None else None


def _prio(f: Any) -> int:
    return int((f["info"] >> 16) & 0xFFFF)


ARPHRD_ETHER = 1


def has_ethernet_header(netns: str, ifname: str) -> bool:
    """False for L3 devices (tun, ``ARPHRD_NONE``), whose packets start at the IP header."""
    def work() -> bool:
        with IPRoute() as ipr:
            link = ipr.link("get", index=_index(ipr, ifname))[0]
            return int(link["ifi_type"]) == ARPHRD_ETHER
    return run_in_netns(netns, work)


def attach(netns: str, ifname: str, parent: int, prog_fd: int, prog_name: str) -> None:
    """Put ``prog_fd`` on ``ifname``'s ``parent`` hook (replacing our previous program)."""
    def work() -> None:
        with IPRoute() as ipr:
            idx = _index(ipr, ifname)
            if not _has_clsact(ipr, idx):
                ipr.tc("add", "clsact", idx)
            ipr.tc("replace-filter", "bpf", idx, HANDLE, fd=prog_fd, name=prog_name,
                   parent=parent, prio=PRIO, protocol=ETH_P_ALL, classid=1,
                   direct_action=True)
    run_in_netns(netns, work)


def ours(netns: str, ifname: str) -> dict[int, str]:
    """{parent: program name} of our filters on ``ifname`` (empty if the link is gone)."""
    def work() -> dict[int, str]:
        with IPRoute() as ipr:
            try:
                idx = _index(ipr, ifname)
            except FileNotFoundError:
                return {}
            found = {}
            for parent in (INGRESS, EGRESS):
                for f in _filters(ipr, idx, parent):
                    name = _bpf_name(f)
                    if _prio(f) == PRIO and name and name.startswith(NAME_PREFIX):
                        found[parent] = name
            return found
    return run_in_netns(netns, work)


def detach(netns: str, ifname: str) -> None:
    """Remove our filters from ``ifname`` and the clsact qdisc if nothing else uses it."""
    def work() -> None:
        with IPRoute() as ipr:
            try:
                idx = _index(ipr, ifname)
            except FileNotFoundError:
                return
            if not _has_clsact(ipr, idx):
                return
            for parent in (INGRESS, EGRESS):
                for f in _filters(ipr, idx, parent):
                    name = _bpf_name(f)
                    if _prio(f) == PRIO and name and name.startswith(NAME_PREFIX):
                        ipr.tc("del-filter", "bpf", idx, HANDLE, parent=parent, prio=PRIO,
                               protocol=ETH_P_ALL)
                        break
            if not _filters(ipr, idx, INGRESS) and not _filters(ipr, idx, EGRESS):
                ipr.tc("del", "clsact", idx, CLSACT_HANDLE)
    run_in_netns(netns, work)
