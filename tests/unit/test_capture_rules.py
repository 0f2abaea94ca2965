"""Golden rendering of the in-pod capture rules (contract C.3, iptables, IPv4, no DNS)."""

from __future__ import annotations

import pytest

from ambient.cluster.capture import CaptureConfig, render_iptables_rules, render_policy_routing

GOLDEN = """\
*mangle
:ISTIO_PRERT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark \
--nfmask 0xffffffff --ctmask 0xffffffff
COMMIT
*nat
:ISTIO_PRERT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_PRERT -s 169.254.7.127 -p tcp -m tcp -j ACCEPT
-A ISTIO_OUTPUT -d 169.254.7.127 -p tcp -m tcp -j ACCEPT
-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff \
-j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT \
--to-ports 15001
COMMIT
"""

INBOUND = ("-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m mark ! --mark "
           "0x539/0xfff -j REDIRECT --to-ports 15006\n")


def test_default_golden():
    assert render_iptables_rules() == GOLDEN
    assert render_iptables_rules(CaptureConfig()) == GOLDEN


@pytest.mark.parametrize(
    "config, expected",
    [
        (CaptureConfig(inbound_capture=False), GOLDEN.replace(INBOUND, "")),
        (CaptureConfig(probe_snat_ip="169.254.9.9"), GOLDEN.replace("169.254.7.127",
                                                                    "169.254.9.9")),
        (CaptureConfig(virtual_interfaces=("tun0",)),
         GOLDEN.replace(INBOUND, "-A ISTIO_PRERT -i tun0 -p tcp -j REDIRECT --to-ports 15001\n"
                        + INBOUND)),
    ],
    ids=["bypass-inbound", "probe-snat-ip", "virtual-interface"],
)
def test_variants(config, expected):
    assert render_iptables_rules(config) == expected


def test_no_dns_capture_yet():
    text = render_iptables_rules()
    assert "15053" not in text and "*raw" not in text and "--dport 53" not in text


def test_policy_routing():
    assert render_policy_routing() == [
        ["rule", "add", "fwmark", "0x111/0xfff", "pref", "32764", "lookup", "100"],
        ["route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100"],
    ]
