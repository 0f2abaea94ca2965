"""Certificate parsing, issuer checks and CSR generation over the process's own libcrypto.

Node proxies need only a few X.509 operations on what their CA sends (read a certificate's
serial, validity and URI SANs, check a chain link, make a key and a CSR); a peer is checked
from what the handshake already decoded (``ambient.tls.verify_peer``).  Importing
``cryptography`` for them costs ~10 MB of RSS (its extension links its own OpenSSL); the
``ssl`` module has already mapped the system libcrypto, so this module calls that one through
ctypes.  OpenSSL 3.0's ``d2i_X509`` costs ~150 us (it decodes the public key), so parsing is
for certificates from a CA or a file, not per connection.

Invariants:
- The libcrypto used is exactly the one already mapped into this process (found in
  ``/proc/self/maps`` after importing ``ssl``); it is loaded once and cached.  Nothing else is
  global or mutable, so every function may be called from any thread.
- Every OpenSSL object a call creates is freed before the call returns (``finally``), and
  every function has declared ``argtypes``/``restype`` (pointers are ``c_void_p``).
- After an OpenSSL failure the thread's OpenSSL error queue is drained, so a later ``ssl``
  operation never reports a stale error of ours.
- ``parse_der`` never crashes on hostile bytes: it raises ``CertificateParseError``.
- This module never imports ``cryptography``.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import ssl  # noqa: F401  (imported so that the _ssl extension has mapped libcrypto)
import threading
from ctypes import byref, c_char_p, c_int, c_long, c_ulong, c_void_p, string_at
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = ["CertInfo", "CertificateParseError", "issued_by", "new_key_and_csr", "parse_der",
           "parse_pem"]


class CertificateParseError(ValueError):
    """The bytes are not one X.509 certificate (message says what is wrong)."""


@dataclass(frozen=True, slots=True)
class CertInfo:
    """The fields of one certificate that the mesh reads, plus its DER for later checks."""

    der: bytes
    serial_number: int
    not_before: datetime  # timezone-aware UTC
    not_after: datetime  # timezone-aware UTC
    uri_sans: tuple[str, ...]  # SubjectAlternativeName URIs in order; () without a SAN extension
    subject: str  # RFC 2253-style one-liner for messages ("" when empty)


# -- constants from the OpenSSL 3 headers ---------------------------------------------------

_NID_SUBJECT_ALT_NAME = 85
_GEN_URI = 6
_X509_V_OK = 0
_BIO_CTRL_INFO = 3  # BIO_get_mem_data
# XN_FLAG_RFC2253 without ASN1_STRFLGS_ESC_MSB, so UTF-8 names stay readable.
_XN_FLAGS = 0x1110317 & ~0x4
_X509_REQ_VERSION_1 = 0
_V_ASN1_NEG_INTEGER = 0x102


class _GeneralName(ctypes.Structure):
    # GENERAL_NAME is {int type; union {pointers...} d;}: the union is one pointer wide.
    _fields_ = [("type", c_int), ("d", c_void_p)]


_P, _I = c_void_p, c_int
_FREE = ("X509_free", "ASN1_IA5STRING_free", "GENERAL_NAMES_free",
         "GENERAL_NAME_free", "X509_EXTENSION_free", "EVP_PKEY_CTX_free", "EVP_PKEY_free",
         "X509_REQ_free")  # void f(T *): NULL-safe destructors
_SIGNATURES: dict[str, tuple[type | None, list[type]]] = {
    **{name: (None, [_P]) for name in _FREE},
    # errors
    "ERR_get_error": (c_ulong, []),
    "ERR_error_string_n": (None, [c_ulong, c_char_p, ctypes.c_size_t]),
    "ERR_clear_error": (None, []),
    # certificates
    "d2i_X509": (_P, [_P, _P, c_long]),
    "X509_check_issued": (_I, [_P, _P]),
    "X509_get0_pubkey": (_P, [_P]),
    "X509_verify": (_I, [_P, _P]),
    "X509_get_version": (c_long, [_P]),
    "X509_get0_notBefore": (_P, [_P]),
    "X509_get0_notAfter": (_P, [_P]),
    "ASN1_TIME_to_tm": (_I, [_P, _P]),
    "X509_get0_serialNumber": (_P, [_P]),
    "ASN1_STRING_type": (_I, [_P]),
    "X509_get_ext_d2i": (_P, [_P, _I, _P, _P]),
    "X509_get_subject_name": (_P, [_P]),
    "X509_NAME_print_ex": (_I, [_P, _P, _I, c_ulong]),
    "ASN1_STRING_get0_data": (_P, [_P]),
    "ASN1_STRING_length": (_I, [_P]),
    "ASN1_STRING_set": (_I, [_P, c_char_p, _I]),
    "ASN1_IA5STRING_new": (_P, []),
    # stacks and general names
    "OPENSSL_sk_num": (_I, [_P]),
    "OPENSSL_sk_value": (_P, [_P, _I]),
    "OPENSSL_sk_new_null": (_P, []),
    "OPENSSL_sk_push": (_I, [_P, _P]),
    "OPENSSL_sk_pop_free": (None, [_P, _P]),
    "GENERAL_NAMES_new": (_P, []),
    "GENERAL_NAME_new": (_P, []),
    "GENERAL_NAME_set0_value": (None, [_P, _I, _P]),
    "X509V3_EXT_i2d": (_P, [_I, _I, _P]),
    # memory BIOs
    "BIO_s_mem": (_P, []),
    "BIO_new": (_P, [_P]),
    "BIO_free": (_I, [_P]),
    "BIO_ctrl": (c_long, [_P, _I, c_long, _P]),
    # keys and requests
    "EVP_PKEY_CTX_new_from_name": (_P, [_P, c_char_p, c_char_p]),
    "EVP_PKEY_keygen_init": (_I, [_P]),
    "EVP_PKEY_CTX_set_group_name": (_I, [_P, c_char_p]),
    "EVP_PKEY_generate": (_I, [_P, _P]),
    "EVP_sha256": (_P, []),
    "X509_REQ_new": (_P, []),
    "X509_REQ_set_version": (_I, [_P, c_long]),
    "X509_REQ_set_pubkey": (_I, [_P, _P]),
    "X509_REQ_add_extensions": (_I, [_P, _P]),
    "X509_REQ_sign": (_I, [_P, _P, _P]),
    "PEM_write_bio_X509_REQ": (_I, [_P, _P]),
    "PEM_write_bio_PKCS8PrivateKey": (_I, [_P, _P, _P, c_char_p, _I, _P, _P]),
}

_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


def _libcrypto() -> ctypes.CDLL:
    """The libcrypto the ``_ssl`` module is linked against, with every signature declared."""
    global _lib
    lib = _lib
    if lib is not None:
        return lib
    with _lib_lock:
        if _lib is None:
            _lib = _load_libcrypto()
        return _lib


def _load_libcrypto() -> ctypes.CDLL:
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split(maxsplit=5)[-1].strip() for line in maps if "/libcrypto.so" in line}
    except OSError as exc:
        raise RuntimeError(f"x509lite: cannot read /proc/self/maps to find libcrypto ({exc}); "
                           "this module needs Linux with /proc mounted") from exc
    if len(paths) != 1:
        found = ", ".join(sorted(paths)) or "none"
        raise RuntimeError(
            "x509lite: expected exactly one libcrypto.so mapped by Python's ssl module, found "
            f"{found}; is Python built against a shared system OpenSSL 3 (libcrypto.so.3)?"
        )
    path = paths.pop()
    try:
        lib = ctypes.CDLL(path)
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = argtypes
    except (OSError, AttributeError) as exc:
        raise RuntimeError(f"x509lite: {path} lacks an OpenSSL 3 function ({exc}); "
                           "OpenSSL 3.0 or newer is required") from exc
    return lib


def _openssl_error(lib: ctypes.CDLL) -> str:
    """Drain this thread's OpenSSL error queue into one message (and leave it empty)."""
    reasons: list[str] = []
    buf = ctypes.create_string_buffer(256)
    for _ in range(16):
        code = lib.ERR_get_error()
        if not code:
            break
        lib.ERR_error_string_n(code, buf, len(buf))
        reasons.append(buf.value.decode("ascii", "replace"))
    lib.ERR_clear_error()
    return "; ".join(reasons) or "no OpenSSL error recorded"


