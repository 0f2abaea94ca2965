"""SPIFFE identity parsing: the accepted Istio form and every refused variant, with its reason."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ambient.identity import DEFAULT_TRUST_DOMAIN, IdentityError, SpiffeId

VALID = [
    ("spiffe://cluster.local/ns/default/sa/default", ("cluster.local", "default", "default")),
    ("spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage",
     ("cluster.local", "bookinfo", "bookinfo-productpage")),
    ("spiffe://td/ns/a/sa/b", ("td", "a", "b")),
    ("spiffe://my_td-1.example.com/ns/n1/sa/s.a-1", ("my_td-1.example.com", "n1", "s.a-1")),
    ("spiffe://cluster.local/ns/" + "a" * 63 + "/sa/x", ("cluster.local", "a" * 63, "x")),
]


@pytest.mark.parametrize(("uri", "parts"), VALID)
def test_parse_valid(uri: str, parts: tuple[str, str, str]) -> None:
    sid = SpiffeId.parse(uri)
    assert (sid.trust_domain, sid.namespace, sid.service_account) == parts
    assert str(sid) == uri
    assert SpiffeId.parse(str(sid)) == sid


INVALID = [
    ("", "empty"),
    ("http://cluster.local/ns/a/sa/b", "must start with 'spiffe://'"),
    ("SPIFFE://cluster.local/ns/a/sa/b", "scheme must be lowercase"),
    ("spiffe:/cluster.local/ns/a/sa/b", "must start with 'spiffe://'"),
    ("spiffe:///ns/a/sa/b", "trust domain is empty"),
    ("spiffe://Cluster.Local/ns/a/sa/b", "may only contain lowercase"),
    ("spiffe://cluster.local:8080/ns/a/sa/b", "port"),
    ("spiffe://user@cluster.local/ns/a/sa/b", "user info"),
    ("spiffe://cluster.local/ns/a/sa/b?x=1", "query"),
    ("spiffe://cluster.local/ns/a/sa/b#frag", "fragment"),
    ("spiffe://cluster.local", "missing workload path"),
    ("spiffe://cluster.local/", "missing workload path"),
    ("spiffe://cluster.local/ns/a", "exactly /ns/<namespace>/sa/<service-account>"),
    ("spiffe://cluster.local/ns/a/sa/b/extra", "exactly /ns/"),
    ("spiffe://cluster.local/ns/a/sa/b/", "exactly /ns/"),
    ("spiffe://cluster.local/sa/b/ns/a", "exactly /ns/"),
    ("spiffe://cluster.local//ns/a/sa/b", "exactly /ns/"),
    ("spiffe://cluster.local/ns//sa/b", "namespace is empty"),
    ("spiffe://cluster.local/ns/a/sa/", "service account is empty"),
    ("spiffe://cluster.local/ns/A/sa/b", "namespace 'A' is not a DNS-1123 label"),
    ("spiffe://cluster.local/ns/a.b/sa/b", "namespace 'a.b'"),
    ("spiffe://cluster.local/ns/" + "a" * 64 + "/sa/b", "at most 63"),
    ("spiffe://cluster.local/ns/a/sa/-b", "service account '-b'"),
    ("spiffe://cluster.local/ns/a/sa/b_c", "service account 'b_c'"),
    ("spiffe://cluster.local/ns/a/sa/%62", "percent-encoding"),
    ("spiffe://cluster.local/ns/a/sa/b c", "whitespace"),
    ("spiffe://" + "a" * 256 + "/ns/a/sa/b", "longer than 255"),
]


@pytest.mark.parametrize(("uri", "reason"), INVALID)
def test_parse_invalid(uri: str, reason: str) -> None:
    with pytest.raises(IdentityError) as info:
        SpiffeId.parse(uri)
    assert reason in str(info.value)


def test_direct_construction_is_validated() -> None:
    with pytest.raises(IdentityError, match="namespace"):
        SpiffeId("cluster.local", "Bad", "sa")
    with pytest.raises(IdentityError, match="trust domain"):
        SpiffeId("", "ns", "sa")


def test_non_string_refused() -> None:
    with pytest.raises(IdentityError, match="string"):
        SpiffeId.parse(b"spiffe://cluster.local/ns/a/sa/b")  # type: ignore[arg-type]


def test_ordering_hash_and_default() -> None:
    a = SpiffeId(DEFAULT_TRUST_DOMAIN, "a", "x")
    b = SpiffeId(DEFAULT_TRUST_DOMAIN, "b", "x")
    assert sorted([b, a]) == [a, b]
    assert {a, SpiffeId.parse(str(a))} == {a}
    assert isinstance(IdentityError("x"), ValueError)


_label = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)
_td = st.from_regex(r"[a-z0-9._-]{1,30}", fullmatch=True)


@given(_td, _label, _label)
def test_roundtrip_property(td: str, ns: str, sa: str) -> None:
    sid = SpiffeId(td, ns, sa)
    assert SpiffeId.parse(str(sid)) == sid


@given(st.text(max_size=80))
def test_parse_arbitrary_text_only_raises_identity_error(text: str) -> None:
    try:
        sid = SpiffeId.parse(text)
    except IdentityError:
        return
    assert str(sid) == text
