"""``tap``: the client-side event filter and line format (pure)."""

# ruff: noqa: E501

from __future__ import annotations

import pytest

from ambient.ops.tap import TapFilter, event_matches, format_event

OPEN = {"event": "open", "time": "2026-11-27T18:00:01Z", "node": "node-b", "direction": "inbound",
        "src": "10.244.1.2:4000", "dst": "10.244.2.3:8080", "srcWorkload": "frontend", "srcNamespace": "shop",
        "dstWorkload": "db", "dstNamespace": "shop", "srcIdentity": "spiffe://cluster.local/ns/shop/sa/frontend",
        "securityPolicy": "mutual_tls", "policy": None}
DENIED = {**OPEN, "event": "close", "policy": {"decision": "deny", "policy": None, "reason": "denied: allow policies exist, but none allowed"},
          "responseFlags": "DENY", "bytesSent": 0, "bytesRecv": 0, "durationMs": 3, "error": "denied: allow policies exist, but none allowed"}
ALLOWED = {**OPEN, "event": "close", "srcWorkload": "backend-2", "policy": {"decision": "allow", "policy": "shop/db-allow-backend", "reason": "allowed"},
           "responseFlags": "-", "bytesSent": 5, "bytesRecv": 40, "durationMs": 12, "error": None}
PLAIN = {**OPEN, "event": "close", "srcWorkload": "client", "srcNamespace": "legacy", "securityPolicy": "unknown", "dstWorkload": "web", "dstNamespace": "legacy",
         "responseFlags": "-", "bytesSent": 1, "bytesRecv": 1, "durationMs": 1}

# (id, filter, events that pass)
CASES = [
    ("no filter", TapFilter(), ["OPEN", "DENIED", "ALLOWED", "PLAIN"]),
    ("denied", TapFilter(denied=True), ["DENIED"]),
    ("closed", TapFilter(closed_only=True), ["DENIED", "ALLOWED", "PLAIN"]),
    ("namespace legacy", TapFilter(namespace="legacy"), ["PLAIN"]),
    ("namespace shop", TapFilter(namespace="shop"), ["OPEN", "DENIED", "ALLOWED"]),
    ("workload by name", TapFilter(workload="backend-2"), ["ALLOWED"]),
    ("workload ns/name (destination)", TapFilter(workload="shop/db"), ["OPEN", "DENIED", "ALLOWED"]),
    ("workload wrong ns", TapFilter(workload="legacy/db"), []),
    ("denied in legacy", TapFilter(namespace="legacy", denied=True), []),
]
EVENTS = {"OPEN": OPEN, "DENIED": DENIED, "ALLOWED": ALLOWED, "PLAIN": PLAIN}


@pytest.mark.parametrize(("f", "passing"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_filter(f, passing) -> None:
    assert [k for k, ev in EVENTS.items() if event_matches(ev, f)] == passing


@pytest.mark.parametrize("kind", ["subscribed", "dropped", None])
def test_non_connection_events_never_pass(kind) -> None:
    assert not event_matches({"event": kind}, TapFilter())


def test_format() -> None:
    line = format_event(DENIED)
    assert line.startswith("18:00:01 node-b     close inbound  shop/frontend[10.244.1.2:4000] -> shop/db[10.244.2.3:8080]")
    assert "mtls src=spiffe://cluster.local/ns/shop/sa/frontend" in line
    assert "policy=DENY" in line and "flags=DENY" in line and "error=" in line
    assert "policy=ALLOW(shop/db-allow-backend)" in format_event(ALLOWED)
    assert "sent=5B recv=40B 12ms" in format_event(ALLOWED)
    assert " plaintext" in format_event(PLAIN) and "policy=" not in format_event(PLAIN)
    assert "flags=" not in format_event(OPEN)
