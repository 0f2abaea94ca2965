"""Per-identity workload certificates held by a node proxy (ztunnel's SecretManager role).

A node proxy serves many identities (one per service account with pods on the node).  The
``CertificateManager`` fetches a certificate on first use (concurrent callers share one fetch),
caches it together with the SSL contexts built from it, and refreshes it at half its lifetime.
If a refresh fails it keeps the old certificate until that expires and retries with
exponential backoff (capped at 150 s, like ztunnel).  An expired certificate is dropped so the
next use fetches afresh.  Live connections are never touched: they hold their own SSL object,
and a rotation only changes what *new* handshakes use.

Time comes from an injected clock; ``refresh_due()`` runs one rotation pass, so tests can drive
rotation deterministically without sleeping.

Providers: ``LocalCaProvider`` signs in-process (FAKE_CA / local mode); ``GrpcCaProvider`` asks
the mesh CA over ``istio.v1.auth.IstioCertificateService/CreateCertificate`` like ztunnel: a
fresh ECDSA P-256 key and CSR per fetch, ``ImpersonatedIdentity`` request metadata, the bearer
token re-read from its file on every call (projected tokens rotate), the ``clusterid`` header,
and the returned chain (leaf first, root last) verified before it is used.  The call goes
through ``ambient.grpclite`` (no grpcio in the proxies' processes); its connection is closed
after a minute without calls.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from . import tls, x509lite
from .api.istio.v1.auth import ca_pb2
from .grpclite import Channel, GrpcError, client_tls_context
from .identity import SpiffeId
from .workloadcert import (
    DEFAULT_TTL,
    CaError,
    WorkloadCertificate,
    split_pem,
    workload_certificate_from_chain,
)

if TYPE_CHECKING:  # the CA (and ``cryptography``) is loaded only where it signs locally
    from .ca import CertificateAuthority

__all__ = [
    "CertificateError",
    "CertificateManager",
    "CertificateProvider",
    "GrpcCaProvider",
    "LocalCaProvider",
    "utcnow",
    "verify_chain",
]

log = logging.getLogger(__name__)

CA_METHOD = "/istio.v1.auth.IstioCertificateService/CreateCertificate"

_MAX_SLEEP = 30.0  # re-read the clock at least this often (wall-clock jumps, suspend)


def utcnow() -> datetime:
    return datetime.now(UTC)


class CertificateError(Exception):
    """No usable certificate for an identity; the message carries the CA's error."""


class CertificateProvider(Protocol):
    """Where certificates come from: the mesh CA over gRPC, or a local CA."""

    async def fetch(self, identity: SpiffeId) -> WorkloadCertificate: ...


class LocalCaProvider:
    """Issues certificates from an in-process CA (ztunnel's local / FAKE_CA mode, tests)."""

    def __init__(self, ca: CertificateAuthority, ttl: timedelta = DEFAULT_TTL) -> None:
        self.ca = ca
        self.ttl = ttl

    async def fetch(self, identity: SpiffeId) -> WorkloadCertificate:
        # Key generation and signing take ~1 ms; not worth a thread hop.
        return self.ca.issue(identity, self.ttl)


def token_is_path(auth_token: str | None) -> bool:
    """``AUTH_TOKEN`` names a file (re-read at each use) when it contains ``/`` or names an
    existing file; otherwise it is the token itself.  One rule for the CA and xDS clients."""
    return bool(auth_token) and ("/" in str(auth_token) or os.path.exists(str(auth_token)))


def read_token(path: str) -> str:
    """The bearer token in ``path`` (``AUTH_TOKEN``), with an error saying what to mount."""
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise OSError(f"cannot read the token from {path} (AUTH_TOKEN): {exc}; is the "
                      "projected service account token (audience istio-ca) mounted there?"
                      ) from exc


