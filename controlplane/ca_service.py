"""The mesh CA's gRPC face: ``istio.v1.auth.IstioCertificateService/CreateCertificate``.

A node proxy (ztunnel) sends a CSR for one workload identity, usually with the request
metadata ``ImpersonatedIdentity: spiffe://...``, and authenticates with a bearer token.  The
decision, in order (each refusal is a gRPC status whose message tells the operator what to fix):

1. *Who is calling* (:class:`Authenticator`): Kubernetes mode reviews the service account
   token with a ``TokenReview`` (:class:`TokenReviewAuthenticator`); local mode checks an
   HMAC-signed node token minted by the control plane (:class:`LocalTokenAuthenticator`).
   Failure: ``UNAUTHENTICATED`` (or ``UNAVAILABLE`` if the token cannot be checked now).
2. *Is the CSR acceptable* (:func:`validate_csr`): PEM PKCS#10, valid self-signature,
   ECDSA P-256 or RSA >= 2048, exactly one SAN which is a URI SPIFFE ID in our trust domain.
   Failure: ``INVALID_ARGUMENT``.
3. *May the caller have that identity* (:func:`authorize`): without impersonation only its
   own; with it only if the caller is a trusted node proxy (``CA_TRUSTED_NODE_ACCOUNTS``,
   default ``istio-system/ztunnel``) and a pod with that identity is scheduled on the
   caller's node.  Failure: ``PERMISSION_DENIED``.
4. Sign with ``ambient.ca.CertificateAuthority`` for the requested lifetime, clamped to the
   maximum; answer the chain leaf first, root last.

Roots are published to workloads as the ConfigMap ``istio-ca-root-cert`` (key
``root-cert.pem``) in each namespace (:func:`root_configmap`, :func:`publish_root_configmaps`).

Local node token format (``ambient-node-v1``), three dot-separated parts::

    ambient-node-v1.<base64url(JSON payload)>.<base64url(HMAC-SHA256(secret, part1 "." part2))>

with the payload ``{"node": ..., "ns": ..., "sa": ..., "iat": <unix s>, "exp": <unix s>}``
(base64url without padding).  The secret never leaves the control plane; tokens are written
to files that the node's ztunnel reads as ``AUTH_TOKEN``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import grpc
import kubernetes.client
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ambient.api.istio.v1.auth import ca_pb2, ca_pb2_grpc
from ambient.ca import DEFAULT_TTL, CaError, CertificateAuthority
from ambient.identity import IdentityError, SpiffeId
from controlplane.xds import peer_identity

__all__ = [
    "ROOT_CONFIGMAP",
    "ROOT_CONFIGMAP_KEY",
    "Authenticator",
    "Caller",
    "CertificateService",
    "Denied",
    "LocalTokenAuthenticator",
    "TokenReviewAuthenticator",
    "Unauthenticated",
    "authorize",
    "parse_trusted_accounts",
    "publish_root_configmaps",
    "root_configmap",
    "validate_csr",
]

log = logging.getLogger(__name__)

ROOT_CONFIGMAP = "istio-ca-root-cert"
ROOT_CONFIGMAP_KEY = "root-cert.pem"
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
DEFAULT_TRUSTED_NODE_ACCOUNTS = "istio-system/ztunnel"
MAX_TTL = timedelta(days=90)  # istiod's MAX_WORKLOAD_CERT_TTL default
_SA_PREFIX = "system:serviceaccount:"
_EXTRA_POD = "authentication.kubernetes.io/pod-name"
_EXTRA_NODE = "authentication.kubernetes.io/node-name"
_TOKEN_PREFIX = "ambient-node-v1"
_MIN_RSA_BITS = 2048


@dataclass(frozen=True)
class Caller:
    """An authenticated requester: its service account, and its node when known."""

    namespace: str
    service_account: str
    node: str | None = None
    pod: str | None = None

    def __str__(self) -> str:
        where = f" on node {self.node}" if self.node else ""
        return f"{self.namespace}/{self.service_account}{where}"


class Unauthenticated(Exception):
    """The caller's credentials are missing or wrong."""


class AuthUnavailable(Exception):
    """The credentials cannot be checked right now (the Kubernetes API is unreachable)."""


