"""The native nftables capture backend's pure parts: golden ruleset, the atomic apply and
removal transactions, parsing ``nft list`` output, drift findings, and rule equivalence with
the iptables rendering."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from cni.capture.base import PodCapture
from cni.capture.iptables import render_rules
from cni.capture.nftables import (
    apply_payload,
    drift,
    parse_listing,
    removal_payload,
    render_ruleset,
)

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "capture"
POD = PodCapture("uid-1", "app", "default", "/var/run/netns/x", ips=("10.0.0.5",))
VARIANTS = {
    "default": POD,
    "bypass-inbound": dataclasses.replace(POD, inbound_capture=False),
    "virtual-interfaces": dataclasses.replace(POD, virtual_interfaces=("tun0", "tun1")),
}
INBOUND = ("ip daddr != 127.0.0.1 tcp dport != 15008 meta mark & 0x00000fff != 0x00000539 "
           "redirect to :15006")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_render_golden(variant: str) -> None:
    assert render_ruleset(VARIANTS[variant]) == (GOLDEN / f"nftables-{variant}.nft").read_text()


def test_hooks_and_priorities() -> None:
    text = render_ruleset(POD)
    hooks = re.findall(r"type (\w+) hook (\w+) priority ([\w-]+);", text)
    assert hooks == [("filter", "prerouting", "mangle"), ("route", "output", "mangle"),
                     ("nat", "prerouting", "dstnat"), ("nat", "output", "-100")]
    assert re.findall(r"^table (\S+ \S+) \{$", text, re.M) == [
        "inet istio-ambient-mangle", "inet istio-ambient-nat"]


def test_variants() -> None:
    default = render_ruleset(POD)
    assert "\t\t" + INBOUND + "\n" in default
    assert render_ruleset(VARIANTS["bypass-inbound"]) == default.replace(
        "\t\t" + INBOUND + "\n", "")
    assert render_ruleset(dataclasses.replace(POD, probe_snat_ip="169.254.9.9")) == \
        default.replace("169.254.7.127", "169.254.9.9")
    assert "raw" not in default and "15053" not in default  # no DNS capture yet


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_same_redirects_as_iptables(variant: str) -> None:
    """Each iptables REDIRECT/ACCEPT in nat has one nft counterpart, in the same order."""
    pod = VARIANTS[variant]
    ipt = render_rules(pod).split("*nat\n")[1]
    nft = parse_listing(render_ruleset(pod))["istio-ambient-nat"]

    def ipt_seq(chain: str) -> list[str]:
        return [re.search(r"-j (\w+)(?: --to-ports (\d+))?$", r).group(0)  # type: ignore[union-attr]
                for r in ipt.splitlines() if r.startswith(f"-A {chain} ")]

    def nft_seq(chain: str) -> list[str]:
        out = []
        for r in nft[chain][1:]:
            m = re.search(r"redirect to :(\d+)$", r)
            out.append(f"-j REDIRECT --to-ports {m.group(1)}" if m else "-j ACCEPT")
        return out

    assert nft_seq("prerouting") == ipt_seq("ISTIO_PRERT")
    assert nft_seq("output") == ipt_seq("ISTIO_OUTPUT")


def test_apply_payload_is_one_replace_transaction() -> None:
    payload = apply_payload(render_ruleset(POD))
    lines = payload.splitlines()
    assert lines[:3] == ["table inet istio-ambient-mangle",
                         "delete table inet istio-ambient-mangle",
                         "table inet istio-ambient-mangle {"]
    nat = lines.index("table inet istio-ambient-nat")
    assert lines[nat + 1:nat + 3] == ["delete table inet istio-ambient-nat",
                                      "table inet istio-ambient-nat {"]
    assert lines[-2:] == ["table inet istio-ambient-raw", "delete table inet istio-ambient-raw"]
    for block in render_ruleset(POD).split("}\ntable"):
        assert block.strip("\n") in payload


def test_removal_payload_names_exactly_our_tables() -> None:
    assert removal_payload() == (
        "table inet istio-ambient-mangle\ndelete table inet istio-ambient-mangle\n"
        "table inet istio-ambient-nat\ndelete table inet istio-ambient-nat\n"
        "table inet istio-ambient-raw\ndelete table inet istio-ambient-raw\n")


def test_parse_listing_drops_handles() -> None:
    listing = ('table inet istio-ambient-nat { # handle 8\n'
               '\tchain output { # handle 2\n'
               '\t\ttype nat hook output priority -100; policy accept;\n'
               '\t\toif "lo" ip daddr != 127.0.0.1 accept # handle 8\n'
               '\t}\n}\n')
    assert parse_listing(listing) == {"istio-ambient-nat": {"output": [
        "type nat hook output priority -100; policy accept;",
        'oif "lo" ip daddr != 127.0.0.1 accept']}}


LIVE = render_ruleset(POD)


@pytest.mark.parametrize("live, expected", [
    (LIVE, []),
    (LIVE.replace("\t\t" + INBOUND + "\n", ""),
     [f"nft istio-ambient-nat prerouting: missing `{INBOUND}`"]),
    (LIVE.replace("\t\toif", "\t\tip daddr 10.9.9.9 accept\n\t\toif"),
     ["nft istio-ambient-nat output: unexpected `ip daddr 10.9.9.9 accept`"]),
    (LIVE.split("table inet istio-ambient-nat")[0],
     ["nft table inet istio-ambient-nat is missing"]),
    (LIVE + "table inet istio-ambient-raw {\n}\n",
     ["nft table inet istio-ambient-raw should not exist"]),
    (LIVE.replace("priority mangle; policy accept;\n\t\tmeta mark",
                  "priority mangle; policy drop;\n\t\tmeta mark"),
     ["nft istio-ambient-mangle prerouting: missing `type filter hook prerouting priority "
      "mangle; policy accept;`",
      "nft istio-ambient-mangle prerouting: unexpected `type filter hook prerouting priority "
      "mangle; policy drop;`"]),
    ("", ["nft table inet istio-ambient-mangle is missing",
          "nft table inet istio-ambient-nat is missing"]),
], ids=["in-place", "rule-deleted", "rule-added", "table-gone", "stale-raw", "policy-changed",
        "nothing"])
def test_drift(live: str, expected: list[str]) -> None:
    assert drift(render_ruleset(POD), live) == expected


def test_drift_sees_reordering() -> None:
    mangle, nat = LIVE.split("table inet istio-ambient-nat")
    head, body = nat.split("chain output {\n")
    lines = body.split("\n")
    lines[1], lines[2] = lines[2], lines[1]
    live = mangle + "table inet istio-ambient-nat" + head + "chain output {\n" + "\n".join(lines)
    assert drift(render_ruleset(POD), live) == [
        "nft istio-ambient-nat output: rules are out of order"]
