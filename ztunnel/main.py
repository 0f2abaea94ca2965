"""ztunnel's process: wires settings, store, certificates, proxy and admin, then runs.

Start-up order follows ztunnel's readiness contract: ``/healthz/ready`` on 15021 turns
ready once the configuration has loaded ("state manager") and the pods listed at start-up
are served ("workload proxy manager").  SIGTERM/SIGINT (or ``POST /quitquitquit``) closes
the listeners at once and gives live connections the termination deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import resource
import signal
import sys
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ambient import __version__
from ambient.certs import (
    CertificateManager,
    CertificateProvider,
    GrpcCaProvider,
    LocalCaProvider,
    grpc_ca_provider,
    token_is_path,
)
from ambient.malloc import trim_periodically, tune_for_proxy
from ambient.store import MeshStore
from ambient.workloadcert import CaError
from ztunnel.accesslog import configure_logging
from ztunnel.admin import AdminServer, Readiness, ReadinessServer, StatsServer
from ztunnel.config import Settings, SettingsError, from_env, parse_xds_address
from ztunnel.inpod import WorkloadProxyManager
from ztunnel.metrics import Metrics
from ztunnel.proxy import Ztunnel
from ztunnel.result import ConnectionTracker
from ztunnel.sockets import use_bpf_pin_dir
from ztunnel.xds_client import XdsClient

if TYPE_CHECKING:  # ambient.ca (with ``cryptography``, ~10 MB) is loaded only for CA_DIR
    from ambient.ca import CertificateAuthority

log = logging.getLogger("ztunnel")


def config_dump(zt: Ztunnel, inpod: WorkloadProxyManager | None = None) -> dict[str, Any]:
    dump = zt.store.dump()
    dump["certificates"] = zt.certs.dump()
    dump["workloadState"] = {
        uid: {"info": {"name": p.name, "namespace": p.namespace}, "state": "Up"}
        for uid, p in zt.pods.items()
    }
    if inpod is not None:  # ZDS knows service accounts and pods whose listeners are pending
        dump["workloadState"].update(inpod.workload_state())
    dump["config"] = dataclasses.asdict(zt.settings)
    token = zt.settings.auth_token
    if token and not token_is_path(token):  # a literal token, not a path: never show it
        dump["config"]["auth_token"] = "<redacted>"
    dump["version"] = __version__
    return dump


def cert_provider(settings: Settings, ca: CertificateAuthority | None) -> CertificateProvider:
    """FAKE_CA/CA_DIR signs locally; otherwise the mesh CA at CA_ADDRESS over gRPC."""
    ttl = timedelta(seconds=settings.secret_ttl_s)
    if ca is not None:
        return LocalCaProvider(ca, ttl)
    assert settings.ca_address
    target, plaintext = parse_xds_address(settings.ca_address)
    return grpc_ca_provider(target, plaintext, settings.ca_root_ca, settings.auth_token,
                            settings.cluster_id, ttl=ttl, alt_hostname=settings.alt_ca_hostname,
                            headers=dict(settings.ca_headers))


async def run(settings: Settings) -> int:
    ca = None
    try:
        if settings.ca_dir:
            from ambient.ca import CertificateAuthority
            ca = CertificateAuthority.load_dir(settings.ca_dir)
    except (CaError, OSError) as e:
        log.error("cannot load the CA from CA_DIR=%s: %s", settings.ca_dir, e)
        return 1
    if ca is None and not settings.ca_address:
        log.error("no certificate source: set CA_ADDRESS (the mesh CA, e.g. "
                  "https://istiod.istio-system.svc:15012), or FAKE_CA=true with CA_DIR")
        return 1
    try:
        provider = cert_provider(settings, ca)
    except OSError as e:
        log.error("cannot set up the CA client: %s", e)
        return 1
    store = MeshStore(root_namespace=settings.root_namespace)
    metrics = Metrics(version=__version__)
    tracker = ConnectionTracker()
    readiness = Readiness()
    state_ready = readiness.register("state manager")
    pods_ready = readiness.register("workload proxy manager")
    certs = CertificateManager(provider)
    certs.start()
    zt = Ztunnel(settings, store, certs, metrics, tracker)
    stop = asyncio.Event()
    inpod = None
    if settings.inpod_uds:
        # Readiness "workload proxy manager" waits for the agent's first complete snapshot.
        inpod = WorkloadProxyManager(zt, settings.inpod_uds, on_ready=pods_ready.done)

    admin = AdminServer(config_dump=lambda: config_dump(zt, inpod), shutdown=stop.set,
                        connections=tracker)
    stats = StatsServer(metrics)
    ready_srv = ReadinessServer(readiness)
    await admin.start(*settings.admin_addr)
    await stats.start(*settings.stats_addr)
    await ready_srv.start(*settings.readiness_addr)

    if settings.xds_address:  # "state manager" is done once both types are ACKed
        xds = XdsClient.from_settings(settings, store, on_synced=state_ready.done)
        tasks = [asyncio.create_task(xds.run())]
    else:
        # Imported here: the local sources (YAML, the manifests translator) cost ~1 MB that
        # a ztunnel fed by the control plane does not need.
        from ztunnel.sources import ConfigWatcher

        watcher = ConfigWatcher(settings, store)
        watcher.load_once()

        async def mark_ready_later() -> None:
            while watcher.last_error is not None:
                await asyncio.sleep(0.5)
            state_ready.done()

        tasks = [asyncio.create_task(watcher.run()), asyncio.create_task(mark_ready_later())]

    if settings.memory_trim_interval_s > 0:
        tasks.append(asyncio.create_task(trim_periodically(settings.memory_trim_interval_s)))
    if inpod is not None:
        tasks.append(asyncio.create_task(inpod.run()))
    else:
        pods_ready.done()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("ztunnel %s started on node %r", __version__, settings.node_name)
    await stop.wait()
    log.info("shutting down: draining for up to %.1fs", settings.termination_deadline_s)
    for t in tasks:
        t.cancel()
    await zt.drain(settings.termination_deadline_s)
    await certs.stop()
    if isinstance(provider, GrpcCaProvider):
        await provider.close()
    for srv in (admin, stats, ready_srv):
        await srv.close()
    return 0


def raise_fd_limit() -> tuple[int, int]:
    """Lift RLIMIT_NOFILE's soft limit to the hard one: every proxied connection holds two
    or more descriptors, and the usual soft default (1024) would cap ztunnel near 500
    connections.  Returns the (soft, hard) limits now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, want, e)
    return soft, hard


def main() -> int:
    try:
        settings = from_env()
    except SettingsError as e:
        print(f"ztunnel: bad configuration: {e}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    soft, _ = raise_fd_limit()
    if soft < 4096:
        log.warning("open-file limit is %d: ztunnel can proxy only about %d connections; "
                    "raise the hard limit (ulimit -Hn, LimitNOFILE=)", soft, soft // 2)
    use_bpf_pin_dir(settings.bpf_pin_dir)
    tune_for_proxy()
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(run(settings))
    # Outside the try: an ImportError raised while running must not start ztunnel twice.
    return uvloop.run(run(settings))


if __name__ == "__main__":
    sys.exit(main())