class Denied(Exception):
    """A refusal with the gRPC status to answer."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Authenticator(Protocol):
    async def authenticate(
        self, metadata: Mapping[str, str], peer_identity: SpiffeId | None
    ) -> Caller: ...


def _bearer(metadata: Mapping[str, str]) -> str:
    raw = metadata.get("authorization", "")
    scheme, _, token = raw.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated(
            "no bearer token in the 'authorization' metadata; ztunnel sends its service account "
            "token (AUTH_TOKEN, audience istio-ca): is the token volume mounted?")
    return token.strip()


# -- Kubernetes mode -----------------------------------------------------------------------


class TokenReviewAuthenticator:
    """Bearer token -> ``TokenReview`` -> ``system:serviceaccount:<ns>:<sa>`` (+ pod, node)."""

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        audiences: Iterable[str] = ("istio-ca",),
        *,
        node_of_pod: Callable[[str, str], str | None] | None = None,
    ) -> None:
        self._api = kubernetes.client.AuthenticationV1Api(api_client)
        self._audiences = list(audiences)
        self._node_of_pod = node_of_pod

    async def authenticate(
        self, metadata: Mapping[str, str], peer_identity: SpiffeId | None
    ) -> Caller:
        token = _bearer(metadata)
        review = kubernetes.client.V1TokenReview(
            api_version="authentication.k8s.io/v1", kind="TokenReview",
            spec=kubernetes.client.V1TokenReviewSpec(token=token, audiences=self._audiences))
        try:
            result = await asyncio.to_thread(self._api.create_token_review, review)
        except Exception as exc:
            raise AuthUnavailable(
                f"cannot review the caller's token with the Kubernetes API: {exc}; does the "
                "control plane's ClusterRole allow create on tokenreviews?") from exc
        status = result.status
        if status is None or not status.authenticated:
            why = (status.error if status is not None else None) or "not authenticated"
            raise Unauthenticated(f"the Kubernetes API rejected the token: {why}")
        if status.audiences and not set(status.audiences) & set(self._audiences):
            raise Unauthenticated(f"token audiences {status.audiences} do not include "
                                  f"{self._audiences}; mount a token with audience istio-ca")
        user = status.user
        username = (user.username if user is not None else None) or ""
        if not username.startswith(_SA_PREFIX) or username.count(":") != 3:
            raise Unauthenticated(f"{username!r} is not a service account; only workloads' "
                                  "service account tokens are accepted")
        ns, sa = username[len(_SA_PREFIX):].split(":")
        extra = (user.extra if user is not None else None) or {}
        pods, nodes = extra.get(_EXTRA_POD) or [], extra.get(_EXTRA_NODE) or []
        pod: str | None = pods[0] if pods else None
        node: str | None = nodes[0] if nodes else None
        if node is None and pod and self._node_of_pod is not None:
            node = self._node_of_pod(ns, pod)
        return Caller(ns, sa, node=node, pod=pod)


# -- local mode ----------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class LocalTokenAuthenticator:
    """HMAC-signed node tokens (format in the module docstring), for the local mesh."""

    def __init__(self, secret: bytes, *, clock: Callable[[], float] = time.time) -> None:
        if len(secret) < 32:
            raise ValueError("the node token secret must be at least 32 bytes")
        self._secret = secret
        self._clock = clock

    def _sign(self, signed_part: str) -> str:
        return _b64(hmac.new(self._secret, signed_part.encode(), hashlib.sha256).digest())

    def mint_token(self, node: str, namespace: str, service_account: str,
                   ttl: timedelta = timedelta(days=1)) -> str:
        """A token for the node proxy ``namespace/service_account`` running on ``node``."""
        now = int(self._clock())
        payload = {"node": node, "ns": namespace, "sa": service_account,
                   "iat": now, "exp": now + int(ttl.total_seconds())}
        signed = f"{_TOKEN_PREFIX}.{_b64(json.dumps(payload, sort_keys=True).encode())}"
        return f"{signed}.{self._sign(signed)}"

    async def authenticate(
        self, metadata: Mapping[str, str], peer_identity: SpiffeId | None
    ) -> Caller:
        token = _bearer(metadata)
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != _TOKEN_PREFIX:
            raise Unauthenticated(f"the token is not an {_TOKEN_PREFIX} node token")
        if not hmac.compare_digest(self._sign(f"{parts[0]}.{parts[1]}"), parts[2]):
            raise Unauthenticated("the node token's signature does not match; it was minted "
                                  "with another secret (re-run the node with a fresh token)")
        try:
            payload = json.loads(_unb64(parts[1]))
            node, ns, sa, exp = (str(payload["node"]), str(payload["ns"]), str(payload["sa"]),
                                 int(payload["exp"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise Unauthenticated(f"the node token's payload is malformed: {exc}") from exc
        if self._clock() >= exp:
            raise Unauthenticated(f"the node token expired at {exp} (unix time); the control "
                                  "plane mints a new one on restart")
        return Caller(ns, sa, node=node or None)


def write_token_file(path: str | os.PathLike[str], token: str) -> None:
    """Write a token file readable only by its owner (what ``AUTH_TOKEN`` points at)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(token)


# -- pure decisions ------------------------------------------------------------------------