def _bio_bytes(lib: ctypes.CDLL, bio: int) -> bytes:
    data = c_void_p()
    n = lib.BIO_ctrl(bio, _BIO_CTRL_INFO, 0, byref(data))
    return string_at(data.value, n) if n > 0 and data.value else b""


def _d2i(lib: ctypes.CDLL, der: bytes) -> int:
    """A new X509* for exactly ``der`` (the caller frees it), or CertificateParseError.
    Costs ~130 us on OpenSSL 3.0: it decodes the public key through OSSL_DECODER."""
    if not der:
        raise CertificateParseError("empty input: expected one DER-encoded X.509 certificate")
    start = ctypes.cast(c_char_p(der), c_void_p).value or 0  # points into `der`, no copy
    cursor = c_void_p(start)
    x509 = lib.d2i_X509(None, byref(cursor), len(der))
    if not x509:
        raise CertificateParseError(
            f"not a DER X.509 certificate ({len(der)} bytes): {_openssl_error(lib)}")
    if (cursor.value or 0) - start != len(der):
        lib.X509_free(x509)
        raise CertificateParseError("trailing bytes after the certificate")
    return int(x509)


class _Tm(ctypes.Structure):  # glibc's struct tm
    _fields_ = [("tm_sec", c_int), ("tm_min", c_int), ("tm_hour", c_int), ("tm_mday", c_int),
                ("tm_mon", c_int), ("tm_year", c_int), ("tm_wday", c_int), ("tm_yday", c_int),
                ("tm_isdst", c_int), ("tm_gmtoff", c_long), ("tm_zone", c_char_p)]


