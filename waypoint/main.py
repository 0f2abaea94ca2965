"""The waypoint process (``python -m waypoint``): settings, config source, certificates,
proxy and the admin/stats/readiness ports, then run until SIGTERM.

Start-up: the config source (local manifests or the Kubernetes API) and the certificate fetch
start at once; ``/healthz/ready`` on 15021 turns ready after the first complete config
("config") and the first certificate ("certificate"). The HBONE listener accepts from the start
(connections wait for the certificate). SIGTERM/SIGINT or ``POST /quitquitquit`` on the admin
port stops accepting and gives open tunnels the termination deadline.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import socket
import ssl
import sys
from collections.abc import Coroutine
from datetime import timedelta
from typing import Any, cast

from ambient import __version__
from ambient.certs import (
    CertificateManager,
    CertificateProvider,
    GrpcCaProvider,
    LocalCaProvider,
    grpc_ca_provider,
)
from ambient.hbone.pool import HbonePool
from ambient.hbone.protocol import IPAddress
from ambient.identity import SpiffeId
from ambient.malloc import trim_periodically, tune_for_proxy
from ambient.workloadcert import CaError
from controlplane.objects import KINDS
from waypoint.exchange import Exchange
from waypoint.filters import FilterLoadError, RequestFilter, load_filters
from waypoint.h1 import Limits
from waypoint.proxy import WaypointProxy
from waypoint.settings import Settings, SettingsError, from_env
from waypoint.state import WaypointState
from waypoint.telemetry import WaypointMetrics
from waypoint.upstream import Upstreams
from ztunnel.accesslog import configure_logging
from ztunnel.admin import AdminServer, Readiness, ReadinessServer, StatsServer
from ztunnel.config import parse_xds_address
from ztunnel.metrics import Metrics

__all__ = ["Waypoint", "cert_provider", "main", "run"]

log = logging.getLogger("waypoint")

WATCHED_KINDS = (*KINDS, "GRPCRoute", "HTTPTrafficPolicy")


def cert_provider(s: Settings) -> CertificateProvider:
    """FAKE_CA/CA_DIR signs locally; otherwise the mesh CA at CA_ADDRESS over gRPC, asking
    for the waypoint's own identity (no impersonation: it is not a node proxy)."""
    ttl = timedelta(seconds=s.secret_ttl_s)
    if s.ca_dir:  # ambient.ca (with ``cryptography``, ~10 MB) is loaded only here
        from ambient.ca import CertificateAuthority
        return LocalCaProvider(CertificateAuthority.load_dir(s.ca_dir), ttl)
    if not s.ca_address:
        raise OSError("no certificate source: set CA_ADDRESS (the mesh CA), or FAKE_CA=true "
                      "with CA_DIR")
    target, plaintext = parse_xds_address(s.ca_address)
    return grpc_ca_provider(target, plaintext, s.ca_root_ca, s.auth_token, s.cluster_id,
                            ttl=ttl, alt_hostname=s.alt_ca_hostname, impersonate=False)


async def _dial(dst: tuple[IPAddress, int]) -> socket.socket:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if dst[0].version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (str(dst[0]), dst[1]))
    except BaseException:
        sock.close()
        raise
    return sock


