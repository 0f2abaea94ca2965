"""Node-side kubelet health-probe SNAT (contract C.4), used by the node agent with any backend.

Role: kubelet probes a pod from the node netns.  Those connections must not be forced
through ztunnel (STRICT mTLS would reject them), so the node rewrites their source to the
link-local probe address 169.254.7.127, which the in-pod capture accepts untouched.  The
SNAT applies only to destinations in a set holding the IPs of enrolled pods.

Two flavours, both in the *node* netns (``node_netns`` path, or None for the caller's own):
- ``iptables``: ipset ``istio-inpod-probes-v4`` (``hash:ip``), chain ``ISTIO_POSTRT`` in
  ``nat`` jumped to from the *first* rule of POSTROUTING (before any masquerade rule), with
  ``-p tcp -m owner --socket-exists -m set --match-set istio-inpod-probes-v4 dst -j SNAT
  --to-source 169.254.7.127`` (``--socket-exists``: only locally generated packets).
- ``nftables``: table ``inet istio-ambient-nat`` (it lives in the node netns, so it never
  meets a pod's table of the same name) with set ``istio-inpod-probes-v4`` and a
  ``postrouting`` chain at priority srcnat: ``meta l4proto tcp ip daddr @set fib saddr type
  local snat ip to 169.254.7.127``.  ``fib saddr type local`` ("the source is one of this
  node's addresses") selects locally generated packets, which is what ``--socket-exists``
  achieves, without Istio's ``meta skuid <kubelet uid>`` (that needs the kubelet's uid,
  which the agent cannot know in general, and uid 0 would match every root process anyway).
  Forwarded pod-to-pod traffic keeps its pod source address and is not rewritten.

Invariants:
- Renderers are pure and golden-tested, in the form the tools print back, so ``check``
  compares verbatim.
- ``setup`` is idempotent and keeps the set's members (a re-setup after an agent restart
  must not forget enrolled pods); ``add_pod_ip``/``remove_pod_ip`` are idempotent.  An
  existing POSTROUTING jump is kept where it is; ``check`` reports one that is not first.
- ``teardown`` removes the chain(s), jump, set and (iptables-nft) a then-empty ``ip nat``
  table; it never raises and returns the errors met.
- IPv4 only (the v6 set ``istio-inpod-probes-v6`` and ``fd16:9254:7127:1337:ffff:ffff:ffff:ffff``
  are not built).
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Iterable
from typing import Any, Literal

from cni.capture.base import PROBE_SNAT_IP, CaptureError
from cni.capture.common import describe, run
from cni.capture.iptables import (
    IPTABLES_RESTORE,
    IPTABLES_SAVE,
    drift,
    drop_empty_tables,
    parse_save,
    removal_payload,
    restore_payload,
)
from cni.capture.nftables import FAMILY, NFT, parse_listing

IPSET = "/usr/sbin/ipset"
SET_V4 = "istio-inpod-probes-v4"
CHAIN_POSTRT = "ISTIO_POSTRT"
NFT_TABLE = "istio-ambient-nat"
NFT_CHAIN = "postrouting"
Flavor = Literal["iptables", "nftables"]
_POSTRT_CHAINS = (CHAIN_POSTRT,)
_POSTRT_JUMPS = (("POSTROUTING", CHAIN_POSTRT),)


def render_probe_iptables(snat_ip: str = PROBE_SNAT_IP) -> str:
    """The node's nat rules for ``iptables-restore --noflush`` (the ipset must exist)."""
    return (f"*nat\n:{CHAIN_POSTRT} - [0:0]\n-I POSTROUTING 1 -j {CHAIN_POSTRT}\n"
            f"-A {CHAIN_POSTRT} -p tcp -m owner --socket-exists -m set --match-set {SET_V4} "
            f"dst -j SNAT --to-source {snat_ip}\nCOMMIT\n")


def render_ipset_create() -> list[str]:
    """``ipset`` arguments creating the set (``-exist``: idempotent, members kept)."""
    return ["create", SET_V4, "hash:ip", "family", "inet", "-exist"]


