"""In-pod traffic capture: the rules istio-cni programs inside a pod netns (contract C.3).

Role: render the iptables ruleset (IPv4, iptables flavour) as a *pure* function, and apply or
remove it, plus the policy routing, inside a pod netns.

Invariants:
- ``render_iptables_rules`` is pure (table-tested against a golden string); applying is
  ``ip netns exec <pod> iptables-restore --noflush`` so only our chains change and the rest of
  the pod's ruleset is kept.  ``iptables`` here is the distro default (iptables-nft).
- Apply is idempotent (it removes our chains first); removal is idempotent and never raises
  half-way: every step is attempted and errors are collected.
- Not rendered on purpose:
  * the DNS capture rules (udp/tcp 53 -> 15053 in nat, and the ``raw`` table CT zone 1
    rules): there is no DNS proxy yet; add them with the proxy.
  * the host-side probe SNAT rules of C.4 (they live in the node netns, not the pod's).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field

from ambient.cluster.netlink import IP

IPTABLES = "/usr/sbin/iptables"
IPTABLES_RESTORE = "/usr/sbin/iptables-restore"

OUTBOUND_PORT = 15001
INBOUND_PLAINTEXT_PORT = 15006
INBOUND_HBONE_PORT = 15008
SOCKET_MARK = "0x539/0xfff"  # ztunnel's SO_MARK 1337
CONNMARK = "0x111/0xfff"  # InpodTProxyMark
ROUTE_TABLE = "100"  # RouteTableInbound
RULE_PREF = "32764"
PROBE_SNAT_IP = "169.254.7.127"
CHAIN_PRERT = "ISTIO_PRERT"
CHAIN_OUTPUT = "ISTIO_OUTPUT"
_TIMEOUT = 30.0


class CaptureError(RuntimeError):
    """Applying or removing capture failed; the message lists every failed step."""


@dataclass(frozen=True)
class CaptureConfig:
    probe_snat_ip: str = PROBE_SNAT_IP
    inbound_capture: bool = True  # False = the "bypass-inbound-capture" variant
    virtual_interfaces: tuple[str, ...] = field(default=())


def render_iptables_rules(config: CaptureConfig | None = None) -> str:
    """The in-pod ruleset in ``iptables-restore`` format (for ``--noflush``)."""
    c = config or CaptureConfig()
    chains = [f":{CHAIN_PRERT} - [0:0]", f":{CHAIN_OUTPUT} - [0:0]",
              f"-A PREROUTING -j {CHAIN_PRERT}", f"-A OUTPUT -j {CHAIN_OUTPUT}"]
    mangle = [
        "*mangle", *chains,
        f"-A {CHAIN_PRERT} -m mark --mark {SOCKET_MARK} -j CONNMARK --set-xmark {CONNMARK}",
        f"-A {CHAIN_OUTPUT} -m connmark --mark {CONNMARK} -j CONNMARK --restore-mark "
        "--nfmask 0xffffffff --ctmask 0xffffffff",
        "COMMIT",
    ]
    nat = [
        "*nat", *chains,
        f"-A {CHAIN_PRERT} -s {c.probe_snat_ip} -p tcp -m tcp -j ACCEPT",
        f"-A {CHAIN_OUTPUT} -d {c.probe_snat_ip} -p tcp -m tcp -j ACCEPT",
    ]
    for iface in c.virtual_interfaces:
        nat.append(f"-A {CHAIN_PRERT} -i {iface} -p tcp -j REDIRECT --to-ports {OUTBOUND_PORT}")
    if c.inbound_capture:
        nat.append(f"-A {CHAIN_PRERT} ! -d 127.0.0.1/32 -p tcp ! --dport {INBOUND_HBONE_PORT} "
                   f"-m mark ! --mark {SOCKET_MARK} -j REDIRECT --to-ports "
                   f"{INBOUND_PLAINTEXT_PORT}")
    # DNS capture (udp/tcp 53 -> 15053) intentionally omitted: no DNS proxy yet.
    nat += [
        f"-A {CHAIN_OUTPUT} -p tcp -m mark --mark {CONNMARK} -j ACCEPT",
        f"-A {CHAIN_OUTPUT} ! -d 127.0.0.1/32 -o lo -j ACCEPT",
        f"-A {CHAIN_OUTPUT} ! -d 127.0.0.1/32 -p tcp -m mark ! --mark {SOCKET_MARK} "
        f"-j REDIRECT --to-ports {OUTBOUND_PORT}",
        "COMMIT",
    ]
    return "\n".join(mangle + nat) + "\n"


def render_policy_routing() -> list[list[str]]:
    """The ``ip`` argument lists (after ``ip -n <pod>``) for the inbound policy routing."""
    return [
        ["rule", "add", "fwmark", CONNMARK, "pref", RULE_PREF, "lookup", ROUTE_TABLE],
        ["route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", ROUTE_TABLE],
    ]


def _run(cmd: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=_TIMEOUT,
                          check=False)


def _in_pod(netns: str, *argv: str) -> list[str]:
    return [IP, "netns", "exec", netns, *argv]


def apply_capture(netns: str, config: CaptureConfig | None = None) -> None:
    """Program capture in the pod netns named ``netns`` (idempotent)."""
    remove_capture(netns, strict=False)
    p = _run(_in_pod(netns, IPTABLES_RESTORE, "-w", "--noflush"), render_iptables_rules(config))
    if p.returncode != 0:
        raise CaptureError(f"iptables-restore in {netns}: {p.stderr.strip()}")
    for args in render_policy_routing():
        p = _run([IP, "-n", netns, *args])
        if p.returncode != 0:
            raise CaptureError(f"ip -n {netns} {' '.join(args)}: {p.stderr.strip()}")


def remove_capture(netns: str, strict: bool = True) -> list[str]:
    """Remove our chains, jumps and policy routing from ``netns``; idempotent.

    Returns the errors met (missing pieces are not errors); raises CaptureError with all of
    them if ``strict`` and any occurred.
    """
    errors: list[str] = []

    def attempt(cmd: list[str], benign: tuple[str, ...]) -> None:
        p = _run(cmd)
        if p.returncode != 0 and not any(b in p.stderr for b in benign):
            errors.append(f"{' '.join(cmd[4:] if cmd[1] == 'netns' else cmd)}: "
                          f"{p.stderr.strip()}")

    missing = ("No chain/target/match", "does a matching rule exist", "doesn't exist",
               "does not exist", "No such file", "not found", "Bad rule")
    for table in ("mangle", "nat"):
        for hook, chain in (("PREROUTING", CHAIN_PRERT), ("OUTPUT", CHAIN_OUTPUT)):
            # A jump may have been added twice by an external --noflush; remove all copies.
            for _ in range(8):
                p = _run(_in_pod(netns, IPTABLES, "-w", "-t", table, "-C", hook, "-j", chain))
                if p.returncode != 0:
                    break
                attempt(_in_pod(netns, IPTABLES, "-w", "-t", table, "-D", hook, "-j", chain),
                        missing)
        for chain in (CHAIN_PRERT, CHAIN_OUTPUT):
            attempt(_in_pod(netns, IPTABLES, "-w", "-t", table, "-F", chain), missing)
            attempt(_in_pod(netns, IPTABLES, "-w", "-t", table, "-X", chain), missing)
    attempt([IP, "-n", netns, "rule", "del", "fwmark", CONNMARK, "pref", RULE_PREF,
             "lookup", ROUTE_TABLE], ("No such file", "Cannot find"))
    attempt([IP, "-n", netns, "route", "del", "local", "0.0.0.0/0", "dev", "lo",
             "table", ROUTE_TABLE], ("No such process", "Cannot find", "No such file"))
    if strict and errors:
        raise CaptureError("; ".join(errors))
    return errors


def dump_rules(netns: str) -> str:
    """``iptables-save`` of the pod netns (for debugging and tests)."""
    p = _run(_in_pod(netns, "/usr/sbin/iptables-save"))
    if p.returncode != 0:
        raise CaptureError(f"iptables-save in {netns}: {p.stderr.strip()}")
    return p.stdout