def _time(lib: ctypes.CDLL, t: int, what: str) -> datetime:
    tm = _Tm()
    if not t or lib.ASN1_TIME_to_tm(t, byref(tm)) != 1:
        raise CertificateParseError(f"the certificate's {what} is not a valid time: "
                                    f"{_openssl_error(lib)}")
    return datetime(tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
                    tm.tm_sec, tzinfo=UTC)


def _serial(lib: ctypes.CDLL, x509: int) -> int:
    ai = lib.X509_get0_serialNumber(x509)  # borrowed
    n = lib.ASN1_STRING_length(ai)
    magnitude = int.from_bytes(string_at(lib.ASN1_STRING_get0_data(ai), n), "big") if n > 0 \
        else 0
    return -magnitude if lib.ASN1_STRING_type(ai) == _V_ASN1_NEG_INTEGER else magnitude


def _uri_sans(lib: ctypes.CDLL, x509: int) -> tuple[str, ...]:
    crit = c_int(0)
    names = lib.X509_get_ext_d2i(x509, _NID_SUBJECT_ALT_NAME, byref(crit), None)
    if not names:
        if crit.value == -1:
            return ()
        lib.ERR_clear_error()
        raise CertificateParseError(
            "the certificate has malformed extensions: " + (
                "two subjectAltName extensions (RFC 5280 allows one)" if crit.value == -2
                else "its subjectAltName does not decode"))
    try:
        uris: list[str] = []
        for i in range(lib.OPENSSL_sk_num(names)):
            gen = _GeneralName.from_address(lib.OPENSSL_sk_value(names, i))
            if gen.type != _GEN_URI:
                continue
            n = lib.ASN1_STRING_length(gen.d)
            raw = string_at(lib.ASN1_STRING_get0_data(gen.d), n) if n > 0 else b""
            try:
                uris.append(raw.decode("ascii"))
            except UnicodeDecodeError:
                raise CertificateParseError(
                    f"a URI SAN is not ASCII ({raw[:64]!r}); the certificate is malformed"
                ) from None
        return tuple(uris)
    finally:
        lib.GENERAL_NAMES_free(names)


def _subject(lib: ctypes.CDLL, x509: int) -> str:
    name = lib.X509_get_subject_name(x509)  # borrowed
    bio = lib.BIO_new(lib.BIO_s_mem())
    if not bio:
        raise MemoryError(f"OpenSSL cannot allocate a memory BIO: {_openssl_error(lib)}")
    try:
        if lib.X509_NAME_print_ex(bio, name, 0, _XN_FLAGS) < 0:
            lib.ERR_clear_error()
            return "<unprintable subject>"
        return _bio_bytes(lib, bio).decode("utf-8", "replace")
    finally:
        lib.BIO_free(bio)


