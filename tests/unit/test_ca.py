"""The mesh CA: self-generated and operator-provided roots/intermediates, CSR checks, leaves."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from ambient.ca import (
    DEFAULT_TTL,
    CaError,
    CertificateAuthority,
    generate_key,
    make_csr,
    split_pem,
    workload_certificate_from_chain,
)
from ambient.identity import SpiffeId

ALICE = SpiffeId("cluster.local", "default", "alice")
NOW = datetime(2030, 1, 1, tzinfo=UTC)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _ca_cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    issuer_cert: x509.Certificate | None = None,
    issuer_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
    *,
    ca: bool = True,
    not_before: datetime = NOW - timedelta(days=1),
    not_after: datetime = NOW + timedelta(days=365),
) -> x509.Certificate:
    """An operator-style CA certificate made independently of ambient.ca."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if ca:
        usage = x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False,
        )
        builder = builder.add_extension(usage, critical=True)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _verify(chain: list[str], roots_pem: bytes, identity: SpiffeId, when: datetime) -> None:
    """Verify a leaf-first chain to the roots with cryptography's RFC 5280 path builder."""
    certs = [c for element in chain[:-1] for c in x509.load_pem_x509_certificates(
        element.encode())]
    store = Store(x509.load_pem_x509_certificates(roots_pem))
    verifier = PolicyBuilder().store(store).time(when).build_client_verifier()
    verified = verifier.verify(certs[0], certs[1:])
    assert verified.subjects == [x509.UniformResourceIdentifier(str(identity))]


# -- self-generated root --------------------------------------------------------------------


def test_generated_root_signs_verifiable_leaf() -> None:
    ca = CertificateAuthority.generate(now=NOW)
    key = generate_key()
    chain = ca.sign_csr(make_csr(ALICE, key), ALICE, now=NOW)
    assert len(chain) == 2  # leaf, root
    assert chain[-1].encode() == ca.roots_pem
    _verify(chain, ca.roots_pem, ALICE, NOW)
    root = x509.load_pem_x509_certificate(ca.roots_pem)
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert root.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_leaf_shape() -> None:
    ca = CertificateAuthority.generate(now=NOW)
    wc = ca.issue(ALICE, now=NOW)
    leaf = x509.load_der_x509_certificate(wc.leaf().der)
    assert leaf.subject == x509.Name([])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(str(ALICE))]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert wc.serial_number == leaf.serial_number
    assert wc.to_pem_chain() == wc.chain_pem[0]
    key = serialization.load_pem_private_key(wc.key_pem, None)
    assert key.public_key() == leaf.public_key()


def test_default_ttl_is_24h_and_backdated() -> None:
    ca = CertificateAuthority.generate(now=NOW)
    wc = ca.issue(ALICE, now=NOW)
    assert DEFAULT_TTL == timedelta(hours=24)
    assert wc.not_after == NOW + timedelta(hours=24)
    assert wc.not_before == NOW - timedelta(minutes=1)
    assert wc.not_after.tzinfo is not None
    assert wc.refresh_at() == wc.not_before + (wc.not_after - wc.not_before) / 2


def test_ttl_capped_by_ca_expiry() -> None:
    ca = CertificateAuthority.generate(validity=timedelta(hours=2), now=NOW)
    wc = ca.issue(ALICE, timedelta(days=30), now=NOW)
    root = x509.load_pem_x509_certificate(ca.roots_pem)
    assert wc.not_after == root.not_valid_after_utc


def test_nonpositive_ttl_refused() -> None:
    ca = CertificateAuthority.generate(now=NOW)
    with pytest.raises(CaError, match="not positive"):
        ca.issue(ALICE, timedelta(0), now=NOW)


def test_csr_has_uri_san() -> None:
    csr = x509.load_pem_x509_csr(make_csr(ALICE, generate_key()))
    assert csr.is_signature_valid
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(ALICE)]


# -- CSR refusals ---------------------------------------------------------------------------


def test_wrong_trust_domain_refused() -> None:
    ca = CertificateAuthority.generate(now=NOW)
    other = SpiffeId("other.domain", "default", "alice")
    with pytest.raises(CaError, match="trust domain 'cluster.local'"):
        ca.sign_csr(make_csr(other, generate_key()), other, now=NOW)


