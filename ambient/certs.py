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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from cryptography import x509

from . import tls
from .ca import DEFAULT_TTL, CertificateAuthority, WorkloadCertificate, split_pem
from .identity import SpiffeId

__all__ = [
    "CertificateError",
    "CertificateManager",
    "CertificateProvider",
    "LocalCaProvider",
    "utcnow",
]

log = logging.getLogger(__name__)

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
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)

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
    cert = x509.load_pem_x509_certificate(pem)
    return {
        "pem": pem.decode(),
        "serialNumber": str(cert.serial_number),
        "validFrom": cert.not_valid_before_utc.isoformat().replace("+00:00", "Z"),
        "expirationTime": cert.not_valid_after_utc.isoformat().replace("+00:00", "Z"),
    }


def _consume_exception(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _check(cert: WorkloadCertificate, identity: SpiffeId) -> None:
    if cert.identity != identity:
        raise CertificateError(f"the provider returned a certificate for {cert.identity}")