class Waypoint:
    """Everything one waypoint process runs; ``start``/``stop`` (tests run it in-process)."""

    def __init__(self, settings: Settings, provider: CertificateProvider, *,
                 filters: list[RequestFilter] | None = None, dial: Any = None,
                 hbone_port: int = 15008, rng: random.Random | None = None) -> None:
        self.settings = settings
        self.identity: SpiffeId = settings.identity
        self.provider = provider
        self.metrics = WaypointMetrics(__version__)
        self.state = WaypointState(settings.name, settings.namespace,
                                   trust_domain=settings.trust_domain,
                                   cluster_domain=settings.cluster_domain,
                                   cluster_id=settings.cluster_id)
        self.certs = CertificateManager(provider)
        self.pool = HbonePool(dial or _dial, self._client_ctx, trust_domain=settings.trust_domain)
        self.upstreams = Upstreams(self.pool, lambda: self.identity, hbone_port=hbone_port,
                                   rng=rng)
        self.exchange = Exchange(self.upstreams, self.metrics, filters=filters or [], rng=rng,
                                 cluster_domain=settings.cluster_domain)
        self.proxy = WaypointProxy(
            self.state, self.certs, self.identity, self.upstreams, self.exchange, self.metrics,
            network=settings.network,
            limits=Limits(header_timeout=settings.header_timeout_s,
                          idle_timeout=settings.idle_timeout_s),
        )
        self.readiness = Readiness()
        self._config_ready = self.readiness.register("config")
        self._cert_ready = self.readiness.register("certificate")
        self.stop_requested = asyncio.Event()
        self.admin = AdminServer(config_dump=self.config_dump, shutdown=self.stop_requested.set)
        self.stats = StatsServer(cast(Metrics, self.metrics))
        self.ready_srv = ReadinessServer(self.readiness)
        self.hbone_addr: tuple[str, int] | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    async def _client_ctx(self, identity: SpiffeId) -> ssl.SSLContext:
        return await self.certs.client_ctx(identity)

    def apply(self, update: Any) -> None:
        """The config source's sink."""
        self.state.apply(update)
        self.exchange.limiters.prune(set(self.state.snapshot().l7.rate_limit_keys))
        if self.state.synced:
            self._config_ready.done()

    def config_dump(self) -> dict[str, Any]:
        snap = self.state.snapshot()
        dump: dict[str, Any] = {
            "waypoint": {"name": self.settings.name, "namespace": self.settings.namespace,
                         "identity": str(self.identity)},
            "l7": snap.l7,
            "problems": list(self.state.problems),
            "protocols": {k: dict(v) for k, v in snap.protocols.items()},
            "certificates": self.certs.dump(),
            "version": __version__,
        }
        dump.update(snap.mesh.dump())
        return dump

    async def start(self, source: Coroutine[Any, Any, None] | None = None) -> None:
        """Bind every port and start the source (``source`` overrides the configured one)."""
        s = self.settings
        self.certs.start()
        await self.admin.start(*s.admin_addr)
        await self.stats.start(*s.stats_addr)
        await self.ready_srv.start(*s.readiness_addr)
        self.hbone_addr = await self.proxy.start(*s.hbone_addr)
        if source is None:
            source = self._source()
        self._tasks.append(asyncio.create_task(source))
        self._tasks.append(asyncio.create_task(self._fetch_cert()))
        log.info("waypoint %s/%s (%s) listening for HBONE on %s", s.namespace, s.name,
                 self.identity, self.hbone_addr)

    def _source(self) -> Coroutine[Any, Any, None]:
        s = self.settings
        if s.manifests_path:
            from controlplane.local_source import LocalSource

            return LocalSource(s.manifests_path, self.apply).run()
        from cni.agent_main import kube_client
        from controlplane.k8s_source import KIND_APIS, KubernetesSource

        kinds = tuple(k for k in WATCHED_KINDS if k in KIND_APIS)
        missing = [k for k in WATCHED_KINDS if k not in KIND_APIS]
        if missing:
            log.warning("the Kubernetes source cannot watch %s yet; those kinds are ignored",
                        ", ".join(missing))
        return KubernetesSource(kube_client(), kinds).run(self.apply)

    async def _fetch_cert(self) -> None:
        delay = 0.2
        for _ in range(10_000):
            try:
                await self.certs.get(self.identity)
                self._cert_ready.done()
                return
            except Exception as e:
                log.warning("cannot get the waypoint certificate for %s (retrying): %s",
                            self.identity, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def stop(self, deadline: float | None = None) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.proxy.drain(self.settings.termination_deadline_s if deadline is None
                               else deadline)
        await self.certs.stop()
        if isinstance(self.provider, GrpcCaProvider):
            await self.provider.close()
        for srv in (self.admin, self.stats, self.ready_srv):
            await srv.close()


TRIM_INTERVAL_S = 10.0  # freed heap pages back to the kernel (ambient.malloc), as ztunnel


async def run(settings: Settings) -> int:
    try:
        provider = cert_provider(settings)
    except (OSError, CaError) as e:
        log.error("%s", e)
        return 1
    if not settings.manifests_path and not settings.kubernetes:
        log.error("no config source: set LOCAL_MANIFESTS_PATH (a manifests file or "
                  "directory), or run in Kubernetes (KUBERNETES_SERVICE_HOST)")
        return 1
    try:
        filters = load_filters(list(settings.filters))
    except FilterLoadError as e:
        log.error("%s", e)
        return 1
    wp = Waypoint(settings, provider, filters=filters)
    try:
        await wp.start()
    except OSError as e:
        log.error("%s", e)
        return 1
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, wp.stop_requested.set)
    trim = asyncio.create_task(trim_periodically(TRIM_INTERVAL_S))
    await wp.stop_requested.wait()
    trim.cancel()
    log.info("shutting down: draining for up to %.1fs", settings.termination_deadline_s)
    await wp.stop()
    return 0


def lean_log_records() -> None:
    """Log records skip what our formatter never prints (the "Optimization" knobs of the
    logging HOWTO): the caller's file and line (a stack walk), thread and process ids. The
    access log makes one record per request."""
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    setattr(logging, "_srcfile", None)  # noqa: B010 (documented knob, private name)


def main() -> int:
    try:
        settings = from_env()
    except SettingsError as e:
        print(f"waypoint: bad configuration: {e}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    lean_log_records()
    tune_for_proxy()
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(run(settings))
    return uvloop.run(run(settings))


if __name__ == "__main__":
    sys.exit(main())