def parse_der(der: bytes) -> CertInfo:
    """Parse exactly one DER certificate (OpenSSL's full ``d2i_X509``); raise
    CertificateParseError saying what is wrong.  About 150 us on OpenSSL 3.0 (it decodes the
    public key), so it is for certificates from a CA or a file, not per handshake."""
    der = bytes(der)
    lib = _libcrypto()
    x509 = _d2i(lib, der)
    try:
        version = lib.X509_get_version(x509)
        if not 0 <= version <= 2:
            raise CertificateParseError(f"unsupported certificate version {version + 1} "
                                        "(X.509 has v1 to v3)")
        return CertInfo(
            der=der,
            serial_number=_serial(lib, x509),
            not_before=_time(lib, lib.X509_get0_notBefore(x509), "notBefore"),
            not_after=_time(lib, lib.X509_get0_notAfter(x509), "notAfter"),
            uri_sans=_uri_sans(lib, x509),
            subject=_subject(lib, x509),
        )
    finally:
        lib.X509_free(x509)


_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
_PEM_END = b"-----END CERTIFICATE-----"


def parse_pem(pem: bytes) -> CertInfo:
    """Parse one PEM CERTIFICATE block (text around it is ignored, a second block is not)."""
    count = pem.count(_PEM_BEGIN)
    if count != 1:
        raise CertificateParseError(
            f"expected exactly one '-----BEGIN CERTIFICATE-----' block, found {count}"
            + ("; is this a key, a CSR or a certificate bundle?" if count == 0 else
               "; split the bundle and parse each certificate"))
    start = pem.index(_PEM_BEGIN) + len(_PEM_BEGIN)
    end = pem.find(_PEM_END, start)
    if end == -1:
        raise CertificateParseError("the PEM certificate has no END line; it is truncated")
    body = b"".join(pem[start:end].split())
    try:
        der = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CertificateParseError(f"the PEM certificate body is not valid base64 ({exc})"
                                    ) from None
    return parse_der(der)


def issued_by(child: CertInfo, parent: CertInfo) -> bool:
    """True if ``child`` is ``parent``, or ``parent`` names and signed ``child``.

    The name/key-identifier match is OpenSSL's ``X509_check_issued``; the signature check is
    ``X509_verify`` with the parent's public key.  Any failure is False, never an exception.
    """
    if child.der == parent.der:
        return True
    lib = _libcrypto()
    try:
        c = _d2i(lib, child.der)
    except CertificateParseError:
        return False
    try:
        try:
            p = _d2i(lib, parent.der)
        except CertificateParseError:
            return False
        try:
            if lib.X509_check_issued(p, c) != _X509_V_OK:
                return False
            key = lib.X509_get0_pubkey(p)  # borrowed: freed with `p`
            return bool(key) and lib.X509_verify(c, key) == 1
        finally:
            lib.X509_free(p)
    finally:
        lib.ERR_clear_error()
        lib.X509_free(c)


def _check_uri(uri_san: str) -> bytes:
    if not uri_san:
        raise ValueError("the CSR's URI SAN is empty; pass the SPIFFE ID to certify")
    if not uri_san.isascii() or not uri_san.isprintable() or "," in uri_san:
        raise ValueError(f"refusing URI SAN {uri_san!r}: it must be printable ASCII without "
                         "commas (a SPIFFE ID such as spiffe://cluster.local/ns/x/sa/y)")
    return uri_san.encode("ascii")


def _fail(lib: ctypes.CDLL, what: str) -> RuntimeError:
    return RuntimeError(f"OpenSSL failed to {what}: {_openssl_error(lib)}")


