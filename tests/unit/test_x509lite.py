"""ambient.x509lite against ``cryptography`` as the oracle: parsing, issuer checks, CSRs, leaks."""

from __future__ import annotations

import ctypes
import ipaddress
import random
import subprocess
import sys
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtensionOID, NameOID, SignatureAlgorithmOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ambient import x509lite
from ambient.ca import CertificateAuthority
from ambient.identity import SpiffeId
from ambient.x509lite import (
    CertificateParseError,
    CertInfo,
    issued_by,
    new_key_and_csr,
    parse_der,
    parse_pem,
)

NOW = datetime(2030, 1, 1, tzinfo=UTC)
ALICE = SpiffeId("cluster.local", "default", "alice")
REPO = Path(__file__).resolve().parents[2]

Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

_EC_KEY = ec.generate_private_key(ec.SECP256R1())
_RSA_KEY = rsa.generate_private_key(65537, 2048)


def _name(*attrs: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attrs])


def _cert(
    key: Key = _EC_KEY,
    *,
    subject: x509.Name | None = None,
    issuer: x509.Certificate | None = None,
    issuer_key: Key | None = None,
    serial: int = 1000,
    not_before: datetime = NOW - timedelta(days=1),
    not_after: datetime = NOW + timedelta(days=1),
    sans: list[x509.GeneralName] | None = None,
    ca: bool = False,
    key_ids: bool = True,
) -> x509.Certificate:
    """A certificate made independently of ambient (self-signed unless issuer is given)."""
    subject = subject if subject is not None else _name((NameOID.COMMON_NAME, "test"))
    signer = issuer_key or key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if key_ids:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
            critical=False)
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=True)
    return builder.sign(signer, hashes.SHA256())


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _assert_matches(info: CertInfo, cert: x509.Certificate) -> None:
    """Every CertInfo field equals what cryptography reads from the same certificate."""
    assert info.der == _der(cert)
    assert info.serial_number == cert.serial_number
    assert info.not_before == cert.not_valid_before_utc
    assert info.not_after == cert.not_valid_after_utc
    assert info.not_before.tzinfo is not None and info.not_before.utcoffset() == timedelta(0)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        uris = ()
    assert info.uri_sans == uris
    assert info.subject == cert.subject.rfc4514_string()


# -- parsing --------------------------------------------------------------------------------

URI1, URI2, URI3 = ("spiffe://cluster.local/ns/a/sa/one", "spiffe://cluster.local/ns/b/sa/two",
                    "https://example.test/x")
PARSE_CASES: dict[str, dict[str, Any]] = {
    "ec-no-san": {},
    "rsa-key": {"key": _RSA_KEY, "sans": [x509.UniformResourceIdentifier(URI1)]},
    "one-uri": {"sans": [x509.UniformResourceIdentifier(URI1)]},
    "two-uris": {"sans": [x509.UniformResourceIdentifier(URI2),
                          x509.UniformResourceIdentifier(URI1)]},
    "uris-mixed-with-dns-and-ip": {"sans": [
        x509.DNSName("a.example"), x509.UniformResourceIdentifier(URI3),
        x509.IPAddress(ipaddress.ip_address("10.0.0.1")), x509.UniformResourceIdentifier(URI1),
        x509.DNSName("b.example"), x509.UniformResourceIdentifier(URI2)]},
    "san-without-uri": {"sans": [x509.DNSName("only.dns.example")]},
    "serial-1": {"serial": 1},
    "serial-128-bit": {"serial": (1 << 127) | 0xDEADBEEF},
    "serial-159-bit": {"serial": (1 << 158) + 7},
    "serial-high-bit-byte": {"serial": 0x80},  # DER needs a leading zero byte
    "generalized-time-after-2050": {"not_after": datetime(2060, 6, 1, 12, 30, 45, tzinfo=UTC)},
    "utctime-last-second": {"not_after": datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC)},
    "generalized-first-second": {"not_after": datetime(2050, 1, 1, tzinfo=UTC)},
    "utctime-1950": {"not_before": datetime(1950, 1, 1, tzinfo=UTC)},
    "empty-subject": {"subject": x509.Name([])},
    "several-rdns": {"subject": _name(
        (NameOID.COUNTRY_NAME, "DE"), (NameOID.ORGANIZATION_NAME, "cluster.local"),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "mesh"), (NameOID.COMMON_NAME, "istiod"))},
    "organization-only": {"subject": _name((NameOID.ORGANIZATION_NAME, "cluster.local"))},
}