def test_bad_csr_signature_refused() -> None:
    der = bytearray(
        x509.load_pem_x509_csr(make_csr(ALICE, generate_key())).public_bytes(
            serialization.Encoding.DER
        )
    )
    der[-5] ^= 0x01  # inside the ECDSA signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    ca = CertificateAuthority.generate(now=NOW)
    with pytest.raises(CaError, match="invalid signature"):
        ca.sign_csr(tampered, ALICE, now=NOW)


def test_garbage_csr_refused() -> None:
    ca = CertificateAuthority.generate(now=NOW)
    with pytest.raises(CaError, match="not a valid PEM"):
        ca.sign_csr(b"hello", ALICE, now=NOW)


def test_key_types() -> None:
    ca = CertificateAuthority.generate(now=NOW)
    with pytest.raises(CaError, match="only P-256"):
        ca.sign_csr(make_csr(ALICE, ec.generate_private_key(ec.SECP384R1())), ALICE, now=NOW)
    weak = rsa.generate_private_key(65537, 1024)
    with pytest.raises(CaError, match="at least 2048"):
        ca.sign_csr(make_csr(ALICE, weak), ALICE, now=NOW)  # type: ignore[arg-type]
    ok = rsa.generate_private_key(65537, 2048)
    chain = ca.sign_csr(make_csr(ALICE, ok), ALICE, now=NOW)  # type: ignore[arg-type]
    _verify(chain, ca.roots_pem, ALICE, NOW)


# -- operator-provided root and intermediate ---------------------------------------------


def test_operator_root_rsa_like_istio_default() -> None:
    key = rsa.generate_private_key(65537, 2048)
    root = _ca_cert("operator root", key)
    ca = CertificateAuthority.from_pem(_pem(root), _key_pem(key), now=NOW)
    assert ca.roots_pem == _pem(root)
    wc = ca.issue(ALICE, now=NOW)
    _verify([c.decode() for c in wc.chain_pem] + [wc.roots_pem.decode()], ca.roots_pem, ALICE,
            NOW)


def _intermediate_setup() -> tuple[x509.Certificate, x509.Certificate, ec.EllipticCurvePrivateKey]:
    root_key = generate_key()
    root = _ca_cert("root", root_key)
    int_key = generate_key()
    inter = _ca_cert("intermediate", int_key, root, root_key)
    return root, inter, int_key


def test_operator_intermediate_chain_verifies_to_root() -> None:
    root, inter, int_key = _intermediate_setup()
    # Istio's cacerts: cert-chain.pem = ca-cert.pem + root.
    ca = CertificateAuthority.from_pem(
        _pem(inter), _key_pem(int_key), _pem(inter) + _pem(root), _pem(root), now=NOW
    )
    chain = ca.sign_csr(make_csr(ALICE, generate_key()), ALICE, now=NOW)
    assert [x509.load_pem_x509_certificate(c.encode()).subject for c in chain[1:]] == [
        inter.subject, root.subject,
    ]
    assert chain[-1].encode() == _pem(root)  # root last
    _verify(chain, _pem(root), ALICE, NOW)
    wc = workload_certificate_from_chain(ALICE, b"k", chain)
    assert len(wc.chain_pem) == 2 and wc.roots_pem == _pem(root)
    assert wc.to_pem_chain() == chain[0].encode() + _pem(inter)


def test_two_level_intermediate_and_root_found_in_chain() -> None:
    root, inter, int_key = _intermediate_setup()
    sub_key = generate_key()
    sub = _ca_cert("sub", sub_key, inter, int_key)
    ca = CertificateAuthority.from_pem(
        _pem(sub), _key_pem(sub_key), _pem(inter) + _pem(root), None, now=NOW
    )
    chain = ca.sign_csr(make_csr(ALICE, generate_key()), ALICE, now=NOW)
    assert len(chain) == 4
    _verify(chain, _pem(root), ALICE, NOW)