def load_roots(root_ca: str, setting: str) -> bytes | None:
    """The PEM roots a ``*_ROOT_CA`` setting names: ``SYSTEM`` (None: the system store),
    inline PEM, or a file (re-read at each call).  One rule for the CA and xDS clients."""
    if root_ca == "SYSTEM":
        return None
    if "-----BEGIN CERTIFICATE-----" in root_ca:
        return root_ca.encode()
    try:
        return Path(root_ca).read_bytes()
    except OSError as e:
        raise OSError(f"{setting}={root_ca!r}: {e}; mount the mesh root (ConfigMap "
                      "istio-ca-root-cert) there, or set SYSTEM") from e


def grpc_ca_provider(
    target: str,
    plaintext: bool,
    root_ca: str,
    auth_token: str | None,
    cluster_id: str,
    *,
    ttl: timedelta = DEFAULT_TTL,
    alt_hostname: str | None = None,
    headers: Mapping[str, str] | None = None,
    impersonate: bool = True,
) -> GrpcCaProvider:
    """A :class:`GrpcCaProvider` from the proxies' settings, as Istio reads them:
    ``CA_ROOT_CA`` is a file, ``SYSTEM`` (the system store) or inline PEM; ``AUTH_TOKEN`` is
    a path (re-read on every call) when it contains ``/`` or names a file, else the token."""
    root = None if plaintext else load_roots(root_ca, "CA_ROOT_CA") or b""  # b"": system
    is_path = token_is_path(auth_token)
    return GrpcCaProvider(target, root, auth_token if is_path else None, cluster_id, ttl=ttl,
                          alt_hostname=alt_hostname, headers=headers, impersonate=impersonate,
                          token=None if is_path else auth_token)


class GrpcCaProvider:
    """Fetches certificates from the mesh CA (istiod or our control plane) over gRPC.

    ``root_ca_pem`` is the CA server's TLS root (``CA_ROOT_CA``); ``None`` means plaintext
    (tests, the local mesh's loopback CA); ``b""`` means the system roots.  ``token_path``
    (``AUTH_TOKEN``) is read on every call; ``token`` is a fixed token instead; with neither,
    no token is sent.  ``headers`` are extra metadata (``CA_HEADER_*``).
    """

    def __init__(
        self,
        address: str,
        root_ca_pem: bytes | None,
        token_path: str | None,
        cluster_id: str = "Kubernetes",
        *,
        ttl: timedelta = DEFAULT_TTL,
        alt_hostname: str | None = None,
        headers: Mapping[str, str] | None = None,
        impersonate: bool = True,
        timeout: timedelta = timedelta(seconds=10),
        token: str | None = None,
    ) -> None:
        self.address = address
        self._token = token
        self._root_ca_pem = root_ca_pem
        self._token_path = token_path
        self._cluster_id = cluster_id
        self._ttl = ttl
        self._alt_hostname = alt_hostname
        self._headers = dict(headers or {})
        self._impersonate = impersonate
        self._timeout = timeout.total_seconds()
        self._channel: Channel | None = None

    def _get_channel(self) -> Channel:
        # One connection, dialled on the first call and again after it drops (the CA's
        # restart); CertificateManager owns the retry backoff.  Closed when idle: calls are
        # hours apart, and an open TLS connection holds buffers.
        if self._channel is None:
            tls = None
            if self._root_ca_pem is not None:
                tls = client_tls_context(self._root_ca_pem or None)
            self._channel = Channel(self.address, tls=tls, server_hostname=self._alt_hostname,
                                    idle_timeout=60.0)
        return self._channel

    def _metadata(self) -> list[tuple[str, str]]:
        md = [("clusterid", self._cluster_id)]
        md += [(k.lower(), v) for k, v in self._headers.items()]
        if self._token_path is not None:
            try:
                token = read_token(self._token_path)
            except OSError as exc:
                raise CertificateError(str(exc)) from exc
            md.append(("authorization", f"Bearer {token}"))
        elif self._token:
            md.append(("authorization", f"Bearer {self._token}"))
        return md

    async def fetch(self, identity: SpiffeId) -> WorkloadCertificate:
        key_pem, csr_pem = x509lite.new_key_and_csr(str(identity))
        request = ca_pb2.IstioCertificateRequest(
            csr=csr_pem.decode(),
            validity_duration=int(self._ttl.total_seconds()),
        )
        if self._impersonate:
            meta = struct_pb2.Struct()
            meta["ImpersonatedIdentity"] = str(identity)
            request.metadata.CopyFrom(meta)
        try:
            raw = await self._get_channel().unary(
                CA_METHOD, request.SerializeToString(), metadata=self._metadata(),
                timeout=self._timeout)
            response = ca_pb2.IstioCertificateResponse.FromString(raw)
        except GrpcError as exc:
            raise CertificateError(
                f"the CA at {self.address} answered {exc.code.name}: {exc.details}"
            ) from exc
        except DecodeError as exc:
            raise CertificateError(f"the CA at {self.address} sent a response that is not an "
                                   f"IstioCertificateResponse: {exc}") from exc
        try:
            cert = workload_certificate_from_chain(identity, key_pem, list(response.cert_chain))
        except CaError as exc:
            raise CertificateError(f"the CA at {self.address} sent an unusable chain: {exc}") \
                from exc
        verify_chain(cert)
        return cert

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = None


