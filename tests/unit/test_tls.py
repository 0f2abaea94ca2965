"""TLS helpers without a network: context parameters, SAN checks, error classification.

Real handshakes live in tests/integration/test_tls_handshake.py.  Here ``verify_peer`` is fed
DER certificates through a minimal object with the one method it uses.
"""

from __future__ import annotations

import asyncio
import ssl
import tempfile
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from ambient import tls
from ambient.ca import CertificateAuthority, generate_key
from ambient.identity import SpiffeId
from ambient.tls import PeerVerificationError, classify_handshake_error, verify_peer

TD = "cluster.local"
ALICE = SpiffeId(TD, "default", "alice")
BOB = SpiffeId(TD, "default", "bob")
NOW = datetime(2030, 6, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate(TD, now=NOW)


class Peer:
    """Stands in for ssl.SSLObject after a verified handshake: ``getpeercert`` in both forms.
    The dict form comes from CPython's own decoder (the one ``SSLObject.getpeercert`` uses)."""

    def __init__(self, der: bytes | None, *, verified: bool = True) -> None:
        self.der = der
        self.info: dict[str, Any] = {}
        if der and verified:
            with tempfile.NamedTemporaryFile("w", suffix=".pem") as f:
                f.write(ssl.DER_cert_to_PEM_cert(der))
                f.flush()
                self.info = ssl._ssl._test_decode_cert(f.name)  # type: ignore[attr-defined]

    def getpeercert(self, binary_form: bool = False) -> bytes | dict[str, Any] | None:
        return self.der if binary_form else self.info


def _der_with_uris(*uris: str, dns: bool = False) -> bytes:
    key = generate_key()
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    if dns:
        names.append(x509.DNSName("example.com"))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - timedelta(hours=1))
        .not_valid_after(NOW + timedelta(hours=1))
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _leaf_der(ca: CertificateAuthority, who: SpiffeId) -> bytes:
    return ca.issue(who, now=NOW).leaf().der


# -- contexts -------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["server", "client"])
def test_context_parameters(ca: CertificateAuthority, side: str) -> None:
    cert = ca.issue(ALICE)
    ctx = tls.server_context(cert) if side == "server" else tls.client_context(cert)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert not ctx.check_hostname
    assert ctx.options & ssl.OP_NO_TICKET
    assert ctx.options & ssl.OP_NO_COMPRESSION
    tls13 = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.3"]
    assert tls13 == ["TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"]
    assert ctx.get_ca_certs()  # the mesh roots are loaded
    if side == "server":
        assert ctx.num_tickets == 0


# -- verify_peer ----------------------------------------------------------------------------


def test_verify_peer_ok(ca: CertificateAuthority) -> None:
    peer = Peer(_leaf_der(ca, ALICE))
    assert verify_peer(peer, trust_domain=TD, now=NOW) == ALICE  # type: ignore[arg-type]
    assert verify_peer(peer, trust_domain=TD, expected={ALICE, BOB}, now=NOW) == ALICE  # type: ignore[arg-type]


def _refusal(peer: Peer, **kw: object) -> str:
    with pytest.raises(PeerVerificationError) as info:
        verify_peer(peer, **{"trust_domain": TD, "now": NOW, **kw})  # type: ignore[arg-type]
    assert info.value.message
    return info.value.reason


def test_verify_peer_refusals(ca: CertificateAuthority) -> None:
    alice = Peer(_leaf_der(ca, ALICE))
    assert _refusal(Peer(None)) == "no-certificate"
    assert _refusal(Peer(b"")) == "no-certificate"
    assert _refusal(Peer(_leaf_der(ca, ALICE), verified=False)) == "handshake"
    assert _refusal(alice, now=NOW + timedelta(days=2)) == "expired"
    assert _refusal(alice, now=NOW - timedelta(hours=1)) == "not-yet-valid"
    assert _refusal(alice, trust_domain="other.td") == "wrong-trust-domain"
    assert _refusal(alice, expected={BOB}) == "unexpected-san"
    assert _refusal(alice, expected=()) == "unexpected-san"
    assert _refusal(Peer(_der_with_uris())) == "no-spiffe-san"
    assert _refusal(Peer(_der_with_uris(dns=True))) == "no-spiffe-san"
    assert _refusal(Peer(_der_with_uris("https://example.com/"))) == "no-spiffe-san"
    assert _refusal(Peer(_der_with_uris("spiffe://cluster.local/foo"))) == "no-spiffe-san"
    two = Peer(_der_with_uris(str(ALICE), str(BOB)))
    assert _refusal(two) == "unexpected-san"


def test_verify_peer_ignores_other_uri_sans() -> None:
    peer = Peer(_der_with_uris("https://example.com/", str(ALICE), dns=True))
    assert verify_peer(peer, trust_domain=TD, now=NOW) == ALICE  # type: ignore[arg-type]


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=60))
def test_verify_peer_never_crashes_on_odd_uris(uri: str) -> None:
    try:
        der = _der_with_uris(uri)
    except ValueError:
        return  # not encodable as a URI SAN at all
    try:
        got = verify_peer(Peer(der), trust_domain=TD, now=NOW)  # type: ignore[arg-type]
    except PeerVerificationError as exc:
        assert exc.reason in tls.REASONS
    else:
        assert str(got) == uri


# -- classify_handshake_error -------------------------------------------------------------


def _verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, f"certificate verify failed: {message}")
    exc.verify_code = code
    exc.verify_message = message
    return exc


def _ssl_error(reason: str) -> ssl.SSLError:
    exc = ssl.SSLError(1, f"[SSL: {reason}] {reason.lower().replace('_', ' ')}")
    exc.reason = reason
    exc.library = "SSL"
    return exc


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (_verify_error(10, "certificate has expired"), "expired"),
        (_verify_error(9, "certificate is not yet valid"), "not-yet-valid"),
        (_verify_error(20, "unable to get local issuer certificate"), "foreign-ca"),
        (_verify_error(19, "self-signed certificate in certificate chain"), "foreign-ca"),
        (_verify_error(2, "unable to get issuer certificate"), "foreign-ca"),
        (_verify_error(18, "self-signed certificate"), "foreign-ca"),
        (_verify_error(26, "unsupported certificate purpose"), "handshake"),
        (_ssl_error("PEER_DID_NOT_RETURN_A_CERTIFICATE"), "no-certificate"),
        (_ssl_error("TLSV13_ALERT_CERTIFICATE_REQUIRED"), "no-certificate"),
        (_ssl_error("SSLV3_ALERT_CERTIFICATE_EXPIRED"), "expired"),
        (_ssl_error("TLSV1_ALERT_UNKNOWN_CA"), "foreign-ca"),
        (_ssl_error("WRONG_VERSION_NUMBER"), "handshake"),
        (_ssl_error("UNSUPPORTED_PROTOCOL"), "handshake"),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), "handshake"),
        (ConnectionResetError(104, "Connection reset by peer"), "handshake"),
        (asyncio.IncompleteReadError(b"", 2), "handshake"),
        (ssl.SSLCertVerificationError(1, "no code attached"), "handshake"),
    ],
)
def test_classify_handshake_error(exc: BaseException, expected: str) -> None:
    got = classify_handshake_error(exc)
    assert got.reason == expected
    assert got.message and expected in str(got)


def test_classify_passes_through_peer_errors() -> None:
    err = PeerVerificationError("unexpected-san", "x")
    assert classify_handshake_error(err) is err


def test_unknown_reason_rejected() -> None:
    with pytest.raises(ValueError, match="unknown peer verification reason"):
        PeerVerificationError("nope", "x")  # type: ignore[arg-type]
