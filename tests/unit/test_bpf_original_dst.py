"""ztunnel's original-destination fallback when SO_ORIGINAL_DST is unavailable (eBPF capture)."""

from __future__ import annotations

import pytest

from ztunnel.sockets import fallback_original_dst

POD = "10.77.0.2"


@pytest.mark.parametrize(("mapped", "local", "listen_port", "expected"), [
    # outbound (15001): the map entry is the answer
    (("10.99.0.9", 80), (POD, 15001), 15001, ("10.99.0.9", 80)),
    (("10.99.0.9", 80), (POD, 15001), None, ("10.99.0.9", 80)),
    # outbound without an entry: the local address is ztunnel's own listener: no answer
    (None, (POD, 15001), 15001, None),
    (None, (POD, 15001), None, None),
    # inbound via sk_assign/TPROXY: the local address is what the client dialled
    (None, (POD, 8080), 15006, (POD, 8080)),
    (None, (POD, 8080), None, (POD, 8080)),
    # a connection straight to the listener's port carries no original destination
    (None, (POD, 15006), 15006, None),
    (None, (POD, 15006), None, None),
    # with the listener port known, another capture port is a real destination
    (None, (POD, 15001), 15006, (POD, 15001)),
])
def test_fallback_original_dst(mapped, local, listen_port, expected):
    assert fallback_original_dst(mapped, local, listen_port) == expected
