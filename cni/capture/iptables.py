"""The iptables capture backend: contract C.3 rules inside the pod netns, with iptables-nft.

Role: render the in-pod ruleset (IPv4) as a *pure* function in the canonical form that
``iptables-save`` prints back, apply it with ``iptables-restore --noflush`` (only our chains
change; the rest of the pod's ruleset is kept), add the inbound policy routing and the
``tcp_migrate_req`` sysctl, remove all of it again, and report drift.

Invariants:
- :func:`render_rules` is pure and golden-tested.  It is written in ``iptables-save``'s own
  spelling (``-s 169.254.7.127/32``, ``-m tcp ! --dport``) so that :func:`drift` compares
  lines verbatim; a spelling change is a golden-file change.
- Re-apply is atomic and idempotent: the restore payload is computed from the live ruleset
  (:func:`restore_payload`): declaring ``:ISTIO_PRERT - [0:0]`` flushes and refills our
  chains in one transaction, and the jumps from the built-in chains are added only when
  absent (surplus copies are deleted in the same transaction).  There is no moment at
  which the pod is uncaptured.
- Removal is one restore transaction built from the live ruleset (:func:`removal_payload`),
  then the policy routing.  It tolerates a missing netns, never raises, and returns the
  errors met.  With iptables-nft it also deletes the ``ip mangle``/``ip nat`` tables if they
  are left *completely* empty (only hooked chains with policy accept), so a pod returns to
  its exact pre-capture ruleset.
- Not rendered on purpose: the DNS capture rules of C.3 (udp/tcp 53 -> 15053 in nat and the
  ``raw`` table CT zone 1 rules) need the DNS proxy, which does not exist yet; add them with
  it.  IPv6 (ip6tables with ``::1/128``) is not rendered either.  The node-side probe SNAT
  (C.4) lives in :mod:`cni.capture.probe`.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cni.capture.base import (
    CONNMARK,
    INBOUND_HBONE_PORT,
    INBOUND_PLAINTEXT_PORT,
    MARK_MASK,
    OUTBOUND_PORT,
    ZTUNNEL_MARK,
    CaptureError,
    PodCapture,
)
from cni.capture.common import (
    MIGRATE_SYSCTL,
    NSENTER,
    apply_policy_routing,
    check_migrate_sysctl,
    check_policy_routing,
    describe,
    remove_policy_routing,
    require_netns,
    run,
    set_sysctl,
)

IPTABLES = "/usr/sbin/iptables"
IPTABLES_RESTORE = "/usr/sbin/iptables-restore"
IPTABLES_SAVE = "/usr/sbin/iptables-save"
NFT = "/usr/sbin/nft"

CHAIN_PRERT = "ISTIO_PRERT"
CHAIN_OUTPUT = "ISTIO_OUTPUT"
OUR_CHAINS = (CHAIN_PRERT, CHAIN_OUTPUT)
TABLES = ("mangle", "nat")
JUMPS = (("PREROUTING", CHAIN_PRERT), ("OUTPUT", CHAIN_OUTPUT))
SOCKET_MARK = f"{ZTUNNEL_MARK:#x}/{MARK_MASK:#x}"  # "0x539/0xfff"
CONN_MARK = f"{CONNMARK:#x}/{MARK_MASK:#x}"  # "0x111/0xfff"


def _host(ip: str) -> str:
    return ip if "/" in ip else f"{ip}/32"


def render_rules(pod: PodCapture) -> str:
    """The in-pod ruleset for ``iptables-restore --noflush`` (C.3 without DNS, IPv4)."""
    head = [f":{CHAIN_PRERT} - [0:0]", f":{CHAIN_OUTPUT} - [0:0]",
            f"-A PREROUTING -j {CHAIN_PRERT}", f"-A OUTPUT -j {CHAIN_OUTPUT}"]
    mangle = [
        "*mangle", *head,
        f"-A {CHAIN_PRERT} -m mark --mark {SOCKET_MARK} -j CONNMARK --set-xmark {CONN_MARK}",
        f"-A {CHAIN_OUTPUT} -m connmark --mark {CONN_MARK} -j CONNMARK --restore-mark "
        "--nfmask 0xffffffff --ctmask 0xffffffff",
        "COMMIT",
    ]
    probe = _host(pod.probe_snat_ip)
    nat = ["*nat", *head, f"-A {CHAIN_PRERT} -s {probe} -p tcp -m tcp -j ACCEPT"]
    for iface in pod.virtual_interfaces:
        nat.append(f"-A {CHAIN_PRERT} -i {iface} -p tcp -j REDIRECT --to-ports {OUTBOUND_PORT}")
    if pod.inbound_capture:
        nat.append(f"-A {CHAIN_PRERT} ! -d 127.0.0.1/32 -p tcp -m tcp ! --dport "
                   f"{INBOUND_HBONE_PORT} -m mark ! --mark {SOCKET_MARK} -j REDIRECT "
                   f"--to-ports {INBOUND_PLAINTEXT_PORT}")
    # DNS capture (udp/tcp 53 -> 15053, raw CT zone 1) intentionally omitted: no DNS proxy.
    nat += [
        f"-A {CHAIN_OUTPUT} -d {probe} -p tcp -m tcp -j ACCEPT",
        f"-A {CHAIN_OUTPUT} -p tcp -m mark --mark {CONN_MARK} -j ACCEPT",
        f"-A {CHAIN_OUTPUT} ! -d 127.0.0.1/32 -o lo -j ACCEPT",
        f"-A {CHAIN_OUTPUT} ! -d 127.0.0.1/32 -p tcp -m mark ! --mark {SOCKET_MARK} "
        f"-j REDIRECT --to-ports {OUTBOUND_PORT}",
        "COMMIT",
    ]
    return "\n".join(mangle + nat) + "\n"


# -- parsing iptables-save --------------------------------------------------------------------

@dataclass
class SavedTable:
    """One ``*table`` block of ``iptables-save`` output."""

    chains: list[str] = field(default_factory=list)  # declared, in order
    rules: dict[str, list[str]] = field(default_factory=dict)  # chain -> "-A chain ..." lines


def parse_save(text: str) -> dict[str, SavedTable]:
    """Parse ``iptables-save``/restore text (comments, counters and COMMIT ignored)."""
    tables: dict[str, SavedTable] = {}
    current: SavedTable | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            current = tables.setdefault(line[1:].strip(), SavedTable())
        elif current is None:
            continue
        elif line.startswith(":"):
            name = line[1:].split()[0]
            if name not in current.chains:
                current.chains.append(name)
        elif line.startswith("-A "):
            current.rules.setdefault(line.split()[1], []).append(line)
    return tables


def _jump_target(rule: str) -> str | None:
    """The chain a ``-A/-I <chain> ... -j|-g <target>`` line jumps to, if any."""
    parts = rule.split()
    return parts[-1] if len(parts) >= 4 and parts[-2] in ("-j", "-g") else None


def _jump_key(line: str) -> str:
    """``-I POSTROUTING 1 -j X`` and ``-A POSTROUTING -j X`` name the same live rule."""
    return re.sub(r"^-I (\S+) \d+ ", r"-A \1 ", re.sub(r"^-I (\S+) (?=-)", r"-A \1 ", line))


def live_jumps(table: SavedTable, chains: tuple[str, ...] = OUR_CHAINS) -> list[str]:
    """Rules of other chains in ``table`` that jump to one of ``chains``."""
    return [r for chain, rules in table.rules.items() if chain not in chains
            for r in rules if _jump_target(r) in chains]


def restore_payload(rendered: str, live_save: str, chains: tuple[str, ...] = OUR_CHAINS) -> str:
    """What to feed ``iptables-restore --noflush`` so the result is ``rendered``, exactly once.

    Our chain declarations flush and refill ``chains`` in one transaction; a jump line
    (``-A`` or ``-I``) is kept only when the live table lacks it, and surplus or foreign jumps
    to ``chains`` are deleted.
    """
    live = parse_save(live_save)
    out: list[str] = []
    table = ""
    wanted: set[str] = set()
    for line in rendered.splitlines():
        if line.startswith("*"):
            table, wanted = line[1:], set()
        have = live_jumps(live.get(table, SavedTable()), chains)
        if line == "COMMIT":
            for rule, n in sorted(Counter(have).items()):
                out += ["-D " + rule[3:]] * (n - 1 if rule in wanted else n)
        elif line[:3] in ("-A ", "-I ") and line.split()[1] not in chains \
                and _jump_target(line) in chains:
            wanted.add(_jump_key(line))
            if _jump_key(line) in have:
                continue
        out.append(line)
    return "\n".join(out) + "\n"


def removal_payload(live_save: str, chains: tuple[str, ...] = OUR_CHAINS) -> str:
    """A restore transaction deleting jumps to ``chains`` and the chains ("" if none)."""
    out: list[str] = []
    for name, table in parse_save(live_save).items():
        ours = [c for c in chains if c in table.chains]
        jumps = live_jumps(table, chains)
        if not ours and not jumps:
            continue
        out.append(f"*{name}")
        out += ["-D " + rule[3:] for rule in jumps]
        for chain in ours:
            out += [f"-F {chain}", f"-X {chain}"]
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def drift(rendered: str, live_save: str, chains: tuple[str, ...] = OUR_CHAINS,
          jumps: tuple[tuple[str, str], ...] = JUMPS) -> list[str]:
    """Findings comparing our part of the live ruleset with the rendering; [] when in place."""
    expected, live = parse_save(rendered), parse_save(live_save)
    findings: list[str] = []
    wanted = {f"-A {hook} -j {chain}" for hook, chain in jumps}
    for name, exp in expected.items():
        table = live.get(name)
        if table is None:
            findings.append(f"iptables table {name}: none of our rules are installed")
            continue
        for chain in chains:
            if chain not in table.chains:
                findings.append(f"iptables {name}: chain {chain} is missing")
                continue
            want, have = exp.rules.get(chain, []), table.rules.get(chain, [])
            findings += [f"iptables {name}: missing rule `{r}`"
                         for r in (Counter(want) - Counter(have)).elements()]
            findings += [f"iptables {name}: unexpected rule `{r}`"
                         for r in (Counter(have) - Counter(want)).elements()]
            if Counter(want) == Counter(have) and want != have:
                findings.append(f"iptables {name}: rules of {chain} are out of order")
        present = Counter(live_jumps(table, chains))
        for rule in sorted(wanted):
            if present[rule] == 0:
                findings.append(f"iptables {name}: missing jump `{rule}`")
            elif present[rule] > 1:
                findings.append(f"iptables {name}: jump `{rule}` present {present[rule]} times")
        findings += [f"iptables {name}: unexpected jump `{r}`" for r in present
                     if r not in wanted]
    return findings


def table_is_empty(nft_json: dict[str, Any]) -> bool:
    """True if an ``nft -j list table`` document holds only hooked chains with policy accept."""
    for obj in nft_json.get("nftables", []):
        kind = next(iter(obj))
        if kind in ("metainfo", "table"):
            continue
        if kind != "chain":
            return False
        chain = obj["chain"]
        if "hook" not in chain or chain.get("policy", "accept") != "accept":
            return False
    return True


def drop_empty_tables(netns: str | None, tables: tuple[str, ...]) -> list[str]:
    """With iptables-nft, delete these ``ip`` tables if nothing at all is left in them.

    An empty table with only accept-policy hooked chains is a no-op; deleting it returns the
    netns to the ruleset it had before we created the table.  Returns the errors met.
    """
    if "nf_tables" not in run(None, [IPTABLES, "-V"]).stdout or not os.access(NFT, os.X_OK):
        return []
    errors: list[str] = []
    for table in tables:
        p = run(netns, [NFT, "-j", "list", "table", "ip", table])
        if p.returncode != 0:
            continue  # no such table: nothing to do
        try:
            empty = table_is_empty(json.loads(p.stdout))
        except (ValueError, KeyError, StopIteration, AttributeError):
            continue
        if empty:
            d = run(netns, [NFT, "delete", "table", "ip", table])
            if d.returncode != 0 and "No such file" not in d.stderr:
                errors.append(describe(d))
    return errors


# -- the backend ------------------------------------------------------------------------------

class IptablesBackend:
    """Capture with iptables (the distro default, iptables-nft) inside each pod netns."""

    name: ClassVar[str] = "iptables"

    def unavailable_reason(self) -> str | None:
        for tool in (IPTABLES, IPTABLES_RESTORE, IPTABLES_SAVE, NSENTER):
            if not os.access(tool, os.X_OK):
                return f"{tool} is not installed (apt-get install iptables util-linux)"
        p = run(None, [IPTABLES, "-V"])
        if p.returncode != 0:
            return f"iptables does not run here: {describe(p)}"
        return None

    def setup_node(self) -> None:
        """Nothing node-wide: every rule lives in a pod netns."""

    def teardown_node(self) -> list[str]:
        return []

    def _save(self, netns: str) -> str:
        p = run(netns, [IPTABLES_SAVE])
        if p.returncode != 0:
            raise CaptureError(f"reading the ruleset of {netns}: {describe(p)}")
        return p.stdout

    def apply(self, pod: PodCapture) -> None:
        where = f"capture of pod {pod.namespace}/{pod.name}"
        require_netns(pod.netns, where)
        payload = restore_payload(render_rules(pod), self._save(pod.netns))
        p = run(pod.netns, [IPTABLES_RESTORE, "-w", "--noflush"], payload)
        if p.returncode != 0:
            raise CaptureError(f"{where}: {describe(p)}")
        apply_policy_routing(pod.netns)
        set_sysctl(pod.netns, MIGRATE_SYSCTL, "1")

    def remove(self, pod: PodCapture) -> list[str]:
        if not os.path.exists(pod.netns):
            return []
        errors: list[str] = []
        try:
            payload = removal_payload(self._save(pod.netns))
            if payload:
                p = run(pod.netns, [IPTABLES_RESTORE, "-w", "--noflush"], payload)
                if p.returncode != 0:
                    errors.append(describe(p))
            errors += drop_empty_tables(pod.netns, TABLES)
        except CaptureError as exc:
            errors.append(str(exc))
        errors += remove_policy_routing(pod.netns)
        return errors if os.path.exists(pod.netns) else []  # deleted meanwhile: nothing left

    def check(self, pod: PodCapture) -> list[str]:
        if not os.path.exists(pod.netns):
            return [f"pod netns {pod.netns} does not exist"]
        try:
            findings = drift(render_rules(pod), self._save(pod.netns))
        except CaptureError as exc:
            findings = [str(exc)]
        return findings + check_policy_routing(pod.netns) + check_migrate_sysctl(pod.netns)
