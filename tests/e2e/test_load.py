"""End to end, short: load through one ztunnel, no leak afterwards, slow HBONE peers bounded.

The short versions of ``make soak`` (``tests/soak/``), on the two-node load mesh
(``tests/soak/mesh.yaml``, iptables capture) with short ztunnel timeouts
(``HBONE_HANDSHAKE_TIMEOUT=2s``, ``HBONE_IDLE_TIMEOUT=8s``, and
``POOL_UNUSED_RELEASE_TIMEOUT=5s`` so pooled connections are let go before the settle wait ends):

1. 1,000 concurrent connections from one client application, held, each exchanging a line
   when opened and again before it closes: none fails, and afterwards both ztunnels have no
   live connection and their descriptors are back at the baseline;
2. 200 new connections per second for 10 s: none fails, same check afterwards;
3. slow HBONE peers, several of each kind at once against a real ztunnel's 15008 (silent TCP,
   TLS without the HTTP/2 preface, the preface trickled a byte a second, a CONNECT stream
   trickling a byte a second, a stream whose HTTP/2 window stays closed, a peer that stops
   reading TCP): ztunnel closes every one of them; the trickling stream is served while it
   trickles; an ordinary connection works meanwhile; descriptors return to the baseline.

No assertion is about speed: counts of failures and returns to a baseline only (each wait is
bounded so a hang fails instead of blocking the suite).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.soak import harness

pytestmark = [pytest.mark.e2e, pytest.mark.netns]

SHORT_TIMEOUTS = {"HBONE_HANDSHAKE_TIMEOUT": "2s", "HBONE_IDLE_TIMEOUT": "8s",
                  "POOL_UNUSED_RELEASE_TIMEOUT": "5s"}


@pytest.fixture(scope="module")
def sm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.SoakMesh]:
    with harness.SoakMesh(Path(tmp_path_factory.mktemp("load")), SHORT_TIMEOUTS) as m:
        yield m


def test_concurrent_connections_held_and_released(sm: harness.SoakMesh) -> None:
    r = harness.hold_scenario(sm, 1000, max_seconds=240)
    assert r.peak["open"] == 1000 and r.peak["failed"] == 0, r.peak
    assert r.done["closed_ok"] == 1000 and r.done["close_failed"] == 0, r.done
    # At the peak both ztunnels really held them (a descriptor per proxied leg at least).
    for node in ("node-a", "node-b"):
        assert r.at_peak[node]["live"] >= 1000, (node, r.at_peak)
        assert r.at_peak[node]["fds"] >= r.before[node]["fds"] + 1000, (node, r.at_peak)
        assert r.after[node]["live"] == 0 and r.after[node]["fds"] <= r.before[node]["fds"]


def test_connection_rate(sm: harness.SoakMesh) -> None:
    r = harness.rate_scenario(sm, 200, 10)
    res = r.result
    assert res["attempted"] == 2000 and res["ok"] == 2000, res
    assert res["failed"] == 0 and res["skipped_max_inflight"] == 0, res
    for node in ("node-a", "node-b"):
        assert r.after[node]["live"] == 0 and r.after[node]["fds"] <= r.before[node]["fds"]


def test_slow_hbone_peers_are_bounded(sm: harness.SoakMesh) -> None:
    r = harness.slow_peer_scenario(sm, per_kind=5, bound=60, settings=SHORT_TIMEOUTS)
    kinds = harness.summarize_peers(r.outcomes)
    assert set(kinds) == {"silent", "tls-no-preface", "preface-trickle", "trickle-stream",
                          "zero-window", "tcp-nonreader"}
    not_closed = [o for o in r.outcomes if not o["closed_by_ztunnel"]]
    assert not not_closed, not_closed
    assert kinds["trickle-stream"]["served"] == 5, kinds  # slow is not refused: it is served
    assert r.during["fds"] > r.before["fds"], r  # the peers were really there
    assert r.normal_ok_during, "an ordinary connection failed while slow peers were connected"
    assert r.after["fds"] <= r.before["fds"] and r.after["live"] == 0, r