@pytest.mark.parametrize("case", sorted(PARSE_CASES))
def test_parse_matches_cryptography(case: str) -> None:
    cert = _cert(**PARSE_CASES[case])
    _assert_matches(parse_der(_der(cert)), cert)
    _assert_matches(parse_pem(_pem(cert)), cert)


def _tlv(data: bytes, pos: int = 0) -> tuple[int, bytes, int]:
    """(tag, content, end) of the DER element at ``pos`` (definite lengths only)."""
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first & 0x80:
        n = first & 0x7F
        length, pos = int.from_bytes(data[pos:pos + n], "big"), pos + n
    else:
        length = first
    return tag, data[pos:pos + length], pos + length


def _children(content: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(content):
        end = _tlv(content, pos)[2]
        out.append(content[pos:end])
        pos = end
    return out


def _encode(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = (n.bit_length() + 7) // 8
    return bytes([tag, 0x80 | size]) + n.to_bytes(size, "big") + content


def _with_not_before(der: bytes, time_tlv: bytes) -> bytes:
    """The certificate with its notBefore replaced (the signature is then invalid)."""
    tbs, *rest = _children(_tlv(der)[1])
    fields = _children(_tlv(tbs)[1])
    validity = _children(_tlv(fields[4])[1])  # [0] version, serial, sigalg, issuer, validity
    fields[4] = _encode(0x30, time_tlv + validity[1])
    return _encode(0x30, _encode(0x30, b"".join(fields)) + b"".join(rest))


def test_generalized_time_before_1950() -> None:
    # cryptography cannot build such a certificate but parses it: it is the oracle here.
    der = _with_not_before(_der(_cert()), _encode(0x18, b"19491231235959Z"))
    cert = x509.load_der_x509_certificate(der)
    assert cert.not_valid_before_utc == datetime(1949, 12, 31, 23, 59, 59, tzinfo=UTC)
    info = parse_der(der)
    assert info.not_before == cert.not_valid_before_utc
    assert info.not_after == cert.not_valid_after_utc


def test_v1_certificate_without_version_field() -> None:
    tbs, *rest = _children(_tlv(_der(_cert(serial=77)))[1])
    fields = _children(_tlv(tbs)[1])
    assert fields[0][0] == 0xA0 and fields[-1][0] == 0xA3
    v1 = _encode(0x30, _encode(0x30, b"".join(fields[1:-1])) + b"".join(rest))
    cert = x509.load_der_x509_certificate(v1)
    assert cert.version == x509.Version.v1
    _assert_matches(parse_der(v1), cert)


def test_subject_examples() -> None:
    org = _cert(subject=_name((NameOID.ORGANIZATION_NAME, "cluster.local")))
    assert parse_der(_der(org)).subject == "O=cluster.local"
    assert parse_der(_der(_cert(subject=x509.Name([])))).subject == ""


def test_parse_accepts_bytearray_and_keeps_der_as_bytes() -> None:
    der = _der(_cert())
    info = parse_der(bytearray(der))  # type: ignore[arg-type]
    assert type(info.der) is bytes and info.der == der


def test_negative_serial_is_read_with_its_sign() -> None:
    der = bytearray(_der(_cert(serial=0x7F)))
    at = der.index(bytes([0x02, 0x01, 0x7F]))  # the serial INTEGER in the TBS
    der[at + 2] = 0xFF  # -1 in two's complement; the signature no longer matters for parsing
    assert parse_der(bytes(der)).serial_number == -1


def test_pem_with_surrounding_text_and_crlf() -> None:
    cert = _cert(sans=[x509.UniformResourceIdentifier(URI1)])
    pem = b"subject=CN = test\r\n" + _pem(cert).replace(b"\n", b"\r\n") + b"trailer\n"
    _assert_matches(parse_pem(pem), cert)


def test_ca_issued_certificates() -> None:
    ca = CertificateAuthority.generate(now=NOW)
    wc = ca.issue(ALICE, now=NOW)
    leaf = x509.load_pem_x509_certificate(wc.chain_pem[0])
    root = x509.load_pem_x509_certificate(ca.roots_pem)
    leaf_info, root_info = parse_pem(wc.chain_pem[0]), parse_pem(ca.roots_pem)
    _assert_matches(leaf_info, leaf)
    _assert_matches(root_info, root)
    assert leaf_info.uri_sans == (str(ALICE),)
    assert leaf_info.serial_number == wc.serial_number
    assert (leaf_info.not_before, leaf_info.not_after) == (wc.not_before, wc.not_after)
    assert issued_by(leaf_info, root_info) and not issued_by(root_info, leaf_info)


# -- bad input ------------------------------------------------------------------------------

_GOOD_DER = _der(_cert(sans=[x509.UniformResourceIdentifier(URI1)]))
_CSR_DER = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
            .sign(_EC_KEY, hashes.SHA256()).public_bytes(serialization.Encoding.DER))

_NOT_DER = "not a DER X.509 certificate"
BAD_DER: dict[str, tuple[bytes, str]] = {
    "empty": (b"", "empty input"),
    "random": (random.Random(7).randbytes(300), _NOT_DER),
    "one-byte": (b"\x30", _NOT_DER),
    "truncated-half": (_GOOD_DER[: len(_GOOD_DER) // 2], _NOT_DER),
    "truncated-last-byte": (_GOOD_DER[:-1], _NOT_DER),
    "trailing-byte": (_GOOD_DER + b"\x00", "trailing bytes"),
    "two-certificates": (_GOOD_DER + _GOOD_DER, "trailing bytes"),
    "a-csr": (_CSR_DER, _NOT_DER),
    "empty-sequence": (b"\x30\x00", _NOT_DER),
    "long-form-short-length": (b"\x30\x81\x03" + _GOOD_DER[2:5], _NOT_DER),
}


@pytest.mark.parametrize("case", sorted(BAD_DER))
def test_bad_der_is_a_parse_error(case: str) -> None:
    data, message = BAD_DER[case]
    with pytest.raises(CertificateParseError, match=message):
        parse_der(data)


def test_every_truncation_is_a_parse_error() -> None:
    for n in range(len(_GOOD_DER)):
        with pytest.raises(CertificateParseError):
            parse_der(_GOOD_DER[:n])


_KEY_PEM = _EC_KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
_GOOD_PEM = _pem(_cert())
BAD_PEM: dict[str, tuple[bytes, str]] = {
    "empty": (b"", "found 0"),
    "a-key": (_KEY_PEM, "is this a key"),
    "a-csr": (new_key_and_csr(URI1)[1], "found 0"),
    "bundle": (_GOOD_PEM + _GOOD_PEM, "found 2"),
    "no-end-line": (_GOOD_PEM.split(b"-----END")[0], "no END line"),
    "bad-base64": (_GOOD_PEM.replace(b"\n", b"\n!", 2), "not valid base64"),
    "not-a-certificate-inside": (
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        _NOT_DER),
    "der-not-pem": (_GOOD_DER, "found 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_PEM))
def test_bad_pem_is_a_parse_error(case: str) -> None:
    data, message = BAD_PEM[case]
    with pytest.raises(CertificateParseError, match=message):
        parse_pem(data)


def test_malformed_san_extension_is_a_parse_error() -> None:
    garbage = x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x04\x01!")
    cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(x509.Name([]))
            .public_key(_EC_KEY.public_key()).serial_number(5)
            .not_valid_before(NOW).not_valid_after(NOW + timedelta(days=1))
            .add_extension(garbage, critical=False).sign(_EC_KEY, hashes.SHA256()))
    with pytest.raises(CertificateParseError, match="subjectAltName"):
        parse_der(_der(cert))


def _oracle(der: bytes) -> tuple[object, ...] | None:
    """The fields as cryptography reads them, or None if it refuses the certificate."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. negative serial numbers
            cert = x509.load_der_x509_certificate(der)
            try:
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                uris = tuple(san.value.get_values_for_type(x509.UniformResourceIdentifier))
            except x509.ExtensionNotFound:
                uris = ()
            return (cert.serial_number, cert.not_valid_before_utc, cert.not_valid_after_utc,
                    uris)
    except Exception:  # noqa: BLE001 - any refusal counts as "not a certificate"
        return None


def _openssl_parses(der: bytes) -> bool:
    lib = x509lite._libcrypto()
    try:
        lib.X509_free(x509lite._d2i(lib, der))
    except CertificateParseError:
        return False
    return True


_MUTATION_BASES = [_GOOD_DER, _der(_cert(**PARSE_CASES["uris-mixed-with-dns-and-ip"])),
                   _der(_cert(_RSA_KEY, serial=(1 << 127) | 5,
                              not_after=datetime(2060, 1, 1, tzinfo=UTC)))]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_MUTATION_BASES), st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                                            st.integers(0, 255)),
                                                  min_size=1, max_size=4))
def test_mutated_der_agrees_with_cryptography(base: bytes, edits: list[tuple[float, int]]) -> None:
    der = bytearray(base)
    for where, value in edits:
        der[int(where * len(der))] = value
    expected = _oracle(bytes(der))
    try:
        info = parse_der(bytes(der))
    except CertificateParseError as exc:
        # We refuse only what cryptography or OpenSSL's own d2i_X509 refuses, and URIs that
        # are not ASCII (IA5String; cryptography decodes them as UTF-8, a SPIFFE ID never is).
        assert expected is None or not _openssl_parses(bytes(der)) or "not ASCII" in str(exc)
        return
    assert info.der == bytes(der)
    if expected is not None:
        assert (info.serial_number, info.not_before, info.not_after, info.uri_sans) == expected
    # else: OpenSSL reads what cryptography refuses (it is laxer); so does the TLS stack.


def test_duplicate_extension_is_a_parse_error() -> None:
    der = _der(_cert(sans=[x509.UniformResourceIdentifier(URI1)]))
    tbs, *rest = _children(_tlv(der)[1])
    fields = _children(_tlv(tbs)[1])
    extensions = _children(_tlv(_tlv(fields[-1])[1])[1])
    doubled = _encode(0xA3, _encode(0x30, b"".join(extensions + extensions[-1:])))
    bad = _encode(0x30, _encode(0x30, b"".join(fields[:-1]) + doubled) + b"".join(rest))
    with pytest.raises(CertificateParseError, match="two subjectAltName extensions"):
        parse_der(bad)


# OpenSSL reads what RFC 5280 forbids but X.690 allows (no seconds, offsets, fractions), as
# the TLS stack does; those are not tested as refusals.
@pytest.mark.parametrize("time_tlv", [
    _encode(0x17, b"301301000000Z"),  # month 13
    _encode(0x04, b"300101000000Z"),  # not a time type
])
def test_bad_validity_time_is_a_parse_error(time_tlv: bytes) -> None:
    with pytest.raises(CertificateParseError, match=f"notBefore|{_NOT_DER}"):
        parse_der(_with_not_before(_der(_cert()), time_tlv))


def test_unsupported_version_is_a_parse_error() -> None:
    der = bytearray(_der(_cert()))
    at = der.index(bytes([0xA0, 0x03, 0x02, 0x01, 0x02]))
    der[at + 4] = 3
    with pytest.raises(CertificateParseError, match="version"):
        parse_der(bytes(der))


def test_non_ascii_uri_is_a_parse_error() -> None:
    der = _der(_cert(sans=[x509.UniformResourceIdentifier("spiffe://cluster.local/x")]))
    bad = der.replace(b"cluster.local/x", b"cluster.local/\xff")
    with pytest.raises(CertificateParseError, match="not ASCII"):
        parse_der(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_parse_or_raise_parse_error(data: bytes) -> None:
    try:
        parse_der(data)
    except CertificateParseError:
        pass
    try:
        parse_pem(b"-----BEGIN CERTIFICATE-----\n" + data + b"\n-----END CERTIFICATE-----\n")
    except CertificateParseError:
        pass


# -- issued_by ------------------------------------------------------------------------------

_ROOT_KEY = ec.generate_private_key(ec.SECP256R1())
_INT_KEY = ec.generate_private_key(ec.SECP256R1())
_LEAF_KEY = ec.generate_private_key(ec.SECP256R1())
_ROOT = _cert(_ROOT_KEY, subject=_name((NameOID.COMMON_NAME, "root")), ca=True)
_INT = _cert(_INT_KEY, subject=_name((NameOID.COMMON_NAME, "intermediate")), issuer=_ROOT,
             issuer_key=_ROOT_KEY, ca=True)
_LEAF = _cert(_LEAF_KEY, subject=x509.Name([]), issuer=_INT, issuer_key=_INT_KEY,
              sans=[x509.UniformResourceIdentifier(URI1)])


def test_issued_by_along_the_chain() -> None:
    root, inter, leaf = (parse_der(_der(c)) for c in (_ROOT, _INT, _LEAF))
    assert issued_by(leaf, inter)
    assert issued_by(inter, root)
    assert issued_by(root, root)  # self-signed root with itself
    assert issued_by(leaf, leaf)  # identical certificate
    assert not issued_by(leaf, root)  # skips a level
    assert not issued_by(inter, leaf)
    assert not issued_by(root, inter)


def test_issued_by_rejects_same_subject_with_another_key() -> None:
    impostor_key = ec.generate_private_key(ec.SECP256R1())
    leaf = parse_der(_der(_LEAF))
    # With key identifiers the AKI/SKI mismatch already fails; without them only the
    # signature check can tell.
    for key_ids in (True, False):
        impostor = _cert(impostor_key, subject=_INT.subject, issuer=_ROOT, issuer_key=_ROOT_KEY,
                         ca=True, key_ids=key_ids)
        assert not issued_by(leaf, parse_der(_der(impostor)))
    bare_leaf = _cert(_LEAF_KEY, subject=x509.Name([]), issuer=_INT, issuer_key=_INT_KEY,
                      key_ids=False)
    bare_impostor = _cert(impostor_key, subject=_INT.subject, issuer=_ROOT,
                          issuer_key=_ROOT_KEY, ca=True, key_ids=False)
    assert issued_by(parse_der(_der(bare_leaf)), parse_der(_der(_INT)))
    assert not issued_by(parse_der(_der(bare_leaf)), parse_der(_der(bare_impostor)))


def test_issued_by_rsa_root_signing_ec_leaf() -> None:
    root = _cert(_RSA_KEY, subject=_name((NameOID.COMMON_NAME, "rsa root")), ca=True)
    leaf = _cert(_LEAF_KEY, subject=x509.Name([]), issuer=root, issuer_key=_RSA_KEY)
    assert issued_by(parse_der(_der(leaf)), parse_der(_der(root)))


def test_issued_by_tampered_signature_is_false() -> None:
    der = bytearray(_der(_LEAF))
    der[-3] ^= 0x01  # inside the ECDSA signature's s value
    tampered = parse_der(bytes(der))
    assert not issued_by(tampered, parse_der(_der(_INT)))


def test_issued_by_never_raises_on_garbage_and_leaves_no_error_behind() -> None:
    garbage = CertInfo(b"\x30\x03\x02\x01\x01", 1, NOW, NOW, (), "")
    good = parse_der(_der(_INT))
    assert not issued_by(garbage, good) and not issued_by(good, garbage)
    assert not issued_by(parse_der(_der(_LEAF)), parse_der(_der(_ROOT)))
    lib = x509lite._libcrypto()
    assert lib.ERR_get_error() == 0  # the thread's OpenSSL error queue was drained


# -- new_key_and_csr ------------------------------------------------------------------------


def _csr_version(csr: x509.CertificateSigningRequest) -> int:
    tbs = csr.tbs_certrequest_bytes
    assert tbs[0] == 0x30
    header = 2 + (tbs[1] & 0x7F if tbs[1] & 0x80 else 0)
    assert tbs[header:header + 2] == b"\x02\x01"  # a one-byte INTEGER
    return tbs[header + 2]


def test_csr_is_what_ztunnel_sends() -> None:
    uri = str(ALICE)
    key_pem, csr_pem = new_key_and_csr(uri)
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert csr_pem.startswith(b"-----BEGIN CERTIFICATE REQUEST-----\n")
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid
    assert csr.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA256
    assert csr.subject == x509.Name([])
    assert _csr_version(csr) == 0
    assert len(csr.extensions) == 1
    ext = csr.extensions[0]
    assert ext.oid == ExtensionOID.SUBJECT_ALTERNATIVE_NAME and ext.critical
    assert isinstance(ext.value, x509.SubjectAlternativeName)
    assert list(ext.value) == [x509.UniformResourceIdentifier(uri)]
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    assert (key.public_key().public_bytes(serialization.Encoding.DER, raw)
            == csr.public_key().public_bytes(serialization.Encoding.DER, raw))


def test_csr_is_signed_by_the_ca() -> None:
    ca = CertificateAuthority.generate(now=NOW)
    key_pem, csr_pem = new_key_and_csr(str(ALICE))
    chain = ca.sign_csr(csr_pem, ALICE, now=NOW)
    leaf = parse_pem(chain[0].encode())
    assert leaf.uri_sans == (str(ALICE),)
    assert issued_by(leaf, parse_pem(chain[-1].encode()))
    key = serialization.load_pem_private_key(key_pem, None)
    cert = x509.load_pem_x509_certificate(chain[0].encode())
    assert cert.public_key() == key.public_key()


def test_two_calls_give_different_keys() -> None:
    (k1, c1), (k2, c2) = new_key_and_csr(URI1), new_key_and_csr(URI1)
    assert k1 != k2 and c1 != c2
    pub = [x509.load_pem_x509_csr(c).public_key() for c in (c1, c2)]
    assert pub[0] != pub[1]


@pytest.mark.parametrize("uri", [
    "spiffe://cluster.local/ns/a/sa/b,URI:spiffe://cluster.local/ns/kube-system/sa/admin",
    "spiffe://cluster.local/ns/a/sa/b\n", "spiffe://x/\x00", "spiffe://cluster.local/é", "",
    "spiffe://x/\t",
])
def test_csr_rejects_unsafe_uris(uri: str) -> None:
    with pytest.raises(ValueError, match="URI SAN"):
        new_key_and_csr(uri)


# -- resources ------------------------------------------------------------------------------


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _heap_in_use() -> int:
    """Bytes malloc'd and not freed in the main arena (glibc), or 0 where unavailable."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except AttributeError:
        return 0
    fn.restype, fn.argtypes = _Mallinfo2, []
    info = fn()
    return int(info.uordblks + info.hblkhd)


def _churn_parse(n: int, ders: list[bytes], parent: CertInfo) -> None:
    for i in range(n):
        info = parse_der(ders[i % len(ders)])
        if i % 10 == 0:
            issued_by(info, parent)
    for i in range(n // 20):
        with pytest.raises(CertificateParseError):
            parse_der(ders[0][: 50 + i % 200])


def test_parse_does_not_leak() -> None:
    ders = [_der(_LEAF), _der(_INT), _der(_cert(_RSA_KEY, sans=[
        x509.UniformResourceIdentifier(URI1), x509.UniformResourceIdentifier(URI2)]))]
    parent = parse_der(_der(_INT))
    _churn_parse(2000, ders, parent)  # warm-up: caches, arenas, interned objects
    rss, heap = _rss_bytes(), _heap_in_use()
    _churn_parse(20_000, ders, parent)
    rss_growth, heap_growth = _rss_bytes() - rss, _heap_in_use() - heap
    # A missing X509_free fails this by far (checked); the subject BIO and GENERAL_NAMES are
    # smaller but over the heap bound; without a leak the heap moves by < 0.1 MB.
    assert rss_growth < 4 << 20, f"RSS grew by {rss_growth} bytes"
    if heap:
        assert heap_growth < 1 << 20, f"malloc'd bytes in use grew by {heap_growth}"


def test_csr_does_not_leak() -> None:
    for _ in range(30):
        new_key_and_csr(URI1)
    rss, heap = _rss_bytes(), _heap_in_use()
    for _ in range(600):
        new_key_and_csr(URI1)
    rss_growth, heap_growth = _rss_bytes() - rss, _heap_in_use() - heap
    # Measured if a free were missing: EVP_PKEY ~1.4 MB, EVP_PKEY_CTX ~1.1 MB, the extension
    # stack ~140 kB; without a leak the heap moves by < 30 kB.
    assert rss_growth < 4 << 20, f"RSS grew by {rss_growth} bytes"
    if heap:
        assert heap_growth < 64 << 10, f"malloc'd bytes in use grew by {heap_growth}"


def test_import_does_not_pull_in_cryptography() -> None:
    code = (
        "import sys, ambient.x509lite as m\n"
        "key, csr = m.new_key_and_csr('spiffe://cluster.local/ns/a/sa/b')\n"
        "info = m.parse_pem(sys.stdin.buffer.read())\n"
        "assert info.uri_sans == ('spiffe://cluster.local/ns/a/sa/one',), info\n"
        "assert 'cryptography' not in sys.modules, sorted(sys.modules)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], input=_pem(_LEAF), capture_output=True,
                         cwd=REPO, timeout=60, check=False)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.strip() == b"ok"
