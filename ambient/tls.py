"""mTLS for HBONE: SSL contexts with Istio's exact parameters, and SPIFFE peer verification.

Contract (istio-contract.md D, c.4): TLS 1.3 only, ALPN ``h2``, suites TLS_AES_256_GCM_SHA384
and TLS_AES_128_GCM_SHA256, no SNI, no session resumption, client certificate mandatory, chains
verified against the mesh roots.  Python's ``ssl`` verifies the chain but cannot check a URI
SAN, so after every handshake the caller MUST call ``verify_peer``: it is the one place that
decides which SPIFFE identity the peer has, and whether that identity is acceptable.

Every refusal is a ``PeerVerificationError`` whose ``reason`` is a short stable token (for
logs and metrics) and whose message tells an operator what to check.
"""

from __future__ import annotations

import ctypes
import logging
import os
import ssl
import sys
import tempfile
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from typing import Any, Final, Literal, cast, get_args

from .identity import IdentityError, SpiffeId
from .workloadcert import WorkloadCertificate

__all__ = [
    "ALPN_H2",
    "CIPHERSUITES",
    "REASONS",
    "PeerVerificationError",
    "Reason",
    "classify_handshake_error",
    "client_context",
    "server_context",
    "verify_peer",
]

log = logging.getLogger(__name__)

ALPN_H2: Final = "h2"
CIPHERSUITES: Final = "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256"

Reason = Literal[
    "expired",
    "not-yet-valid",
    "foreign-ca",
    "wrong-trust-domain",
    "unexpected-san",
    "no-spiffe-san",
    "no-certificate",
    "handshake",
]
REASONS: Final = frozenset(get_args(Reason))

# OpenSSL X509_V_ERR_* codes (x509_vfy.h).
_V_ERR_CERT_NOT_YET_VALID = 9
_V_ERR_CERT_HAS_EXPIRED = 10
_V_ERR_FOREIGN = frozenset(
    {
        2,  # unable to get issuer certificate
        7,  # certificate signature failure
        18,  # depth zero self-signed certificate
        19,  # self-signed certificate in chain
        20,  # unable to get local issuer certificate
        21,  # unable to verify the first certificate
    }
)


class PeerVerificationError(Exception):
    """The peer is not who we accept; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: Reason, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown peer verification reason {reason!r}")
        super().__init__(message)
        self.reason: Reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


# -- contexts -----------------------------------------------------------------------------


def server_context(cert: WorkloadCertificate) -> ssl.SSLContext:
    """Server side of HBONE (port 15008): presents ``cert``, requires a client certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.num_tickets = 0  # TLS 1.3 session tickets off: ztunnel disables resumption
    _configure(ctx, cert)
    return ctx