def _new_p256_key(lib: ctypes.CDLL) -> int:
    ctx = lib.EVP_PKEY_CTX_new_from_name(None, b"EC", None)
    if not ctx:
        raise _fail(lib, "create an EC key context")
    try:
        pkey = c_void_p()
        if (lib.EVP_PKEY_keygen_init(ctx) != 1
                or lib.EVP_PKEY_CTX_set_group_name(ctx, b"P-256") != 1
                or lib.EVP_PKEY_generate(ctx, byref(pkey)) != 1 or not pkey.value):
            raise _fail(lib, "generate an ECDSA P-256 key")
        return pkey.value
    finally:
        lib.EVP_PKEY_CTX_free(ctx)


def _san_extension(lib: ctypes.CDLL, uri: bytes) -> int:
    """A new critical subjectAltName X509_EXTENSION* holding one URI (the caller frees it)."""
    names = lib.GENERAL_NAMES_new()
    if not names:
        raise _fail(lib, "allocate GENERAL_NAMES")
    try:
        gen = lib.GENERAL_NAME_new()
        ia5 = lib.ASN1_IA5STRING_new()
        if not gen or not ia5 or lib.ASN1_STRING_set(ia5, uri, len(uri)) != 1:
            lib.ASN1_IA5STRING_free(ia5)
            lib.GENERAL_NAME_free(gen)
            raise _fail(lib, "build the URI SAN")
        lib.GENERAL_NAME_set0_value(gen, _GEN_URI, ia5)  # gen now owns ia5
        if lib.OPENSSL_sk_push(names, gen) <= 0:
            lib.GENERAL_NAME_free(gen)
            raise _fail(lib, "build the URI SAN")
        ext = lib.X509V3_EXT_i2d(_NID_SUBJECT_ALT_NAME, 1, names)
        if not ext:
            raise _fail(lib, "encode the subjectAltName extension")
        return int(ext)
    finally:
        lib.GENERAL_NAMES_free(names)


def new_key_and_csr(uri_san: str) -> tuple[bytes, bytes]:
    """A fresh ECDSA P-256 key and a CSR for it: (PKCS#8 key PEM, CSR PEM).

    The CSR has an empty subject, version 1, one critical subjectAltName extension holding
    exactly ``uri_san`` as a URI, and a SHA-256 ECDSA signature (what ztunnel sends to the CA).
    """
    uri = _check_uri(uri_san)
    lib = _libcrypto()
    pkey = req = exts = bio = None
    try:
        pkey = _new_p256_key(lib)
        req = lib.X509_REQ_new()
        if not req:
            raise _fail(lib, "allocate a certificate request")
        if (lib.X509_REQ_set_version(req, _X509_REQ_VERSION_1) != 1
                or lib.X509_REQ_set_pubkey(req, pkey) != 1):
            raise _fail(lib, "set the request's version and key")
        exts = lib.OPENSSL_sk_new_null()
        if not exts:
            raise _fail(lib, "allocate the extension list")
        ext = _san_extension(lib, uri)
        if lib.OPENSSL_sk_push(exts, ext) <= 0:
            lib.X509_EXTENSION_free(ext)
            raise _fail(lib, "build the extension list")
        if lib.X509_REQ_add_extensions(req, exts) != 1:
            raise _fail(lib, "add the subjectAltName to the request")
        if lib.X509_REQ_sign(req, pkey, lib.EVP_sha256()) <= 0:
            raise _fail(lib, "sign the certificate request")
        bio = lib.BIO_new(lib.BIO_s_mem())
        if not bio or lib.PEM_write_bio_X509_REQ(bio, req) != 1:
            raise _fail(lib, "write the request as PEM")
        csr_pem = _bio_bytes(lib, bio)
        lib.BIO_free(bio)
        bio = lib.BIO_new(lib.BIO_s_mem())
        if not bio or lib.PEM_write_bio_PKCS8PrivateKey(bio, pkey, None, None, 0, None,
                                                        None) != 1:
            raise _fail(lib, "write the private key as PEM")
        return _bio_bytes(lib, bio), csr_pem
    finally:
        if bio:
            lib.BIO_free(bio)
        if exts:
            free_ext = ctypes.cast(lib.X509_EXTENSION_free, c_void_p).value
            lib.OPENSSL_sk_pop_free(exts, free_ext)
        if req:
            lib.X509_REQ_free(req)
        if pkey:
            lib.EVP_PKEY_free(pkey)
