"""The native nftables capture backend: contract C.3 behaviour with ``nft`` tables of our own.

Role: render the in-pod ruleset as a *pure* function (tables ``inet istio-ambient-mangle``
and ``inet istio-ambient-nat``, contract c.5), load it atomically with ``nft -f``, add the
same policy routing and ``tcp_migrate_req`` sysctl as the iptables backend, remove exactly
our tables, and report drift.

The rules, against their iptables counterparts (C.3):
- mangle prerouting (filter, priority mangle = -150): a packet carrying ztunnel's mark
  ``0x539/0xfff`` sets connmark ``0x111/0xfff`` (``CONNMARK --set-xmark``);
- mangle output (*route* type, priority mangle, so a changed mark re-routes the packet like
  iptables' mangle OUTPUT does): connmark ``0x111/0xfff`` is restored into the packet mark,
  which sends the app's replies to a spoofed source through ``table 100`` to ztunnel;
- nat prerouting (priority dstnat = -100): accept from the probe SNAT IP, virtual
  interfaces redirect to 15001, everything else TCP except to 127.0.0.1, to port 15008, or
  carrying ztunnel's mark, redirects to 15006;
- nat output (priority -100): accept to the probe SNAT IP, accept connmarked (0x111)
  packets, accept ``oif lo`` unless to 127.0.0.1, redirect the rest of TCP except to
  127.0.0.1 or carrying ztunnel's mark to 15001.

Invariants:
- :func:`render_ruleset` is pure and golden-tested, written in the exact form ``nft list
  table`` prints (nft 1.0.x): ``check`` compares lines verbatim, so a spelling change is a
  golden change.  nft prints ``ct mark & 0xfffff000 | 0x111`` as the equivalent
  ``ct mark & 0xfffff111 | 0x00000111``; the rendering uses the printed spelling.
- Apply is one ``nft -f`` transaction: for each table ``table X; delete table X; table X {..}``
  (the first line makes the delete safe when X is absent), so re-apply replaces rather than
  duplicates, and the pod is never uncaptured in between.  A stale ``istio-ambient-raw``
  table is deleted in the same transaction.
- Remove deletes exactly our tables (one transaction), tolerates a missing netns, never
  raises.  Other tables, including iptables-nft's ``ip nat``/``ip mangle``, are untouched.
- Not rendered: DNS capture (the raw table with CT zone 1 and the 53 -> 15053 redirects)
  needs the DNS proxy, which does not exist yet; IPv6 (the ``ip daddr`` matches make the
  redirects IPv4-only, like the iptables backend).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from typing import ClassVar

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

NFT = "/usr/sbin/nft"
FAMILY = "inet"
TABLE_MANGLE = "istio-ambient-mangle"
TABLE_NAT = "istio-ambient-nat"
TABLE_RAW = "istio-ambient-raw"
OUR_TABLES = (TABLE_MANGLE, TABLE_NAT, TABLE_RAW)

_MASK = f"0x{MARK_MASK:08x}"
_ZMARK = f"0x{ZTUNNEL_MARK:08x}"
_CMARK = f"0x{CONNMARK:08x}"
# (ct mark & ~mask) | value, in nft's printed (bit-merged) spelling.
_CT_KEEP = f"0x{(0xFFFFFFFF & ~MARK_MASK) | CONNMARK:08x}"


def _table(name: str, chains: list[tuple[str, str, list[str]]]) -> list[str]:
    out = [f"table {FAMILY} {name} {{"]
    for i, (chain, header, rules) in enumerate(chains):
        if i:
            out.append("")
        out += [f"\tchain {chain} {{", f"\t\t{header}", *[f"\t\t{r}" for r in rules], "\t}"]
    out.append("}")
    return out


def render_ruleset(pod: PodCapture) -> str:
    """Our tables for ``nft -f``, in ``nft list table`` form (mangle, then nat)."""
    mangle = _table(TABLE_MANGLE, [
        ("prerouting", "type filter hook prerouting priority mangle; policy accept;",
         [f"meta mark & {_MASK} == {_ZMARK} ct mark set ct mark & {_CT_KEEP} | {_CMARK}"]),
        ("output", "type route hook output priority mangle; policy accept;",
         [f"ct mark & {_MASK} == {_CMARK} meta mark set ct mark"]),
    ])
    prerouting = [f"ip saddr {pod.probe_snat_ip} meta l4proto tcp accept"]
    prerouting += [f'meta nfproto ipv4 iifname "{iface}" meta l4proto tcp redirect to '
                   f":{OUTBOUND_PORT}" for iface in pod.virtual_interfaces]
    if pod.inbound_capture:
        prerouting.append(f"ip daddr != 127.0.0.1 tcp dport != {INBOUND_HBONE_PORT} "
                          f"meta mark & {_MASK} != {_ZMARK} redirect to :{INBOUND_PLAINTEXT_PORT}")
    output = [
        f"ip daddr {pod.probe_snat_ip} meta l4proto tcp accept",
        f"meta l4proto tcp meta mark & {_MASK} == {_CMARK} accept",
        'oif "lo" ip daddr != 127.0.0.1 accept',
        f"ip daddr != 127.0.0.1 meta l4proto tcp meta mark & {_MASK} != {_ZMARK} "
        f"redirect to :{OUTBOUND_PORT}",
    ]
    nat = _table(TABLE_NAT, [
        ("prerouting", "type nat hook prerouting priority dstnat; policy accept;", prerouting),
        ("output", "type nat hook output priority -100; policy accept;", output),
    ])
    return "\n".join(mangle + nat) + "\n"


def _rendered_tables(rendered: str) -> list[tuple[str, str]]:
    """(table name, its text block) in order, from a rendering."""
    blocks: list[tuple[str, str]] = []
    for m in re.finditer(rf"^table {FAMILY} (\S+) \{{\n.*?^\}}\n", rendered, re.M | re.S):
        blocks.append((m.group(1), m.group(0)))
    return blocks


def apply_payload(rendered: str) -> str:
    """One ``nft -f`` transaction replacing our tables with ``rendered`` (and no raw table)."""
    out: list[str] = []
    present = set()
    for name, block in _rendered_tables(rendered):
        present.add(name)
        out += [f"table {FAMILY} {name}", f"delete table {FAMILY} {name}", block.rstrip("\n")]
    for name in OUR_TABLES:
        if name not in present:
            out += [f"table {FAMILY} {name}", f"delete table {FAMILY} {name}"]
    return "\n".join(out) + "\n"


def removal_payload() -> str:
    """One ``nft -f`` transaction deleting exactly our tables, present or not."""
    return "".join(f"table {FAMILY} {t}\ndelete table {FAMILY} {t}\n" for t in OUR_TABLES)


def parse_listing(text: str) -> dict[str, dict[str, list[str]]]:
    """``nft list table`` text -> {table: {chain: [header and rule lines]}} (handles dropped)."""
    tables: dict[str, dict[str, list[str]]] = {}
    table: dict[str, list[str]] | None = None
    chain: list[str] | None = None
    for raw in text.splitlines():
        line = re.sub(r"\s*# handle \d+$", "", raw).strip()
        if not line:
            continue
        if m := re.match(r"^table \S+ (\S+) \{$", line):
            table, chain = tables.setdefault(m.group(1), {}), None
        elif (m := re.match(r"^chain (\S+) \{$", line)) and table is not None:
            chain = table.setdefault(m.group(1), [])
        elif line == "}":
            if chain is not None:
                chain = None
            else:
                table = None
        elif chain is not None:
            chain.append(line)
    return tables


def drift(rendered: str, live: str) -> list[str]:
    """Findings comparing the listing of our live tables with the rendering."""
    want, have = parse_listing(rendered), parse_listing(live)
    findings: list[str] = []
    for table, chains in want.items():
        if table not in have:
            findings.append(f"nft table {FAMILY} {table} is missing")
            continue
        for chain, lines in chains.items():
            got = have[table].get(chain)
            if got is None:
                findings.append(f"nft {table}: chain {chain} is missing")
                continue
            findings += [f"nft {table} {chain}: missing `{r}`"
                         for r in (Counter(lines) - Counter(got)).elements()]
            findings += [f"nft {table} {chain}: unexpected `{r}`"
                         for r in (Counter(got) - Counter(lines)).elements()]
            if Counter(lines) == Counter(got) and lines != got:
                findings.append(f"nft {table} {chain}: rules are out of order")
        findings += [f"nft {table}: unexpected chain {c}" for c in have[table] if c not in chains]
    findings += [f"nft table {FAMILY} {t} should not exist" for t in have if t not in want]
    return findings


class NftablesBackend:
    """Capture with native nftables tables of our own inside each pod netns."""

    name: ClassVar[str] = "nftables"

    def unavailable_reason(self) -> str | None:
        for tool in (NFT, NSENTER):
            if not os.access(tool, os.X_OK):
                return f"{tool} is not installed (apt-get install nftables util-linux)"
        p = run(None, [NFT, "--version"])
        if p.returncode != 0:
            return f"nft does not run here: {describe(p)}"
        return None

    def setup_node(self) -> None:
        """Nothing node-wide: every table lives in a pod netns."""

    def teardown_node(self) -> list[str]:
        return []

    def apply(self, pod: PodCapture) -> None:
        where = f"capture of pod {pod.namespace}/{pod.name}"
        require_netns(pod.netns, where)
        p = run(pod.netns, [NFT, "-f", "-"], apply_payload(render_ruleset(pod)))
        if p.returncode != 0:
            raise CaptureError(f"{where}: {describe(p)}")
        apply_policy_routing(pod.netns)
        set_sysctl(pod.netns, MIGRATE_SYSCTL, "1")

    def remove(self, pod: PodCapture) -> list[str]:
        if not os.path.exists(pod.netns):
            return []
        errors: list[str] = []
        p = run(pod.netns, [NFT, "-f", "-"], removal_payload())
        if p.returncode != 0:
            errors.append(describe(p))
        errors += remove_policy_routing(pod.netns)
        return errors if os.path.exists(pod.netns) else []  # deleted meanwhile: nothing left

    def live_tables(self, netns: str) -> str:
        """The listing of our tables present in ``netns`` (for ``check`` and debugging)."""
        p = run(netns, [NFT, "list", "tables", FAMILY])
        if p.returncode != 0:
            raise CaptureError(f"listing nft tables in {netns}: {describe(p)}")
        names = {line.split()[-1] for line in p.stdout.splitlines() if line.strip()}
        out = []
        for table in OUR_TABLES:
            if table in names:
                q = run(netns, [NFT, "list", "table", FAMILY, table])
                if q.returncode != 0:
                    raise CaptureError(f"listing {table} in {netns}: {describe(q)}")
                out.append(q.stdout)
        return "".join(out)

    def check(self, pod: PodCapture) -> list[str]:
        if not os.path.exists(pod.netns):
            return [f"pod netns {pod.netns} does not exist"]
        try:
            findings = drift(render_ruleset(pod), self.live_tables(pod.netns))
        except CaptureError as exc:
            findings = [str(exc)]
        return findings + check_policy_routing(pod.netns) + check_migrate_sysctl(pod.netns)