def test_chain_verification_rejects_foreign_root() -> None:
    root, inter, int_key = _intermediate_setup()
    ca = CertificateAuthority.from_pem(
        _pem(inter), _key_pem(int_key), _pem(inter), _pem(root), now=NOW
    )
    chain = ca.sign_csr(make_csr(ALICE, generate_key()), ALICE, now=NOW)
    other = CertificateAuthority.generate(now=NOW)
    with pytest.raises(VerificationError):
        _verify(chain, other.roots_pem, ALICE, NOW)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("key-mismatch", "does not match"),
        ("not-a-ca", "not a CA"),
        ("expired", "expired"),
        ("no-root", "no root was given"),
        ("wrong-root", "does not lead to any certificate"),
        ("bad-pem", "not a valid PEM"),
        ("bad-key", "cannot load the private key"),
    ],
)
def test_from_pem_refusals(case: str, message: str) -> None:
    root, inter, int_key = _intermediate_setup()
    other_root = CertificateAuthority.generate(now=NOW).roots_pem
    key = generate_key()
    args: tuple[bytes, bytes, bytes, bytes | None]
    if case == "key-mismatch":
        args = (_pem(inter), _key_pem(generate_key()), b"", _pem(root))
    elif case == "not-a-ca":
        args = (_pem(_ca_cert("leaf", key, ca=False)), _key_pem(key), b"", None)
    elif case == "expired":
        old = _ca_cert("old", key, not_before=NOW - timedelta(days=20),
                       not_after=NOW - timedelta(days=10))
        args = (_pem(old), _key_pem(key), b"", None)
    elif case == "no-root":
        args = (_pem(inter), _key_pem(int_key), b"", None)
    elif case == "wrong-root":
        args = (_pem(inter), _key_pem(int_key), b"", other_root)
    elif case == "bad-pem":
        args = (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                _key_pem(key), b"", None)
    else:
        args = (_pem(inter), b"not a key", b"", _pem(root))
    with pytest.raises(CaError, match=message):
        CertificateAuthority.from_pem(*args, now=NOW)


def test_save_and_load_dir(tmp_path: Path) -> None:
    root, inter, int_key = _intermediate_setup()
    ca = CertificateAuthority.from_pem(
        _pem(inter), _key_pem(int_key), _pem(inter) + _pem(root), _pem(root), now=NOW
    )
    d = tmp_path / "cacerts"
    ca.save_dir(d)
    assert sorted(p.name for p in d.iterdir()) == [
        "ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem",
    ]
    assert stat.S_IMODE((d / "ca-key.pem").stat().st_mode) == 0o600
    assert split_pem((d / "cert-chain.pem").read_bytes()) == [_pem(inter), _pem(root)]
    assert (d / "root-cert.pem").read_bytes() == _pem(root)
    # load_dir validates against the real clock: regenerate validity around now.
    fresh = CertificateAuthority.generate()
    fresh.save_dir(d)
    loaded = CertificateAuthority.load_dir(d)
    assert loaded.roots_pem == fresh.roots_pem
    assert loaded.cert_pem == fresh.cert_pem
    wc = loaded.issue(ALICE)
    assert wc.roots_pem == fresh.roots_pem


def test_load_dir_missing_files(tmp_path: Path) -> None:
    with pytest.raises(CaError, match="ca-cert.pem"):
        CertificateAuthority.load_dir(tmp_path)


# -- chain from an IstioCertificateResponse -------------------------------------------------


def test_workload_certificate_from_chain_variants() -> None:
    root, inter, int_key = _intermediate_setup()
    ca = CertificateAuthority.from_pem(
        _pem(inter), _key_pem(int_key), _pem(inter), _pem(root), now=NOW
    )
    leaf, inter_s, root_s = ca.sign_csr(make_csr(ALICE, generate_key()), ALICE, now=NOW)
    # istiod may send the intermediates (and even the root) as one string
    wc = workload_certificate_from_chain(ALICE, b"k", [leaf, inter_s + root_s, root_s])
    assert wc.chain_pem == [leaf.encode(), inter_s.encode()]
    assert wc.roots_pem == root_s.encode()
    with pytest.raises(CaError, match="leaf first and the root last"):
        workload_certificate_from_chain(ALICE, b"k", [leaf])
    bob = SpiffeId("cluster.local", "default", "bob")
    with pytest.raises(CaError, match="but spiffe://cluster.local/ns/default/sa/bob"):
        workload_certificate_from_chain(bob, b"k", [leaf, root_s])


def test_invalid_ca_trust_domain() -> None:
    with pytest.raises(CaError, match="trust domain"):
        CertificateAuthority.generate("Not Valid")
