"""The node-side kubelet probe SNAT (contract C.4): golden renderings of both flavours, the
set-member parsers and drift, and the constructor's validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from cni.capture.base import CaptureError
from cni.capture.iptables import drift, restore_payload
from cni.capture.probe import (
    ProbeSnat,
    expected_nft_chain,
    ipset_members,
    member_drift,
    nft_set_members,
    render_ipset_create,
    render_probe_iptables,
    render_probe_nft,
)

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "capture"
RULE = ("-A ISTIO_POSTRT -p tcp -m owner --socket-exists -m set --match-set "
        "istio-inpod-probes-v4 dst -j SNAT --to-source 169.254.7.127")


def test_iptables_golden() -> None:
    assert render_probe_iptables() == (GOLDEN / "probe-iptables.rules").read_text()
    assert RULE in render_probe_iptables()
    assert "-I POSTROUTING 1 -j ISTIO_POSTRT" in render_probe_iptables()  # before masquerade


def test_nftables_golden() -> None:
    assert render_probe_nft() == (GOLDEN / "probe-nftables.nft").read_text()


def test_snat_ip_is_a_parameter() -> None:
    assert render_probe_iptables("169.254.9.9") == render_probe_iptables().replace(
        "169.254.7.127", "169.254.9.9")
    assert render_probe_nft("169.254.9.9") == render_probe_nft().replace(
        "169.254.7.127", "169.254.9.9")
    assert expected_nft_chain("169.254.9.9")[1].endswith("snat ip to 169.254.9.9")


def test_nft_setup_keeps_set_members() -> None:
    """Re-setup after an agent restart must not forget enrolled pods: no table delete, and the
    chain is flushed (not deleted) before its one rule is added again."""
    text = render_probe_nft()
    assert "delete" not in text
    assert text.index("flush chain") < text.index("add rule")
    assert render_ipset_create()[-1] == "-exist"


LIVE_IPT = """\
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:ISTIO_POSTRT - [0:0]
-A POSTROUTING -j ISTIO_POSTRT
-A POSTROUTING -o eth0 -j MASQUERADE
""" + RULE + "\nCOMMIT\n"


@pytest.mark.parametrize("live, expected", [
    (LIVE_IPT, []),
    (LIVE_IPT.replace(RULE + "\n", ""), [f"iptables nat: missing rule `{RULE}`"]),
    (LIVE_IPT.replace("-A POSTROUTING -j ISTIO_POSTRT\n", ""),
     ["iptables nat: missing jump `-A POSTROUTING -j ISTIO_POSTRT`"]),
])
def test_iptables_drift(live: str, expected: list[str]) -> None:
    assert drift(render_probe_iptables(), live, ("ISTIO_POSTRT",),
                 (("POSTROUTING", "ISTIO_POSTRT"),)) == expected


def test_iptables_resetup_does_not_insert_a_second_jump() -> None:
    payload = restore_payload(render_probe_iptables(), LIVE_IPT, ("ISTIO_POSTRT",))
    assert "POSTROUTING" not in payload.replace("ISTIO_POSTRT", "")
    assert RULE in payload


def test_ipset_members() -> None:
    save = ("create istio-inpod-probes-v4 hash:ip family inet hashsize 1024 maxelem 65536\n"
            "add istio-inpod-probes-v4 10.2.2.2\nadd istio-inpod-probes-v4 10.2.2.3\n"
            "add other-set 10.9.9.9\n")
    assert ipset_members(save) == {"10.2.2.2", "10.2.2.3"}
    assert ipset_members("") == set()


def test_nft_set_members() -> None:
    doc = {"nftables": [{"metainfo": {"version": "1.0.6"}},
                        {"set": {"family": "inet", "name": "istio-inpod-probes-v4",
                                 "table": "istio-ambient-nat", "type": "ipv4_addr",
                                 "elem": ["10.1.1.1", "10.1.1.3"]}}]}
    assert nft_set_members(doc) == {"10.1.1.1", "10.1.1.3"}
    empty = {"nftables": [{"set": {"name": "istio-inpod-probes-v4", "type": "ipv4_addr"}}]}
    assert nft_set_members(empty) == set()


@pytest.mark.parametrize("expected, live, findings", [
    (["10.0.0.1"], {"10.0.0.1"}, []),
    (["10.0.0.1", "10.0.0.2"], {"10.0.0.1"},
     ["probe set istio-inpod-probes-v4 lacks pod IP 10.0.0.2"]),
    ([], {"10.0.0.9"}, ["probe set istio-inpod-probes-v4 holds unexpected IP 10.0.0.9"]),
])
def test_member_drift(expected: list[str], live: set[str], findings: list[str]) -> None:
    assert member_drift(expected, live) == findings


def test_constructor_validates() -> None:
    with pytest.raises(CaptureError, match="flavour 'ebpf' is unknown"):
        ProbeSnat("ebpf", None)  # type: ignore[arg-type]
    with pytest.raises(CaptureError, match="not an IPv4 address"):
        ProbeSnat("iptables", None, snat_ip="fd16:9254:7127:1337:ffff:ffff:ffff:ffff")
    with pytest.raises(CaptureError, match="not an IPv4 address"):
        ProbeSnat("nftables", None).add_pod_ip("10.0.0.300")