def validate_csr(csr_pem: bytes, trust_domain: str) -> SpiffeId:
    """The identity a CSR asks for, after checking it; raises Denied(INVALID_ARGUMENT)."""

    def bad(msg: str) -> Denied:
        return Denied(grpc.StatusCode.INVALID_ARGUMENT, msg)

    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is no ValueError
        raise bad(f"the csr field is not a PEM PKCS#10 certificate request ({exc})") from exc
    try:
        valid = csr.is_signature_valid
    except Exception:  # an unsupported signature algorithm surfaces here
        valid = False
    if not valid:
        raise bad("the CSR's signature does not verify; sign it with the key to be certified")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise bad(f"the CSR uses curve {key.curve.name}; only ECDSA P-256 is accepted")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise bad(f"the CSR has a {key.key_size}-bit RSA key; at least {_MIN_RSA_BITS}")
    else:
        raise bad(f"the CSR has a {type(key).__name__}; use ECDSA P-256")
    try:
        sans = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        raise bad("the CSR has no subjectAltName; it must carry the SPIFFE ID as a URI") from None
    except (ValueError, x509.DuplicateExtension) as exc:  # extensions parse lazily
        raise bad(f"the CSR's extensions are malformed ({exc})") from None
    uris = [s.value for s in sans if isinstance(s, x509.UniformResourceIdentifier)]
    if len(sans) != 1 or len(uris) != 1:
        raise bad(f"the CSR must have exactly one SAN, the SPIFFE ID URI; it has {len(sans)} "
                  f"({len(uris)} URI)")
    try:
        identity = SpiffeId.parse(uris[0])
    except IdentityError as exc:
        raise bad(f"the CSR's URI SAN is not a workload SPIFFE ID: {exc}") from exc
    if identity.trust_domain != trust_domain:
        raise bad(f"the CSR asks for {identity} but this CA serves trust domain "
                  f"{trust_domain!r}; check TRUST_DOMAIN on the requesting proxy")
    return identity


def authorize(
    caller: Caller,
    requested: SpiffeId,
    impersonated: str | None,
    *,
    trusted_node_accounts: frozenset[tuple[str, str]],
    pods_on_node: Callable[[str], set[SpiffeId]],
) -> SpiffeId:
    """The identity to certify for ``caller``, or Denied with the status and the reason."""
    if impersonated is None:
        own = (caller.namespace, caller.service_account)
        if (requested.namespace, requested.service_account) != own:
            raise Denied(grpc.StatusCode.PERMISSION_DENIED,
                         f"caller {caller} asked for {requested}, but without "
                         f"{IMPERSONATED_IDENTITY} a caller only gets its own identity")
        return requested
    try:
        target = SpiffeId.parse(impersonated)
    except IdentityError as exc:
        raise Denied(grpc.StatusCode.INVALID_ARGUMENT,
                     f"{IMPERSONATED_IDENTITY} is not a SPIFFE ID: {exc}") from exc
    if target != requested:
        raise Denied(grpc.StatusCode.INVALID_ARGUMENT,
                     f"{IMPERSONATED_IDENTITY} {target} differs from the CSR's SAN {requested}")
    if (caller.namespace, caller.service_account) not in trusted_node_accounts:
        trusted = ",".join(sorted(f"{n}/{s}" for n, s in trusted_node_accounts))
        raise Denied(grpc.StatusCode.PERMISSION_DENIED,
                     f"caller {caller} may not impersonate {target}: it is not a trusted node "
                     f"proxy (CA_TRUSTED_NODE_ACCOUNTS={trusted})")
    if not caller.node:
        raise Denied(grpc.StatusCode.PERMISSION_DENIED,
                     f"caller {caller} asked for {target} but its token names no node; use a "
                     "bound service account token (it carries the pod and node names)")
    if target not in pods_on_node(caller.node):
        raise Denied(grpc.StatusCode.PERMISSION_DENIED,
                     f"ztunnel on node {caller.node} asked for {target} but no pod with that "
                     f"identity runs on {caller.node}")
    return target


def parse_trusted_accounts(raw: str = DEFAULT_TRUSTED_NODE_ACCOUNTS) -> frozenset[tuple[str, str]]:
    """``CA_TRUSTED_NODE_ACCOUNTS``: comma-separated ``<namespace>/<service account>``."""
    out = set()
    for item in filter(None, (p.strip() for p in raw.split(","))):
        ns, sep, sa = item.partition("/")
        if not sep or not ns or not sa or "/" in sa:
            raise ValueError(f"CA_TRUSTED_NODE_ACCOUNTS entry {item!r}: expected namespace/name")
        out.add((ns, sa))
    return frozenset(out)


