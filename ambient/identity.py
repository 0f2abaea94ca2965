"""SPIFFE workload identities: ``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``.

This is the one parser for identities that arrive from untrusted places (certificate URI SANs,
CSRs, xDS, PROXY-protocol TLVs). It is deliberately strict: anything that is not exactly the
Istio form is refused with an ``IdentityError`` that names the offending part, so that an
operator reading a log line knows which certificate or resource to fix.

Invariants: a ``SpiffeId`` always round-trips (``SpiffeId.parse(str(x)) == x``), and its
fields are already validated, so code holding one never re-checks it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["DEFAULT_TRUST_DOMAIN", "IdentityError", "SpiffeId"]

DEFAULT_TRUST_DOMAIN = "cluster.local"

_SCHEME = "spiffe://"
# SPIFFE ID spec: trust domain = lowercase letters, digits, '.', '-', '_'; at most 255 bytes.
_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]+")
_TRUST_DOMAIN_MAX = 255
# Kubernetes: a namespace is a DNS-1123 label, a service account a DNS-1123 subdomain.
_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_SUBDOMAIN_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_MAX = 63
_SUBDOMAIN_MAX = 253


class IdentityError(ValueError):
    """A string is not a valid Istio SPIFFE workload identity."""


def _check_trust_domain(td: str, uri: str) -> None:
    if not td:
        raise IdentityError(f"{uri!r}: the trust domain is empty")
    if len(td) > _TRUST_DOMAIN_MAX:
        raise IdentityError(f"{uri!r}: the trust domain is longer than {_TRUST_DOMAIN_MAX} chars")
    if "@" in td:
        raise IdentityError(f"{uri!r}: user info ('user@') is not allowed in a SPIFFE ID")
    if ":" in td:
        raise IdentityError(f"{uri!r}: a port is not allowed in the trust domain")
    if not _TRUST_DOMAIN_RE.fullmatch(td):
        raise IdentityError(
            f"{uri!r}: trust domain {td!r} may only contain lowercase letters, digits, "
            "'.', '-' and '_' (check TRUST_DOMAIN / meshConfig.trustDomain)"
        )


def _check_name(kind: str, value: str, uri: str) -> None:
    if kind == "namespace":
        ok = len(value) <= _LABEL_MAX and _LABEL_RE.fullmatch(value) is not None
        rule = "a DNS-1123 label (lowercase letters, digits, '-', at most 63 chars)"
    else:
        ok = len(value) <= _SUBDOMAIN_MAX and _SUBDOMAIN_RE.fullmatch(value) is not None
        rule = "a DNS-1123 subdomain (lowercase letters, digits, '-', '.', at most 253 chars)"
    if not value:
        raise IdentityError(f"{uri!r}: the {kind} is empty")
    if not ok:
        raise IdentityError(f"{uri!r}: {kind} {value!r} is not {rule}")


@dataclass(frozen=True, order=True)
class SpiffeId:
    """An Istio workload identity; construct with ``parse`` or with already-valid parts."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        # Validate direct construction too, so every SpiffeId in the process is well formed.
        uri = f"{_SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"
        _check_trust_domain(self.trust_domain, uri)
        _check_name("namespace", self.namespace, uri)
        _check_name("service account", self.service_account, uri)

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse ``spiffe://<td>/ns/<ns>/sa/<sa>`` strictly; raise ``IdentityError`` if not."""
        if not isinstance(uri, str):
            raise IdentityError(f"a SPIFFE ID must be a string, got {type(uri).__name__}")
        if not uri:
            raise IdentityError("the SPIFFE ID is empty")
        if not uri.startswith(_SCHEME):
            scheme = uri.split(":", 1)[0] if ":" in uri else ""
            if scheme.lower() == "spiffe" and uri[len(scheme) :].startswith("://"):
                raise IdentityError(f"{uri!r}: the scheme must be lowercase 'spiffe://'")
            raise IdentityError(f"{uri!r}: not a SPIFFE ID (must start with 'spiffe://')")
        if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in uri):
            raise IdentityError(f"{uri!r}: whitespace or control characters are not allowed")
        if "?" in uri:
            raise IdentityError(f"{uri!r}: a query ('?...') is not allowed in a SPIFFE ID")
        if "#" in uri:
            raise IdentityError(f"{uri!r}: a fragment ('#...') is not allowed in a SPIFFE ID")
        if "%" in uri:
            raise IdentityError(f"{uri!r}: percent-encoding is not allowed in a SPIFFE ID")
        rest = uri[len(_SCHEME) :]
        td, sep, path = rest.partition("/")
        _check_trust_domain(td, uri)
        if not sep or not path:
            raise IdentityError(
                f"{uri!r}: missing workload path; expected spiffe://{td}/ns/<namespace>/sa/<sa>"
            )
        parts = path.split("/")
        if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
            raise IdentityError(
                f"{uri!r}: the path must be exactly /ns/<namespace>/sa/<service-account>"
            )
        return cls(td, parts[1], parts[3])

    def __str__(self) -> str:
        return f"{_SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def uri(self) -> str:
        """The identity as a URI string (same as ``str(self)``)."""
        return str(self)
