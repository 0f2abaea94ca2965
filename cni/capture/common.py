"""Kernel-side steps shared by the capture backends (iptables, nftables; eBPF reuses the
policy routing and sysctl helpers).

Role: run a netfilter or iproute2 tool inside a network namespace given by *path*, program
and check the inbound policy routing of contract C.3 (``ip rule fwmark 0x111/0xfff pref
32764 lookup 100`` + ``local 0.0.0.0/0 dev lo table 100``), and set the pod sysctl
``net.ipv4.tcp_migrate_req=1`` (a closing ``SO_REUSEPORT`` listener hands its queued
connections to its sibling, so a ztunnel restart drops no accepted-but-unserved connection).

Invariants:
- Tools are called by absolute path through ``nsenter --net=<path>``, so the netns may be a
  bind mount under ``/var/run/netns`` or ``/proc/<pid>/ns/net``; ``None`` means "the caller's
  own netns" (used for the node netns on a real node).
- :func:`run` never raises: a tool that cannot be started or times out comes back as a failed
  result whose stderr says so, so callers can collect errors and carry on.
- The drift functions are pure (JSON from ``ip -j`` in, findings out) and table-tested.
- ``tcp_migrate_req`` is left at 1 by removal: it is harmless without ztunnel listeners and a
  pod may be enrolled again; it is reported by ``check`` when it is not 1.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from typing import Any

from ambient.netns import read_sysctl, write_sysctl
from cni.capture.base import CONNMARK, MARK_MASK, ROUTE_TABLE, RULE_PREF, CaptureError

NSENTER = "/usr/bin/nsenter"
IP = "/usr/sbin/ip"
TIMEOUT = 30.0
MIGRATE_SYSCTL = "net/ipv4/tcp_migrate_req"

FWMARK = f"{CONNMARK:#x}/{MARK_MASK:#x}"  # "0x111/0xfff"
RULE_ARGS = ("fwmark", FWMARK, "pref", str(RULE_PREF), "lookup", str(ROUTE_TABLE))
ROUTE_ARGS = ("local", "0.0.0.0/0", "dev", "lo", "table", str(ROUTE_TABLE))


def run(netns: str | None, argv: Sequence[str],
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside ``netns`` (a path; None: here); never raises."""
    cmd = [NSENTER, f"--net={netns}", *argv] if netns else list(argv)
    try:
        return subprocess.run(cmd, input=stdin, capture_output=True, text=True,
                              timeout=TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"timed out after {TIMEOUT:.0f}s")
    except OSError as exc:
        return subprocess.CompletedProcess(cmd, 127, "", f"cannot run {cmd[0]}: {exc}")


def describe(p: subprocess.CompletedProcess[str]) -> str:
    """One line for an operator: the command (without nsenter) and what it said."""
    argv = [str(a) for a in p.args]
    if argv and argv[0] == NSENTER:
        argv = argv[2:]
    return f"`{' '.join(argv)}` failed: {(p.stderr or p.stdout).strip() or p.returncode}"


def require_netns(netns: str, what: str) -> None:
    """Raise CaptureError unless ``netns`` exists (pods are given by netns path)."""
    if not os.path.exists(netns):
        raise CaptureError(f"{what}: pod netns {netns} does not exist (was the pod deleted, "
                           "or is the path wrong?)")


# -- policy routing ---------------------------------------------------------------------------

def routing_drift(rules: list[dict[str, Any]], routes: list[dict[str, Any]]) -> list[str]:
    """Findings for the policy routing, from ``ip -j rule show`` / ``ip -j route show table``.

    Expected: exactly one rule (pref 32764, fwmark 0x111/0xfff, table 100) and one
    ``local default dev lo`` route in table 100.
    """
    findings: list[str] = []
    ours = [r for r in rules if r.get("priority") == RULE_PREF]
    good = [r for r in ours if r.get("fwmark") == f"{CONNMARK:#x}"
            and r.get("fwmask") == f"{MARK_MASK:#x}" and str(r.get("table")) == str(ROUTE_TABLE)]
    if not good:
        findings.append(f"ip rule missing: {' '.join(RULE_ARGS)}")
    elif len(good) > 1:
        findings.append(f"ip rule present {len(good)} times: {' '.join(RULE_ARGS)}")
    for r in ours:
        if r not in good:
            findings.append(f"unexpected ip rule at pref {RULE_PREF}: {json.dumps(r)}")
    local = [r for r in routes if r.get("type") == "local" and r.get("dst") == "default"
             and r.get("dev") == "lo"]
    if not local:
        findings.append(f"ip route missing: {' '.join(ROUTE_ARGS)}")
    return findings


def _ip_json(netns: str, *args: str) -> list[dict[str, Any]]:
    p = run(netns, [IP, "-j", *args])
    if p.returncode != 0 and "table does not exist" in p.stderr:
        return []  # a routing table nobody has used yet in this netns: empty
    if p.returncode != 0:
        raise CaptureError(describe(p))
    out = p.stdout.strip()
    return list(json.loads(out)) if out else []


def apply_policy_routing(netns: str) -> None:
    """Add the rule (unless present) and the route (replace: idempotent); raises CaptureError."""
    p = run(netns, [IP, "rule", "add", *RULE_ARGS])
    if p.returncode != 0 and "File exists" not in p.stderr:
        raise CaptureError(f"policy routing in {netns}: {describe(p)}")
    p = run(netns, [IP, "route", "replace", *ROUTE_ARGS])
    if p.returncode != 0:
        raise CaptureError(f"policy routing in {netns}: {describe(p)} (is lo up in the pod?)")


def remove_policy_routing(netns: str) -> list[str]:
    """Delete every copy of our rule and our route; missing pieces are not errors."""
    errors: list[str] = []
    for _ in range(8):  # bounded: duplicates are impossible via apply, but be thorough
        p = run(netns, [IP, "rule", "del", *RULE_ARGS])
        if p.returncode != 0:
            if "No such file" not in p.stderr and "No such process" not in p.stderr:
                errors.append(describe(p))
            break
    p = run(netns, [IP, "route", "del", *ROUTE_ARGS])
    if p.returncode != 0 and not any(s in p.stderr for s in ("No such process", "No such file",
                                                            "Cannot find")):
        errors.append(describe(p))
    return errors


def check_policy_routing(netns: str) -> list[str]:
    try:
        return routing_drift(_ip_json(netns, "rule", "show"),
                             _ip_json(netns, "route", "show", "table", str(ROUTE_TABLE)))
    except CaptureError as exc:
        return [f"cannot read policy routing: {exc}"]


# -- sysctl -----------------------------------------------------------------------------------

def set_sysctl(netns: str, key: str, value: str) -> None:
    """Write a per-netns sysctl from a thread switched into ``netns``; raises CaptureError."""
    try:
        write_sysctl(netns, key, value)
    except OSError as exc:
        raise CaptureError(f"sysctl {key.replace('/', '.')}={value} in {netns}: {exc}") from exc


def check_migrate_sysctl(netns: str) -> list[str]:
    try:
        value = read_sysctl(netns, MIGRATE_SYSCTL)
    except OSError as exc:
        return [f"cannot read {MIGRATE_SYSCTL}: {exc}"]
    if value != "1":
        return [f"sysctl net.ipv4.tcp_migrate_req is {value}, expected 1 (queued connections "
                "would be lost when ztunnel restarts)"]
    return []
