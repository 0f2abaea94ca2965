"""The mesh certificate authority: signs SPIFFE X.509 workload certificates (SVIDs).

Used by the control plane's IstioCertificateService (``sign_csr`` returns Istio's
``IstioCertificateResponse.cert_chain``: leaf first, root last) and, in local/FAKE_CA mode, by
a node proxy directly (``issue``).  The signing certificate is either a self-generated
ECDSA P-256 root or an operator-provided root or intermediate in Istio's ``cacerts`` layout
(``ca-cert.pem``, ``ca-key.pem``, ``cert-chain.pem``, ``root-cert.pem``).

Invariants: every leaf carries exactly one URI SAN (the SPIFFE ID), is not a CA, serves both as
client and server certificate, and never outlives any certificate above it in the chain.
The identity to put in a leaf is decided by the caller (after authenticating the requester);
the CSR only contributes its public key, like istiod.

The proxies' side (``WorkloadCertificate``, reading a CA's answer) is ``ambient.workloadcert``,
which needs no ``cryptography``; its names are re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .identity import DEFAULT_TRUST_DOMAIN, IdentityError, SpiffeId
from .workloadcert import (
    DEFAULT_TTL,
    CaError,
    WorkloadCertificate,
    split_pem,
    workload_certificate_from_chain,
)

__all__ = [
    "DEFAULT_TTL",
    "CaError",
    "CertificateAuthority",
    "WorkloadCertificate",
    "generate_key",
    "make_csr",
    "split_pem",
    "workload_certificate_from_chain",
]

DEFAULT_CA_VALIDITY = timedelta(days=3650)
_BACKDATE = timedelta(minutes=1)  # tolerate small clock skew between nodes
_MIN_RSA_BITS = 2048

CA_CERT_FILE = "ca-cert.pem"
CA_KEY_FILE = "ca-key.pem"
CERT_CHAIN_FILE = "cert-chain.pem"
ROOT_CERT_FILE = "root-cert.pem"

def _utcnow() -> datetime:
    return datetime.now(UTC)


def _load_certs(data: bytes | str, what: str) -> list[x509.Certificate]:
    try:
        return [x509.load_pem_x509_certificate(block) for block in split_pem(data)]
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is no ValueError
        raise CaError(f"{what}: not a valid PEM certificate ({exc})") from exc


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key (the only key type Istio workloads use)."""
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_csr(identity: SpiffeId, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A PEM CSR whose only SAN is the identity's URI (empty subject, like ztunnel's)."""
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))])
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(san, critical=True)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


class CertificateAuthority:
    """Signs workload certificates with a root or intermediate CA key."""

    def __init__(
        self,
        cert: x509.Certificate,
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
        *,
        intermediates: Sequence[x509.Certificate] = (),
        roots: Sequence[x509.Certificate] = (),
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        now: datetime | None = None,
    ) -> None:
        """Prefer ``generate``/``from_pem``/``load_dir``; this validates what it is given."""
        try:
            SpiffeId(trust_domain, "default", "default")
        except IdentityError as exc:
            raise CaError(f"invalid trust domain for the CA: {exc}") from exc
        self.trust_domain = trust_domain
        self._cert = cert
        self._key = key
        self._intermediates = list(intermediates)  # above `cert`, below the root
        self._roots = list(roots) or [cert]
        _validate_ca(cert, key, self._intermediates, self._roots, now or _utcnow())

    # -- construction -------------------------------------------------------------------

    @classmethod
    def generate(
        cls,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        *,
        validity: timedelta = DEFAULT_CA_VALIDITY,
        organization: str = "ambient",
        now: datetime | None = None,
    ) -> CertificateAuthority:
        """A fresh self-signed ECDSA P-256 root (what istiod does without plugged-in certs)."""
        now = now or _utcnow()
        key = generate_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{organization} root CA {trust_domain}"),
            ]
        )
        cert = (
            _ca_builder(name, name, key.public_key(), now - timedelta(hours=1), now + validity)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key, trust_domain=trust_domain, now=now)

    @classmethod
    def from_pem(
        cls,
        cert_pem: bytes,
        key_pem: bytes,
        chain_pem: bytes = b"",
        root_pem: bytes | None = None,
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        now: datetime | None = None,
    ) -> CertificateAuthority:
        """An operator-provided root, or an intermediate with its chain and root."""
        certs = _load_certs(cert_pem, CA_CERT_FILE)
        if len(certs) != 1:
            raise CaError(f"{CA_CERT_FILE} must hold exactly one certificate, found {len(certs)}")
        cert = certs[0]
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise CaError(f"{CA_KEY_FILE}: cannot load the private key ({exc}); it must be an "
                          "unencrypted PEM EC or RSA key") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise CaError(f"{CA_KEY_FILE}: unsupported key type {type(key).__name__}; "
                          "use ECDSA P-256 or RSA")
        chain = _load_certs(chain_pem, CERT_CHAIN_FILE) if chain_pem else []
        if root_pem is not None:
            roots = _load_certs(root_pem, ROOT_CERT_FILE)
            if not roots:
                raise CaError(f"{ROOT_CERT_FILE} holds no certificate")
        elif _self_signed(cert):
            roots = [cert]
        elif chain and _self_signed(chain[-1]):
            roots = [chain[-1]]
        else:
            raise CaError(
                f"{CA_CERT_FILE} is an intermediate but no root was given; provide "
                f"{ROOT_CERT_FILE} (and {CERT_CHAIN_FILE} up to it)"
            )
        # cert-chain.pem in cacerts usually repeats ca-cert.pem first and the root last.
        intermediates = [c for c in chain if c != cert and c not in roots]
        return cls(cert, key, intermediates=intermediates, roots=roots,
                   trust_domain=trust_domain, now=now)

    @classmethod
    def load_dir(
        cls, path: str | os.PathLike[str], *, trust_domain: str = DEFAULT_TRUST_DOMAIN
    ) -> CertificateAuthority:
        """Load Istio's ``cacerts`` layout from a directory."""
        d = Path(path)
        try:
            cert_pem = (d / CA_CERT_FILE).read_bytes()
            key_pem = (d / CA_KEY_FILE).read_bytes()
        except OSError as exc:
            raise CaError(f"cannot read the CA from {d}: {exc} (expected {CA_CERT_FILE} and "
                          f"{CA_KEY_FILE}, optionally {CERT_CHAIN_FILE} and {ROOT_CERT_FILE})"
                          ) from exc
        chain = d / CERT_CHAIN_FILE
        root = d / ROOT_CERT_FILE
        return cls.from_pem(
            cert_pem,
            key_pem,
            chain.read_bytes() if chain.exists() else b"",
            root.read_bytes() if root.exists() else None,
            trust_domain=trust_domain,
        )

    def save_dir(self, path: str | os.PathLike[str]) -> None:
        """Write Istio's ``cacerts`` layout; the key file is created with mode 0600."""
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        key_path = d / CA_KEY_FILE
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # the file may have existed with wider permissions
            f.write(_key_pem(self._key))
        (d / CA_CERT_FILE).write_bytes(_pem(self._cert))
        chain = [self._cert, *self._intermediates, *self._roots[:1]]
        (d / CERT_CHAIN_FILE).write_bytes(b"".join(_pem(c) for c in chain))
        (d / ROOT_CERT_FILE).write_bytes(self.roots_pem)

    # -- accessors ----------------------------------------------------------------------

    @property
    def roots_pem(self) -> bytes:
        """The root certificate(s) workloads must trust."""
        return b"".join(_pem(c) for c in self._roots)

    @property
    def cert_pem(self) -> bytes:
        """The signing certificate."""
        return _pem(self._cert)

    @property
    def not_after(self) -> datetime:
        """The latest expiry a leaf can have (the earliest expiry in the CA's own chain)."""
        return min(c.not_valid_after_utc for c in (self._cert, *self._intermediates))

    # -- signing ------------------------------------------------------------------------

    def sign_csr(
        self,
        csr_pem: bytes,
        identity: SpiffeId,
        ttl: timedelta = DEFAULT_TTL,
        *,
        now: datetime | None = None,
        dns_names: Sequence[str] = (),
    ) -> list[str]:
        """Sign a CSR for ``identity``; return the chain as PEM strings, leaf first, root last.

        The last element holds all trusted roots (istiod does the same).  The caller must have
        checked that the requester may obtain ``identity``.  ``dns_names`` adds DNS SANs (for
        serving certificates such as the control plane's; workload certificates have none).
        """
        now = now or _utcnow()
        if identity.trust_domain != self.trust_domain:
            raise CaError(
                f"refusing to sign for {identity}: this CA serves trust domain "
                f"{self.trust_domain!r} (check TRUST_DOMAIN on the requesting proxy)"
            )
        if ttl <= timedelta(0):
            raise CaError(f"refusing to sign for {identity}: requested TTL {ttl} is not positive")
        public_key = _check_csr(csr_pem, identity)
        not_after = min(now + ttl, self.not_after)
        if not_after <= now:
            raise CaError(f"the CA certificate expired at {self.not_after.isoformat()}; "
                          "rotate the CA (cacerts) before workloads lose their certificates")
        leaf = self._leaf_builder(identity, public_key, now - _BACKDATE, not_after,
                                  dns_names).sign(self._key, hashes.SHA256())
        chain = [_pem(leaf).decode()]
        if self._cert not in self._roots:
            chain.append(_pem(self._cert).decode())
        chain += [_pem(c).decode() for c in self._intermediates]
        chain.append(self.roots_pem.decode())
        return chain

    def issue(
        self, identity: SpiffeId, ttl: timedelta = DEFAULT_TTL, *, now: datetime | None = None,
        dns_names: Sequence[str] = (),
    ) -> WorkloadCertificate:
        """Generate a key, a CSR and sign it locally (FAKE_CA / local mode, tests)."""
        key = generate_key()
        chain = self.sign_csr(make_csr(identity, key), identity, ttl, now=now,
                              dns_names=dns_names)
        return workload_certificate_from_chain(identity, _key_pem(key), chain)

    def _leaf_builder(
        self,
        identity: SpiffeId,
        public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
        not_before: datetime,
        not_after: datetime,
        dns_names: Sequence[str] = (),
    ) -> x509.CertificateBuilder:
        usage = x509.KeyUsage(
            digital_signature=True, key_encipherment=True, content_commitment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False,
        )
        eku = x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        )
        # Empty subject, so the SAN must be critical (RFC 5280 4.2.1.6), as in Istio's leaves.
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]
                                          + [x509.DNSName(n) for n in dns_names])
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(usage, critical=True)
            .add_extension(eku, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_aki(self._cert), critical=False)
            .add_extension(san, critical=True)
        )