def clamp_ttl(requested_s: int, default: timedelta, maximum: timedelta) -> timedelta:
    """Requested lifetime in seconds (0 or negative: the default), at most ``maximum``."""
    ttl = timedelta(seconds=requested_s) if requested_s > 0 else default
    return min(ttl, maximum)


# -- the servicer --------------------------------------------------------------------------


class CertificateService(ca_pb2_grpc.IstioCertificateServiceServicer):
    """grpc.aio servicer for ``CreateCertificate``; register with :meth:`add_to_server`."""

    def __init__(
        self,
        ca: CertificateAuthority,
        authenticator: Authenticator,
        pods_on_node: Callable[[str], set[SpiffeId]],
        *,
        trusted_node_accounts: frozenset[tuple[str, str]] | None = None,
        default_ttl: timedelta = DEFAULT_TTL,
        max_ttl: timedelta = MAX_TTL,
    ) -> None:
        self.ca = ca
        self.authenticator = authenticator
        self.pods_on_node = pods_on_node
        self.trusted = (parse_trusted_accounts() if trusted_node_accounts is None
                        else trusted_node_accounts)
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl

    def add_to_server(self, server: grpc.aio.Server) -> None:
        ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(self, server)

    async def CreateCertificate(  # noqa: N802 - the gRPC method name
        self, request: ca_pb2.IstioCertificateRequest, context: grpc.aio.ServicerContext
    ) -> ca_pb2.IstioCertificateResponse:
        metadata = {k.lower(): v for k, v in (context.invocation_metadata() or ())
                    if isinstance(v, str)}
        try:
            peer = peer_identity(context.auth_context() or {})
            chain = await self._create(request, metadata, peer)
        except Unauthenticated as exc:
            log.warning("CA: refused an unauthenticated request: %s", exc)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        except AuthUnavailable as exc:
            log.warning("CA: %s", exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except Denied as exc:
            log.warning("CA: refused: %s", exc)
            await context.abort(exc.code, str(exc))
        except CaError as exc:
            log.error("CA: cannot sign: %s", exc)
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
        return ca_pb2.IstioCertificateResponse(cert_chain=chain)

    async def _create(self, request: ca_pb2.IstioCertificateRequest,
                      metadata: Mapping[str, str], peer: SpiffeId | None) -> list[str]:
        caller = await self.authenticator.authenticate(metadata, peer)
        requested = validate_csr(request.csr.encode(), self.ca.trust_domain)
        impersonated: Any = None
        if request.HasField("metadata") and IMPERSONATED_IDENTITY in request.metadata.fields:
            impersonated = request.metadata[IMPERSONATED_IDENTITY]
            if not isinstance(impersonated, str):
                raise Denied(grpc.StatusCode.INVALID_ARGUMENT,
                             f"{IMPERSONATED_IDENTITY} must be a string")
        identity = authorize(caller, requested, impersonated,
                             trusted_node_accounts=self.trusted, pods_on_node=self.pods_on_node)
        ttl = clamp_ttl(request.validity_duration, self.default_ttl, self.max_ttl)
        chain = self.ca.sign_csr(request.csr.encode(), identity, ttl)
        log.info("CA: signed %s for %s (ttl %s)", identity, caller, ttl)
        return chain


# -- root publication ----------------------------------------------------------------------


def root_configmap(namespace: str, roots_pem: bytes) -> dict[str, Any]:
    """The ``istio-ca-root-cert`` ConfigMap for ``namespace``."""
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": ROOT_CONFIGMAP, "namespace": namespace,
                         "labels": {"istio.io/config": "true"}},
            "data": {ROOT_CONFIGMAP_KEY: roots_pem.decode()}}


def publish_root_configmaps(
    api_client: kubernetes.client.ApiClient, namespaces: Iterable[str], roots_pem: bytes
) -> list[str]:
    """Create or fix ``istio-ca-root-cert`` in each namespace; returns the ones written.

    Blocking (the ``kubernetes`` client); call it from a thread on an event loop.
    """
    api = kubernetes.client.CoreV1Api(api_client)
    written = []
    for ns in namespaces:
        want = root_configmap(ns, roots_pem)
        try:
            current = api.read_namespaced_config_map(ROOT_CONFIGMAP, ns)
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:
                raise
            meta = want["metadata"]
            api.create_namespaced_config_map(ns, kubernetes.client.V1ConfigMap(
                api_version="v1", kind="ConfigMap", data=want["data"],
                metadata=kubernetes.client.V1ObjectMeta(
                    name=meta["name"], namespace=ns, labels=meta["labels"])))
            written.append(ns)
            continue
        if (current.data or {}).get(ROOT_CONFIGMAP_KEY) != want["data"][ROOT_CONFIGMAP_KEY]:
            api.patch_namespaced_config_map(ROOT_CONFIGMAP, ns, {"data": want["data"]})
            written.append(ns)
    return written
