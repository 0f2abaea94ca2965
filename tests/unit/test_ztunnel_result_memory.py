"""ConnectionResult's footprint: slots, and one shared label tuple per distinct key."""

from __future__ import annotations

import pytest

from ztunnel.metrics import TRAFFIC_LABELS
from ztunnel.result import ConnectionResult


def _result(identity: str) -> ConnectionResult:
    return ConnectionResult("source", ("10.0.0.1", 40000), ("10.0.0.2", 80),
                            src_identity=identity, security_policy="mutual_tls")


def test_results_have_slots() -> None:
    r = _result("spiffe://cluster.local/ns/a/sa/b")
    assert not hasattr(r, "__dict__")
    with pytest.raises(AttributeError):
        r.not_a_field = 1  # type: ignore[attr-defined]


def test_equal_labels_share_one_key_and_labels_are_copies() -> None:
    a, b = _result(f"spiffe://cluster.local/ns/a/sa/{'b'}"), _result("spiffe://cluster.local/ns/a/sa/b")
    c = _result("spiffe://cluster.local/ns/a/sa/c")
    assert a.labels() == b.labels() and list(a.labels()) == list(TRAFFIC_LABELS)
    assert a._label_values() is b._label_values()
    assert c._label_values() is not a._label_values()
    assert c.labels()["source_principal"] == "spiffe://cluster.local/ns/a/sa/c"
    mutated = a.labels()
    mutated["reporter"] = "destination"
    assert a.labels()["reporter"] == "source" and b.labels()["reporter"] == "source"
    # The labels are fixed at first use (open): later changes to the fields do not move them.
    a.src_identity = "spiffe://cluster.local/ns/a/sa/z"
    assert a.labels()["source_principal"] == "spiffe://cluster.local/ns/a/sa/b"