def _ca_builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    not_before: datetime,
    not_after: datetime,
) -> x509.CertificateBuilder:
    usage = x509.KeyUsage(
        digital_signature=True, key_encipherment=False, content_commitment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
        encipher_only=False, decipher_only=False,
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(usage, critical=True)
    )


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]


def _check_csr(
    csr_pem: bytes, identity: SpiffeId
) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except (ValueError, x509.InvalidVersion) as exc:
        raise CaError(f"CSR for {identity} is not a valid PEM certificate request ({exc})") from exc
    try:
        valid = csr.is_signature_valid
    except Exception:  # unsupported algorithms surface here
        valid = False
    if not valid:
        raise CaError(f"CSR for {identity} has an invalid signature; the requester must sign "
                      "it with the key it wants certified")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise CaError(f"CSR for {identity} uses curve {key.curve.name}; only P-256 is accepted")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise CaError(f"CSR for {identity} has a {key.key_size}-bit RSA key; "
                          f"at least {_MIN_RSA_BITS} bits are required")
        return key
    raise CaError(f"CSR for {identity} has a {type(key).__name__}; use ECDSA P-256")


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _validate_ca(
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    intermediates: list[x509.Certificate],
    roots: list[x509.Certificate],
    now: datetime,
) -> None:
    if cert.public_key() != key.public_key():
        raise CaError(f"{CA_KEY_FILE} does not match {CA_CERT_FILE}; they must be a pair")
    chain = [cert, *intermediates]
    for c in chain:
        subject = c.subject.rfc4514_string() or "<empty subject>"
        try:
            bc = c.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise CaError(f"certificate {subject!r} is not a CA (basicConstraints CA:TRUE missing)")
        try:
            ku = c.extensions.get_extension_for_class(x509.KeyUsage).value
            if not ku.key_cert_sign:
                raise CaError(f"certificate {subject!r} may not sign certificates (keyCertSign)")
        except x509.ExtensionNotFound:
            pass
        if now >= c.not_valid_after_utc:
            raise CaError(f"CA certificate {subject!r} expired at "
                          f"{c.not_valid_after_utc.isoformat()}; rotate the cacerts")
        if now < c.not_valid_before_utc - timedelta(hours=1):
            raise CaError(f"CA certificate {subject!r} is not valid before "
                          f"{c.not_valid_before_utc.isoformat()}; check the system clock")
    for child, parent in zip(chain, chain[1:], strict=False):
        if not issued_by(child, parent):
            raise CaError(f"{CERT_CHAIN_FILE} is out of order or incomplete: "
                          f"{child.subject.rfc4514_string()!r} is not signed by "
                          f"{parent.subject.rfc4514_string()!r}")
    if not any(issued_by(chain[-1], root) for root in roots):
        raise CaError(f"the CA chain does not lead to any certificate in {ROOT_CERT_FILE}; "
                      "check that cert-chain.pem and root-cert.pem belong to the same PKI")


def issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    """Whether ``parent`` signed ``child`` (a self-signed certificate counts as its own)."""
    if child == parent:
        return True
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True
