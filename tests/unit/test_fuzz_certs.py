"""Structured property tests for identities, CSRs and certificate chains.

CSRs are real (signed by a fresh key) with generated SANs, so the decision under test is the
CA's, not the signature check: ``validate_csr`` accepts exactly one URI SAN that is a SPIFFE
workload id in our trust domain, and whatever it accepts the CA signs into a chain that
verifies.  Byte-level damage to valid DER is covered too.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fuzz.hypo import fuzz_settings
from fuzz.targets_cp import cert_chain, csr
from hypothesis import given
from hypothesis import strategies as st

from ambient.ca import CertificateAuthority, workload_certificate_from_chain
from ambient.certs import verify_chain
from ambient.identity import IdentityError, SpiffeId
from controlplane.ca_service import Denied, validate_csr

TD = "cluster.local"
KEY = ec.generate_private_key(ec.SECP256R1())
label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
subdomain = st.lists(label, min_size=1, max_size=3).map(".".join)
trust_domains = st.from_regex(r"[a-z0-9._-]{1,20}", fullmatch=True)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate(TD)


@fuzz_settings(400)
@given(trust_domains, label, subdomain)
def test_spiffe_round_trip(td: str, ns: str, sa: str) -> None:
    ident = SpiffeId(td, ns, sa)
    assert SpiffeId.parse(str(ident)) == ident


@fuzz_settings(400)
@given(st.one_of(st.text(max_size=80), st.builds(lambda a, b: f"spiffe://{a}/ns/{b}/sa/x",
                                                   st.text(max_size=10), st.text(max_size=10))))
def test_spiffe_text_only_raises_identity_error(uri: str) -> None:
    try:
        ident = SpiffeId.parse(uri)
    except IdentityError:
        return
    assert str(ident) == uri


uris = st.one_of(
    st.builds(lambda td, ns, sa: f"spiffe://{td}/ns/{ns}/sa/{sa}",
              st.sampled_from([TD, TD, "other.td", "Cluster.local"]), label, subdomain),
    st.sampled_from(["spiffe://cluster.local/ns/a", "https://x/ns/a/sa/b", "spiffe://"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30))
sans = st.lists(st.one_of(uris.map(x509.UniformResourceIdentifier),
                          label.map(x509.DNSName)), max_size=3)


def _csr_pem(names: list[x509.GeneralName]) -> bytes:
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return b.sign(KEY, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@fuzz_settings(150)
@given(sans)
def test_csr_decision_and_what_is_signed_verifies(ca: CertificateAuthority,
                                                  names: list[x509.GeneralName]) -> None:
    pem = _csr_pem(names)
    uris_ = [n.value for n in names if isinstance(n, x509.UniformResourceIdentifier)]
    try:
        want = SpiffeId.parse(uris_[0]) if len(names) == 1 == len(uris_) else None
    except IdentityError:
        want = None
    if want is not None and want.trust_domain != TD:
        want = None
    try:
        got = validate_csr(pem, TD)
    except Denied:
        assert want is None
        return
    assert got == want
    chain = ca.sign_csr(pem, got, timedelta(minutes=30))
    verify_chain(workload_certificate_from_chain(got, b"", chain))


def _edits(der: bytes, edits: list[tuple[int, int]]) -> bytes:
    buf = bytearray(der)
    for at, val in edits:
        buf[at % len(buf)] = val
    return bytes(buf)


@fuzz_settings(300)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4))
def test_damaged_csr_der(edits: list[tuple[int, int]]) -> None:
    der = x509.load_pem_x509_csr(_csr_pem([x509.UniformResourceIdentifier(
        "spiffe://cluster.local/ns/a/sa/b")])).public_bytes(serialization.Encoding.DER)
    csr(b"\x01" + _edits(der, edits))  # the harness: Denied / CaError only


@fuzz_settings(300)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
       st.booleans())
def test_damaged_chain_der(ca: CertificateAuthority, edits: list[tuple[int, int]],
                           damage_root: bool) -> None:
    ident = SpiffeId(TD, "default", "web")
    chain = ca.sign_csr(_csr_pem([x509.UniformResourceIdentifier(str(ident))]), ident)
    leaf, root = (x509.load_pem_x509_certificate(c.encode()).public_bytes(
        serialization.Encoding.DER) for c in (chain[0], chain[-1]))
    if damage_root:
        root = _edits(root, edits)
    else:
        leaf = _edits(leaf, edits)
    # the harness: mode 0xff wraps every element as PEM; CaError / CertificateError only
    cert_chain(b"\xff\x01" + len(leaf).to_bytes(2, "big") + leaf + root)
