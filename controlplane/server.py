"""The control plane's gRPC server: delta ADS (and any extra services) on 15010 and 15012.

One ``grpc.aio`` server hosts every control-plane service, like istiod:

- ``15010`` plaintext xDS, bound to ``127.0.0.1`` by default (local use; callers are
  anonymous, as on istiod's plaintext port).
- ``15012`` TLS, for xDS and the CA (``IstioCertificateService``, added by its module through
  :meth:`ControlPlaneServer.add_servicer`).  The server presents a certificate for
  ``spiffe://<td>/ns/istio-system/sa/istiod`` with the DNS SAN ``istiod.istio-system.svc``
  (what ztunnel checks, or ``ALT_XDS_HOSTNAME``), signed by the mesh CA.

Client certificates on 15012 (decided as istiod does it): istiod accepts TLS without a client
certificate and authenticates the ``authorization: Bearer`` token (ztunnel never presents a
certificate to istiod).  grpcio cannot *request* a certificate without *requiring* it, so
``client_auth`` picks one of the two halves of istiod's "verify if given":

- ``"none"`` (default): no client certificate is asked for; the ``authenticator`` decides from
  the metadata (a TokenReview-based one in Kubernetes, :func:`allow_all` in local mode).
- ``"require"``: a client certificate chaining to the mesh root is required and its SPIFFE ID
  is the caller (:func:`~controlplane.xds.client_certificate`), for mTLS-only deployments.

The serving certificate is issued once at start with a long lifetime (bounded by the CA's);
restart the control plane after rotating the CA.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import grpc

from ambient.api.envoy.service.discovery.v3 import ads_pb2_grpc
from ambient.ca import CertificateAuthority
from ambient.identity import SpiffeId
from controlplane.cache import SnapshotCache
from controlplane.xds import AdsServicer, Authenticator, allow_all, client_certificate

__all__ = [
    "DEFAULT_PLAIN_ADDR",
    "DEFAULT_TLS_ADDR",
    "ISTIOD_DNS_NAMES",
    "ControlPlaneServer",
    "ServerCertificate",
    "ServerError",
    "istiod_certificate",
]

log = logging.getLogger("controlplane.server")

DEFAULT_PLAIN_ADDR = "127.0.0.1:15010"
DEFAULT_TLS_ADDR = "0.0.0.0:15012"
ISTIOD_DNS_NAMES = ("istiod.istio-system.svc",)
_SERVER_TTL = timedelta(days=365)

ClientAuth = Literal["none", "require"]


class ServerError(Exception):
    """The server cannot start; the message says what to change."""


@dataclass(frozen=True)
class ServerCertificate:
    chain_pem: bytes  # leaf first, then intermediates
    key_pem: bytes
    roots_pem: bytes
    identity: SpiffeId
    dns_names: tuple[str, ...]


def istiod_certificate(
    ca: CertificateAuthority,
    *,
    namespace: str = "istio-system",
    service_account: str = "istiod",
    dns_names: Sequence[str] = ISTIOD_DNS_NAMES,
    ttl: timedelta = _SERVER_TTL,
    now: datetime | None = None,
) -> ServerCertificate:
    """A serving certificate for the control plane: istiod's SPIFFE ID plus DNS SANs."""
    identity = SpiffeId(ca.trust_domain, namespace, service_account)
    cert = ca.issue(identity, ttl, now=now, dns_names=tuple(dns_names))
    return ServerCertificate(
        chain_pem=b"".join(cert.chain_pem),  # leaf first, then intermediates (no root)
        key_pem=cert.key_pem,
        roots_pem=ca.roots_pem,
        identity=identity,
        dns_names=tuple(dns_names),
    )


ServicerHook = Callable[[grpc.aio.Server], None]


class ControlPlaneServer:
    """Hosts ADS plus extra servicers on a plaintext and/or a TLS address."""

    def __init__(
        self,
        cache: SnapshotCache,
        *,
        plain_addr: str | None = DEFAULT_PLAIN_ADDR,
        tls_addr: str | None = None,
        ca: CertificateAuthority | None = None,
        authenticator: Authenticator | None = None,
        client_auth: ClientAuth = "none",
        dns_names: Sequence[str] = ISTIOD_DNS_NAMES,
        control_plane_id: str = "ambient",
    ) -> None:
        if plain_addr is None and tls_addr is None:
            raise ServerError("neither a plaintext nor a TLS address is set; nothing to serve")
        if tls_addr is not None and ca is None:
            raise ServerError(f"TLS on {tls_addr} needs the mesh CA (--ca-dir) to issue the "
                              "server certificate")
        if client_auth not in ("none", "require"):
            raise ServerError(f"client_auth={client_auth!r}: expected 'none' or 'require'")
        if authenticator is None:
            authenticator = client_certificate if client_auth == "require" else allow_all
        self.cache = cache
        self.plain_addr = plain_addr
        self.tls_addr = tls_addr
        self.ca = ca
        self.client_auth = client_auth
        self.dns_names = tuple(dns_names)
        self.ads = AdsServicer(cache, authenticator, control_plane_id=control_plane_id)
        self.certificate: ServerCertificate | None = None
        self.plain_port: int | None = None
        self.tls_port: int | None = None
        self._hooks: list[ServicerHook] = []
        self._server: grpc.aio.Server | None = None

    def add_servicer(self, hook: ServicerHook) -> None:
        """Register ``hook(server)`` to add another service (call before :meth:`start`)."""
        if self._server is not None:
            raise ServerError("add_servicer must be called before start()")
        self._hooks.append(hook)

    async def start(self) -> None:
        server = grpc.aio.server(options=[
            ("grpc.so_reuseport", 0),  # a second control plane on the same port is an error
            ("grpc.max_send_message_length", -1),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ])
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self.ads, server)
        for hook in self._hooks:
            hook(server)
        if self.plain_addr is not None:
            self.plain_port = self._bind(server.add_insecure_port, self.plain_addr, "plaintext")
        if self.tls_addr is not None:
            assert self.ca is not None
            self.certificate = cert = istiod_certificate(self.ca, dns_names=self.dns_names)
            creds = grpc.ssl_server_credentials(
                [(cert.key_pem, cert.chain_pem)],
                root_certificates=cert.roots_pem if self.client_auth == "require" else None,
                require_client_auth=self.client_auth == "require",
            )
            self.tls_port = self._bind(lambda a: server.add_secure_port(a, creds),
                                       self.tls_addr, "TLS")
        await server.start()
        self._server = server
        log.info("control plane serving xDS: plaintext %s, TLS %s (client certificates: %s)",
                 self._where(self.plain_addr, self.plain_port),
                 self._where(self.tls_addr, self.tls_port), self.client_auth)

    @staticmethod
    def _bind(add: Callable[[str], int], addr: str, what: str) -> int:
        try:
            port = add(addr)
        except RuntimeError as e:
            raise ServerError(f"cannot listen on {addr} ({what}): {e}; is another control "
                              "plane running, or the address not on this host?") from None
        if not port:
            raise ServerError(f"cannot listen on {addr} ({what}); is the port in use?")
        return port

    @staticmethod
    def _where(addr: str | None, port: int | None) -> str:
        if addr is None:
            return "off"
        return f"{addr.rpartition(':')[0]}:{port}"

    async def stop(self, grace: float | None = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