def verify_chain(cert: WorkloadCertificate, now: datetime | None = None) -> None:
    """Check that the leaf chains to one of the roots and every link is valid now.

    Raises ``CertificateError`` naming the broken link (a CA answering with a chain from
    another PKI, or an expired intermediate, is caught here rather than at the first handshake).
    """
    now = now or utcnow()
    try:
        chain = [x509lite.parse_pem(p) for p in cert.chain_pem]
        roots = [x509lite.parse_pem(p) for p in split_pem(cert.roots_pem)]
    except x509lite.CertificateParseError as exc:
        raise CertificateError(f"certificate chain for {cert.identity} does not parse: {exc}") \
            from exc
    for c in chain:
        if not c.not_before - timedelta(minutes=5) <= now < c.not_after:
            raise CertificateError(
                f"certificate {c.subject or cert.identity} in the chain for {cert.identity} "
                f"is not valid now (valid {c.not_before.isoformat()} to "
                f"{c.not_after.isoformat()}); check the clocks and the CA")
    for child, parent in zip(chain, chain[1:], strict=False):
        if not x509lite.issued_by(child, parent):
            raise CertificateError(f"the chain for {cert.identity} is out of order: a "
                                   "certificate is not signed by the next one")
    if not any(x509lite.issued_by(chain[-1], root) for root in roots):
        raise CertificateError(f"the chain for {cert.identity} does not lead to any of the "
                               f"{len(roots)} root(s) the CA sent")


@dataclass
class _Entry:
    cert: WorkloadCertificate | None = None
    error: str | None = None
    inflight: asyncio.Task[WorkloadCertificate] | None = None
    due: datetime | None = None  # next refresh attempt; None = nothing scheduled
    backoff: timedelta | None = None
    contexts: dict[str, ssl.SSLContext] = field(default_factory=dict)