def client_context(cert: WorkloadCertificate) -> ssl.SSLContext:
    """Client side of HBONE.  Connect with ``server_hostname=''`` (asyncio) or ``None``: no SNI.

    Hostname checking is off because the server is identified by its SPIFFE SAN, which the
    caller checks with ``verify_peer(..., expected=...)`` right after the handshake.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    _configure(ctx, cert)
    return ctx


def _configure(ctx: ssl.SSLContext, cert: WorkloadCertificate) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols([ALPN_H2])
    ctx.load_verify_locations(cadata=cert.roots_pem.decode("ascii"))
    _load_cert_chain(ctx, cert)
    _set_tls13_ciphersuites(ctx)


def _load_cert_chain(ctx: ssl.SSLContext, cert: WorkloadCertificate) -> None:
    # ssl can only load a key from a path.  Prefer an anonymous in-memory file so the private
    # key never touches a disk; fall back to a private temporary file removed at once.
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        cfd = os.memfd_create("ambient-cert", os.MFD_CLOEXEC)
        kfd = os.memfd_create("ambient-key", os.MFD_CLOEXEC)
        try:
            os.write(cfd, cert.to_pem_chain())
            os.write(kfd, cert.key_pem)
            ctx.load_cert_chain(f"/proc/self/fd/{cfd}", f"/proc/self/fd/{kfd}")
        finally:
            os.close(cfd)
            os.close(kfd)
        return
    with tempfile.TemporaryDirectory(prefix="ambient-tls-") as d:
        cpath, kpath = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        with open(cpath, "wb") as f:
            f.write(cert.to_pem_chain())
        fd = os.open(kpath, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(cert.key_pem)
        ctx.load_cert_chain(cpath, kpath)


_libssl: ctypes.CDLL | None | Literal[False] = None


def _find_libssl() -> ctypes.CDLL | None:
    """The libssl the ``_ssl`` module is linked against (found in our own memory map)."""
    global _libssl
    if _libssl is None:
        _libssl = False
        try:
            with open("/proc/self/maps") as maps:
                paths = {line.split()[-1] for line in maps if "/libssl.so" in line}
            if len(paths) == 1:
                lib = ctypes.CDLL(paths.pop())
                lib.SSL_CTX_set_ciphersuites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
                lib.SSL_CTX_set_ciphersuites.restype = ctypes.c_int
                lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
                lib.SSL_CTX_get_options.restype = ctypes.c_uint64
                _libssl = lib
        except (OSError, AttributeError) as exc:
            log.debug("cannot restrict TLS 1.3 ciphersuites: %s", exc)
    return _libssl or None


def _set_tls13_ciphersuites(ctx: ssl.SSLContext) -> None:
    """Limit TLS 1.3 suites to ztunnel's two AES-GCM suites.

    Python's ``ssl`` has no API for TLS 1.3 suites (``set_ciphers`` only covers TLS <= 1.2),
    so call OpenSSL's ``SSL_CTX_set_ciphersuites`` on the context's ``SSL_CTX*`` (the first
    field after the object header in CPython).  The pointer is used only if OpenSSL reports the
    same options as Python for it; otherwise the OpenSSL defaults stay, which still prefer
    TLS_AES_256_GCM_SHA384, so handshakes with ztunnel are unaffected.
    """
    lib = _find_libssl()
    if lib is None or sys.implementation.name != "cpython":
        return
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr or lib.SSL_CTX_get_options(ptr) != int(ctx.options):
        log.debug("SSLContext layout not recognised; keeping OpenSSL's TLS 1.3 suites")
        return
    if lib.SSL_CTX_set_ciphersuites(ptr, CIPHERSUITES.encode()) != 1:
        log.debug("OpenSSL refused ciphersuites %s", CIPHERSUITES)


# -- peer verification ----------------------------------------------------------------------


def verify_peer(
    ssl_object: ssl.SSLObject | ssl.SSLSocket,
    *,
    trust_domain: str,
    expected: Collection[SpiffeId] | None = None,
    now: datetime | None = None,
) -> SpiffeId:
    """Return the peer's SPIFFE ID after a completed handshake, or raise PeerVerificationError.

    Server side: pass ``expected=None`` (any workload of our trust domain may connect; policy
    decides later).  Client side: pass the identities the destination may have.
    """
    # The dict form is what OpenSSL decoded in the handshake (~4 us; parsing the DER again
    # costs ~150 us on OpenSSL 3.0). It is empty when the peer sent no certificate, or when
    # the context did not verify one (ours always require and verify).
    info = ssl_object.getpeercert()
    if not info:
        if ssl_object.getpeercert(binary_form=True):
            raise PeerVerificationError(
                "handshake", "the peer certificate was not verified (the TLS context does "
                "not require one); mesh contexts use CERT_REQUIRED")
        raise PeerVerificationError(
            "no-certificate",
            "the peer presented no certificate; is it a mesh workload (ztunnel/waypoint)?",
        )
    _check_validity(_cert_time(info, "notBefore"), _cert_time(info, "notAfter"),
                    now or datetime.now(UTC))
    sans = cast(tuple[tuple[str, str], ...], info.get("subjectAltName", ()))
    uris = [v for k, v in sans if k == "URI"]
    peer = _spiffe_id_of(uris)
    if peer.trust_domain != trust_domain:
        raise PeerVerificationError(
            "wrong-trust-domain",
            f"peer identity {peer} is in trust domain {peer.trust_domain!r}, expected "
            f"{trust_domain!r}; check TRUST_DOMAIN on both sides and which CA signed it",
        )
    if expected is not None and peer not in expected:
        want = ", ".join(sorted(str(e) for e in expected)) or "<none>"
        raise PeerVerificationError(
            "unexpected-san",
            f"peer identity {peer} is not one the destination may have ({want}); is the "
            "workload address stale, or the service's subjectAltNames out of date?",
        )
    return peer


_MONTHS: Final = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}


def _cert_time(info: Mapping[str, Any], field: str) -> datetime:
    """``notBefore``/``notAfter`` as ``ssl`` prints them ("Nov  7 23:43:59 2026 GMT");
    ``ssl.cert_time_to_seconds`` reads the same through strptime at ~10x the cost."""
    try:
        month, day, hms, year, zone = str(info[field]).split()
        h, m, sec = hms.split(":")
        if zone != "GMT":
            raise ValueError(f"unexpected zone {zone!r}")
        return datetime(int(year), _MONTHS[month], int(day), int(h), int(m), int(sec),
                        tzinfo=UTC)
    except (KeyError, ValueError) as exc:
        raise PeerVerificationError(
            "handshake", f"the peer certificate's {field} cannot be read ({exc})") from None


def _check_validity(not_before: datetime, not_after: datetime, now: datetime) -> None:
    if now >= not_after:
        raise PeerVerificationError(
            "expired",
            f"the peer certificate expired at {not_after.isoformat()}; is the "
            "peer's proxy failing to renew from the CA?",
        )
    if now < not_before:
        raise PeerVerificationError(
            "not-yet-valid",
            f"the peer certificate is valid only from {not_before.isoformat()}; "
            "check the clocks (NTP) on both nodes",
        )


def _spiffe_id_of(uris: list[str]) -> SpiffeId:
    spiffe = [u for u in uris if u.lower().startswith("spiffe:")]
    if not spiffe:
        raise PeerVerificationError(
            "no-spiffe-san",
            "the peer certificate has no spiffe:// URI SAN; it was not issued by the mesh CA",
        )
    if len(spiffe) > 1:
        raise PeerVerificationError(
            "unexpected-san",
            f"the peer certificate carries {len(spiffe)} SPIFFE IDs ({', '.join(spiffe)}); "
            "exactly one is allowed",
        )
    try:
        return SpiffeId.parse(spiffe[0])
    except IdentityError as exc:
        raise PeerVerificationError(
            "no-spiffe-san", f"the peer certificate's SPIFFE ID is not an Istio identity: {exc}"
        ) from exc


# -- handshake failures ---------------------------------------------------------------------

# Alerts the *other* side sends when it rejects our certificate, by OpenSSL reason name.
_ALERTS: dict[str, tuple[Reason, str]] = {
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": ("expired", "the peer rejected our certificate as expired"),
    "TLSV1_ALERT_UNKNOWN_CA": ("foreign-ca", "the peer does not trust the CA that signed ours"),
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": (
        "no-certificate", "the peer requires a client certificate and we sent none",
    ),
}


def classify_handshake_error(exc: BaseException) -> PeerVerificationError:
    """Map an exception from a TLS handshake (or the first read after it) to a reason."""
    if isinstance(exc, PeerVerificationError):
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _classify_verify(exc)
    if isinstance(exc, ssl.SSLError):
        reason_name = str(getattr(exc, "reason", None) or "").upper()
        text = f"{reason_name} {exc}".upper()
        if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in text or "NO_CERTIFICATE_RETURNED" in text:
            return PeerVerificationError(
                "no-certificate",
                "the peer sent no client certificate; only mesh workloads may use HBONE "
                "(port 15008)",
            )
        for alert, (reason, message) in _ALERTS.items():
            if reason_name == alert or alert in text:
                return PeerVerificationError(reason, f"{message} ({exc})")
        if "WRONG_VERSION_NUMBER" in text or "UNSUPPORTED_PROTOCOL" in text:
            return PeerVerificationError(
                "handshake", f"TLS version mismatch, HBONE requires TLS 1.3: {exc}"
            )
    return PeerVerificationError(
        "handshake",
        f"TLS handshake failed: {type(exc).__name__}: {exc}; is the peer speaking HBONE "
        "(TLS 1.3, ALPN h2) on this port?",
    )


def _classify_verify(exc: ssl.SSLCertVerificationError) -> PeerVerificationError:
    code = getattr(exc, "verify_code", None)
    detail = getattr(exc, "verify_message", None) or str(exc)
    if code == _V_ERR_CERT_HAS_EXPIRED:
        return PeerVerificationError(
            "expired",
            f"the peer certificate has expired ({detail}); is its proxy failing to renew?",
        )
    if code == _V_ERR_CERT_NOT_YET_VALID:
        return PeerVerificationError(
            "not-yet-valid", f"the peer certificate is not yet valid ({detail}); check clocks"
        )
    if code in _V_ERR_FOREIGN:
        return PeerVerificationError(
            "foreign-ca",
            f"the peer certificate is not signed by our mesh roots ({detail}); do both sides "
            "use the same CA / root-cert.pem?",
        )
    return PeerVerificationError("handshake", f"certificate verification failed: {detail}")