def probe_nft_rule(snat_ip: str = PROBE_SNAT_IP) -> str:
    return (f"meta l4proto tcp ip daddr @{SET_V4} fib saddr type local snat ip to {snat_ip}")


def render_probe_nft(snat_ip: str = PROBE_SNAT_IP) -> str:
    """One ``nft -f`` transaction: create-if-missing table, set and chain; replace the rule."""
    t = f"{FAMILY} {NFT_TABLE}"
    return (f"add table {t}\n"
            f"add set {t} {SET_V4} {{ type ipv4_addr; }}\n"
            f"add chain {t} {NFT_CHAIN} {{ type nat hook postrouting priority srcnat; "
            "policy accept; }\n"
            f"flush chain {t} {NFT_CHAIN}\n"
            f"add rule {t} {NFT_CHAIN} {probe_nft_rule(snat_ip)}\n")


def expected_nft_chain(snat_ip: str = PROBE_SNAT_IP) -> list[str]:
    """The chain's lines as ``nft list chain`` prints them."""
    return ["type nat hook postrouting priority srcnat; policy accept;", probe_nft_rule(snat_ip)]


def ipset_members(save_text: str) -> set[str]:
    """Members of our set from ``ipset save <set>`` output."""
    return {parts[2] for parts in (line.split() for line in save_text.splitlines())
            if len(parts) >= 3 and parts[0] == "add" and parts[1] == SET_V4}


def nft_set_members(nft_json: dict[str, Any]) -> set[str]:
    """Members of our set from ``nft -j list set`` output."""
    out: set[str] = set()
    for obj in nft_json.get("nftables", []):
        s = obj.get("set") if isinstance(obj, dict) else None
        if isinstance(s, dict) and s.get("name") == SET_V4:
            out.update(e for e in s.get("elem", []) if isinstance(e, str))
    return out


def member_drift(expected: Iterable[str], live: set[str]) -> list[str]:
    want = set(expected)
    return ([f"probe set {SET_V4} lacks pod IP {ip}" for ip in sorted(want - live)]
            + [f"probe set {SET_V4} holds unexpected IP {ip}" for ip in sorted(live - want)])


def _ipv4(ip: str) -> str:
    try:
        return str(ipaddress.IPv4Address(ip))
    except ValueError as exc:
        raise CaptureError(f"probe SNAT: {ip!r} is not an IPv4 address (IPv6 is not "
                           "supported yet)") from exc


