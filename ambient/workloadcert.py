"""A workload certificate as a node proxy holds it, read without ``cryptography``.

Role: the proxy side of the mesh PKI. ``workload_certificate_from_chain`` turns a CA's answer
(Istio's ``IstioCertificateResponse.cert_chain``: leaf first, root bundle last) into a
``WorkloadCertificate`` (``ambient.certs.verify_chain`` checks it before first use). Parsing
goes through ``ambient.x509lite`` (the libcrypto Python's ``ssl`` already loaded), so
ztunnel and the waypoint never map the ``cryptography`` package: about 10 MB of RSS per
process. The CA itself (``ambient.ca``) signs with ``cryptography``.

Invariants: a ``WorkloadCertificate``'s leaf carries exactly the requested SPIFFE ID as its only
URI SAN; its validity window is the leaf's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property

from . import x509lite
from .identity import SpiffeId
from .x509lite import CertInfo

__all__ = [
    "DEFAULT_TTL",
    "CaError",
    "WorkloadCertificate",
    "split_pem",
    "workload_certificate_from_chain",
]

DEFAULT_TTL = timedelta(hours=24)  # ztunnel/istiod SECRET_TTL default

_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
_PEM_END = b"-----END CERTIFICATE-----"


class CaError(Exception):
    """The CA cannot load its keys or refuses to sign; the message says what to fix."""


def split_pem(data: bytes | str) -> list[bytes]:
    """Split a PEM bundle into one PEM block per certificate (order kept, other text dropped)."""
    raw = data.encode() if isinstance(data, str) else data
    out: list[bytes] = []
    pos = 0
    while (start := raw.find(_PEM_BEGIN, pos)) != -1:
        end = raw.find(_PEM_END, start)
        if end == -1:
            raise CaError("a PEM certificate block has no END line; the bundle is truncated")
        pos = end + len(_PEM_END)
        out.append(raw[start:pos] + b"\n")
    return out


@dataclass(frozen=True)
class WorkloadCertificate:
    """A workload's key, its chain (leaf first, intermediates, no root) and the roots to trust."""

    identity: SpiffeId
    key_pem: bytes
    chain_pem: list[bytes]
    roots_pem: bytes
    not_before: datetime
    not_after: datetime

    @cached_property
    def _leaf(self) -> CertInfo:
        return x509lite.parse_pem(self.chain_pem[0])

    def leaf(self) -> CertInfo:
        """The parsed leaf certificate."""
        return self._leaf

    @property
    def serial_number(self) -> int:
        return self._leaf.serial_number

    def refresh_at(self) -> datetime:
        """When to fetch a replacement: half-way through the lifetime, like ztunnel."""
        return self.not_before + (self.not_after - self.not_before) / 2

    def is_expired(self, now: datetime | None = None) -> bool:
        return (now or datetime.now(UTC)) >= self.not_after

    def to_pem_chain(self) -> bytes:
        """Leaf plus intermediates as one PEM bundle (what a TLS stack sends to the peer)."""
        return b"".join(self.chain_pem)


def workload_certificate_from_chain(
    identity: SpiffeId, key_pem: bytes, chain: Sequence[str | bytes]
) -> WorkloadCertificate:
    """Build a WorkloadCertificate from an IstioCertificateResponse ``cert_chain``.

    The last element is the root bundle (istiod may put several roots in it); earlier elements
    may each hold one or more certificates.  Roots repeated inside the chain are dropped.
    """
    if len(chain) < 2:
        raise CaError(
            f"certificate chain for {identity} has {len(chain)} element(s); expected the leaf "
            "first and the root last (is the CA returning an IstioCertificateResponse?)"
        )
    roots_pem = b"".join(split_pem(chain[-1]))
    if not roots_pem:
        raise CaError(f"certificate chain for {identity}: the last element holds no root")
    roots = set(split_pem(roots_pem))
    blocks = [b for element in chain[:-1] for b in split_pem(element) if b not in roots]
    if not blocks:
        raise CaError(f"certificate chain for {identity} holds no leaf certificate")
    try:
        leaf = x509lite.parse_pem(blocks[0])
    except x509lite.CertificateParseError as exc:
        raise CaError(f"leaf certificate for {identity}: not a valid PEM certificate "
                      f"({exc})") from exc
    if not leaf.uri_sans:
        raise CaError(f"the CA returned a certificate with no URI SAN for {identity}")
    if list(leaf.uri_sans) != [str(identity)]:
        raise CaError(f"the CA returned a certificate for {list(leaf.uri_sans)}, but "
                      f"{identity} was requested")
    return WorkloadCertificate(
        identity=identity,
        key_pem=key_pem,
        chain_pem=blocks,
        roots_pem=roots_pem,
        not_before=leaf.not_before,
        not_after=leaf.not_after,
    )