class CertificateManager:
    """Fetches, caches and rotates workload certificates, one per identity."""

    def __init__(
        self,
        provider: CertificateProvider,
        *,
        clock: Callable[[], datetime] = utcnow,
        min_backoff: timedelta = timedelta(seconds=1),
        max_backoff: timedelta = timedelta(seconds=150),
        fetch_timeout: timedelta = timedelta(seconds=60),
    ) -> None:
        self._provider = provider
        self._fetch_timeout = fetch_timeout.total_seconds()
        self._clock = clock
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._entries: dict[SpiffeId, _Entry] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- fetching -----------------------------------------------------------------------

    async def get(self, identity: SpiffeId) -> WorkloadCertificate:
        """The current certificate for ``identity``, fetching it if there is none (or expired).

        Raises ``CertificateError`` if the fetch fails.
        """
        entry = self._entries.setdefault(identity, _Entry())
        self._drop_if_expired(identity, entry)
        if entry.cert is not None:
            return entry.cert
        task = self._start_fetch(identity, entry)
        # shield: one caller giving up (connection closed) must not cancel the shared fetch.
        await asyncio.shield(task)
        if entry.cert is None:  # forgotten meanwhile, or a later refresh dropped it
            return task.result()
        return entry.cert

    def prefetch(self, identity: SpiffeId) -> None:
        """Start fetching ``identity`` in the background (e.g. a new SA appeared on the node)."""
        entry = self._entries.setdefault(identity, _Entry())
        if entry.cert is None:
            self._start_fetch(identity, entry)

    def forget(self, identity: SpiffeId) -> None:
        """Stop holding and rotating ``identity`` (its last pod left the node)."""
        self._entries.pop(identity, None)

    def _start_fetch(self, identity: SpiffeId, entry: _Entry) -> asyncio.Task[WorkloadCertificate]:
        if entry.inflight is None:
            entry.inflight = asyncio.get_running_loop().create_task(
                self._fetch(identity, entry), name=f"cert-fetch {identity}"
            )
            # Background fetches may have no awaiter; their errors live in the entry.
            entry.inflight.add_done_callback(_consume_exception)
        return entry.inflight

    async def _fetch(self, identity: SpiffeId, entry: _Entry) -> WorkloadCertificate:
        try:
            try:
                cert = await asyncio.wait_for(
                    self._provider.fetch(identity), self._fetch_timeout
                )
                _check(cert, identity)
            except asyncio.CancelledError:
                raise
            except TimeoutError as exc:
                msg = f"no answer from the CA within {self._fetch_timeout:g}s"
                self._on_failure(identity, entry, TimeoutError(msg))
                raise CertificateError(f"cannot get a certificate for {identity}: {msg}; is "
                                       "the CA address (CA_ADDRESS) reachable?") from exc
            except Exception as exc:
                self._on_failure(identity, entry, exc)
                raise CertificateError(
                    f"cannot get a certificate for {identity}: {exc}; is the CA (istiod) "
                    "reachable and does it allow this node to request this identity?"
                ) from exc
            self._on_success(identity, entry, cert)
            return cert
        finally:
            entry.inflight = None

    def _on_success(self, identity: SpiffeId, entry: _Entry, cert: WorkloadCertificate) -> None:
        rotated = entry.cert is not None
        entry.cert = cert
        entry.error = None
        entry.backoff = None
        entry.contexts = {}  # built lazily from the new cert; old contexts live on in conns
        # Half-life, but never in the past: a short-TTL cert whose not_before is backdated
        # could otherwise have its midpoint behind us and be re-fetched in a tight loop.
        now = self._clock()
        due = cert.refresh_at()
        entry.due = due if due > now else now + (cert.not_after - now) / 2
        log.info("%s certificate for %s (serial %x, expires %s)",
                 "rotated" if rotated else "fetched", identity, cert.serial_number,
                 cert.not_after.isoformat())
        self._wake.set()

    def _on_failure(self, identity: SpiffeId, entry: _Entry, exc: BaseException) -> None:
        entry.error = str(exc) or type(exc).__name__
        prev = entry.backoff
        entry.backoff = self._min_backoff if prev is None else min(prev * 2, self._max_backoff)
        entry.due = self._clock() + entry.backoff
        keeping = entry.cert is not None and not entry.cert.is_expired(self._clock())
        log.warning("certificate fetch for %s failed: %s; %s, retrying in %ss", identity,
                    entry.error, "keeping the current certificate" if keeping else "no certificate",
                    entry.backoff.total_seconds())
        self._wake.set()

    def _drop_if_expired(self, identity: SpiffeId, entry: _Entry) -> None:
        if entry.cert is not None and entry.cert.is_expired(self._clock()):
            log.warning("certificate for %s expired at %s; dropping it and fetching a new one",
                        identity, entry.cert.not_after.isoformat())
            entry.cert = None
            entry.contexts = {}
            entry.due = self._clock()

    # -- SSL contexts -------------------------------------------------------------------

    def server_context(self, identity: SpiffeId) -> ssl.SSLContext:
        """Cached server context for the current certificate (``get`` it first)."""
        return self._context(identity, "server")

    def client_context(self, identity: SpiffeId) -> ssl.SSLContext:
        """Cached client context for the current certificate (``get`` it first)."""
        return self._context(identity, "client")

    async def server_ctx(self, identity: SpiffeId) -> ssl.SSLContext:
        await self.get(identity)
        return self.server_context(identity)

    async def client_ctx(self, identity: SpiffeId) -> ssl.SSLContext:
        await self.get(identity)
        return self.client_context(identity)

    def _context(self, identity: SpiffeId, side: str) -> ssl.SSLContext:
        entry = self._entries.get(identity)
        if entry is not None:
            self._drop_if_expired(identity, entry)
        if entry is None or entry.cert is None:
            raise CertificateError(
                f"no certificate for {identity} yet; await get() / server_ctx() first"
            )
        ctx = entry.contexts.get(side)
        if ctx is None:
            build = tls.server_context if side == "server" else tls.client_context
            ctx = entry.contexts[side] = build(entry.cert)
        return ctx

    # -- rotation -----------------------------------------------------------------------

    async def refresh_due(self) -> None:
        """One rotation pass: refresh every identity whose time has come, and wait for it."""
        work = self._start_due()
        if work:
            # Failures are recorded in the entries (and logged); nothing to raise here.
            await asyncio.gather(*work, return_exceptions=True)

    def _start_due(self) -> list[asyncio.Task[WorkloadCertificate]]:
        now = self._clock()
        work = []
        for identity, entry in list(self._entries.items()):
            self._drop_if_expired(identity, entry)
            if entry.due is not None and entry.due <= now:
                entry.due = None  # _fetch reschedules on success or failure
                work.append(self._start_fetch(identity, entry))
        return work

    def next_due(self) -> datetime | None:
        """The earliest scheduled refresh, if any."""
        dues = [e.due for e in self._entries.values() if e.due is not None]
        return min(dues, default=None)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            # Don't wait for the fetches: a slow CA call for one identity must not delay the
            # others.  Each fetch wakes us when it finishes and reschedules its identity.
            self._start_due()
            due = self.next_due()
            delay = _MAX_SLEEP
            if due is not None:
                delay = min(max((due - self._clock()).total_seconds(), 0.0), _MAX_SLEEP)
            # Not asyncio.wait_for: on Python 3.11 it swallows a cancel that races with the
            # event being set, and stop() would then wait forever for this task.
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({waiter}, timeout=delay)
            finally:
                waiter.cancel()

    def start(self) -> None:
        """Start the background rotation task on the running loop."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="cert-rotation")

    async def stop(self) -> None:
        """Stop rotation and cancel in-flight fetches."""
        tasks = [t for t in (self._task, *(e.inflight for e in self._entries.values())) if t]
        self._task = None
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def wake(self) -> None:
        """Re-evaluate refresh times now (e.g. after a test advanced the clock)."""
        self._wake.set()

    async def __aenter__(self) -> CertificateManager:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- admin ------------------------------------------------------------------------

    def dump(self) -> list[dict[str, Any]]:
        """The admin ``/config_dump`` "certificates" section."""
        out = []
        for identity in sorted(self._entries):
            entry = self._entries[identity]
            if entry.cert is not None:
                state = "Available"
                chain = [_cert_dump(p) for p in entry.cert.chain_pem]
                roots = [_cert_dump(p) for p in split_pem(entry.cert.roots_pem)]
            else:
                state = f"Unavailable: {entry.error}" if entry.error else "Initializing"
                chain, roots = [], []
            out.append({"identity": str(identity), "state": state,
                        "certChain": chain, "rootCerts": roots})
        return out


def _cert_dump(pem: bytes) -> dict[str, str]:
    cert = x509lite.parse_pem(pem)
    return {
        "pem": pem.decode(),
        "serialNumber": str(cert.serial_number),
        "validFrom": cert.not_before.isoformat().replace("+00:00", "Z"),
        "expirationTime": cert.not_after.isoformat().replace("+00:00", "Z"),
    }


def _consume_exception(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _check(cert: WorkloadCertificate, identity: SpiffeId) -> None:
    if cert.identity != identity:
        raise CertificateError(f"the provider returned a certificate for {cert.identity}")