class ProbeSnat:
    """The kubelet probe SNAT of one node, in the ``iptables`` or ``nftables`` flavour."""

    def __init__(self, flavor: Flavor, node_netns: str | None = None,
                 snat_ip: str = PROBE_SNAT_IP) -> None:
        if flavor not in ("iptables", "nftables"):
            raise CaptureError(f"probe SNAT flavour {flavor!r} is unknown: use 'iptables' or "
                               "'nftables' (the eBPF backend uses one of them for the node)")
        self.flavor: Flavor = flavor
        self.node_netns = node_netns
        self.snat_ip = _ipv4(snat_ip)

    def _run(self, argv: list[str], stdin: str | None = None, what: str = "") -> str:
        p = run(self.node_netns, argv, stdin)
        if p.returncode != 0:
            where = self.node_netns or "the node netns"
            raise CaptureError(f"probe SNAT {what} in {where}: {describe(p)}")
        return p.stdout

    def setup(self) -> None:
        """Create the set and the SNAT rule (idempotent; members are kept)."""
        if self.node_netns is not None and not os.path.exists(self.node_netns):
            raise CaptureError(f"probe SNAT: node netns {self.node_netns} does not exist")
        if self.flavor == "nftables":
            self._run([NFT, "-f", "-"], render_probe_nft(self.snat_ip), "setup")
            return
        self._run([IPSET, *render_ipset_create()], what="ipset create")
        live = self._run([IPTABLES_SAVE, "-t", "nat"], what="iptables-save")
        self._run([IPTABLES_RESTORE, "-w", "--noflush"],
                  restore_payload(render_probe_iptables(self.snat_ip), live, _POSTRT_CHAINS),
                  "iptables-restore")

    def add_pod_ip(self, ip: str) -> None:
        ip = _ipv4(ip)
        if self.flavor == "nftables":
            self._run([NFT, "add", "element", FAMILY, NFT_TABLE, SET_V4, f"{{ {ip} }}"],
                      what=f"add {ip}")
        else:
            self._run([IPSET, "add", SET_V4, ip, "-exist"], what=f"add {ip}")

    def remove_pod_ip(self, ip: str) -> None:
        """Forget a pod IP (idempotent: an IP that is not in the set is fine)."""
        ip = _ipv4(ip)
        if self.flavor == "iptables":
            self._run([IPSET, "del", SET_V4, ip, "-exist"], what=f"remove {ip}")
        elif ip in self.members():
            self._run([NFT, "delete", "element", FAMILY, NFT_TABLE, SET_V4, f"{{ {ip} }}"],
                      what=f"remove {ip}")

    def members(self) -> set[str]:
        """The pod IPs currently in the set."""
        if self.flavor == "iptables":
            return ipset_members(self._run([IPSET, "save", SET_V4], what="ipset save"))
        return nft_set_members(json.loads(self._run(
            [NFT, "-j", "list", "set", FAMILY, NFT_TABLE, SET_V4], what="list set")))

    def teardown(self) -> list[str]:
        """Remove rule, chain, set; never raises; returns the errors met."""
        if self.node_netns is not None and not os.path.exists(self.node_netns):
            return []
        errors: list[str] = []
        if self.flavor == "nftables":
            p = run(self.node_netns, [NFT, "-f", "-"],
                    f"table {FAMILY} {NFT_TABLE}\ndelete table {FAMILY} {NFT_TABLE}\n")
            return [describe(p)] if p.returncode != 0 else []
        save = run(self.node_netns, [IPTABLES_SAVE, "-t", "nat"])
        if save.returncode != 0:
            errors.append(describe(save))
        else:
            payload = removal_payload(save.stdout, _POSTRT_CHAINS)
            if payload:
                p = run(self.node_netns, [IPTABLES_RESTORE, "-w", "--noflush"], payload)
                if p.returncode != 0:
                    errors.append(describe(p))
        p = run(self.node_netns, [IPSET, "destroy", SET_V4])
        if p.returncode != 0 and "does not exist" not in p.stderr:
            errors.append(describe(p))
        return errors + drop_empty_tables(self.node_netns, ("nat",))

    def check(self, expected_ips: Iterable[str] | None = None) -> list[str]:
        """Drift findings; with ``expected_ips`` the set's members are compared too."""
        try:
            findings = self._check_rules()
            if expected_ips is not None:
                findings += member_drift(expected_ips, self.members())
        except CaptureError as exc:
            return [str(exc)]
        return findings

    def _check_rules(self) -> list[str]:
        if self.flavor == "nftables":
            p = run(self.node_netns, [NFT, "list", "chain", FAMILY, NFT_TABLE, NFT_CHAIN])
            if p.returncode != 0:
                return [f"probe SNAT chain {NFT_TABLE} {NFT_CHAIN} is missing"]
            got = parse_listing(p.stdout).get(NFT_TABLE, {}).get(NFT_CHAIN, [])
            want = expected_nft_chain(self.snat_ip)
            return [] if got == want else [
                f"probe SNAT chain {NFT_CHAIN} is {got}, expected {want}"]
        live = self._run([IPTABLES_SAVE, "-t", "nat"], what="iptables-save")
        findings = drift(render_probe_iptables(self.snat_ip), live, _POSTRT_CHAINS,
                         _POSTRT_JUMPS)
        postrouting = parse_save(live).get("nat")
        first = postrouting.rules.get("POSTROUTING", [""])[0] if postrouting else ""
        if not findings and first != f"-A POSTROUTING -j {CHAIN_POSTRT}":
            findings.append(f"the jump to {CHAIN_POSTRT} is not the first POSTROUTING rule "
                            f"(first is `{first}`): a masquerade rule may win over the SNAT")
        p = run(self.node_netns, [IPSET, "list", "-n", SET_V4])
        if p.returncode != 0:
            findings.append(f"ipset {SET_V4} is missing")
        return findings
