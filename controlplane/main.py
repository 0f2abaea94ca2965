"""The control plane process: object source -> translation pipeline -> snapshot cache -> gRPC.

``ambientctl controlplane --manifests DIR`` runs it locally: the manifests directory is the
source (``controlplane.local_source.LocalSource``); ``--kubernetes`` watches the API server
instead (``controlplane.k8s_source.KubernetesSource``).  Every ``Update`` goes through
``controlplane.pipeline.Pipeline`` and the resulting ``Changes`` into the
:class:`~controlplane.cache.SnapshotCache`, which the delta ADS server streams from.  With a
CA (``--ca-dir``), the same gRPC server answers ``IstioCertificateService/CreateCertificate``:
a node proxy gets certificates only for pods scheduled on its node, authenticated by
TokenReview in Kubernetes mode or by node tokens the control plane mints
(``--node-token-dir``, also one per waypoint Gateway for the waypoint's own identity)
locally; in Kubernetes mode the root is also published as the
ConfigMap ``istio-ca-root-cert`` in every namespace.

Invariants:
- The server starts listening only after the source delivered its first complete set, so a
  proxy that connects early never takes an empty snapshot for the truth (istiod likewise
  waits for its informers to sync before it serves).
- Everything runs on one event loop; the cache has a single writer (the sink).
- SIGTERM/SIGINT stop the source and give open streams one second to finish.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from ambient.ca import CA_CERT_FILE, CaError, CertificateAuthority
from ambient.identity import SpiffeId
from controlplane.ca_service import (
    CertificateService,
    LocalTokenAuthenticator,
    TokenReviewAuthenticator,
    parse_trusted_accounts,
    publish_root_configmaps,
    write_token_file,
)
from controlplane.cache import SnapshotCache
from controlplane.objects import ObjectStore, Sink, Update
from controlplane.server import (
    DEFAULT_PLAIN_ADDR,
    ControlPlaneServer,
    ServerError,
)
from controlplane.xds import from_object_authenticator

__all__ = ["Options", "add_arguments", "load_or_create_ca", "make_sink", "run", "run_from_args"]

log = logging.getLogger("controlplane")


class PipelineLike(Protocol):
    def apply(self, update: Update) -> Any: ...


@dataclass(frozen=True)
class Options:
    manifests: Path | None
    xds_plain: str | None = DEFAULT_PLAIN_ADDR
    xds_tls: str | None = None
    ca_dir: Path | None = None
    trust_domain: str = "cluster.local"
    cluster_id: str = "Kubernetes"
    require_client_cert: bool = False
    node_token_dir: Path | None = None  # local mode: mint a ztunnel token per node here
    kubernetes: bool = False  # watch the Kubernetes API instead of ``manifests``
    trusted_node_accounts: str = "istio-system/ztunnel"
    root_namespace: str = "istio-system"  # mesh-wide policies live here (istiod's)


def make_sink(pipeline: PipelineLike, cache: SnapshotCache,
              synced: asyncio.Event | None = None) -> Sink:
    """The source's sink: translate one update and put what changed into the cache."""

    def sink(update: Update) -> None:
        changes = pipeline.apply(update)
        if changes:
            pushed = cache.apply_changes(changes)
            log.info("objects updated: %d resources changed (%s)",
                     sum(len(v) for v in pushed.values()),
                     ", ".join(f"{t.rsplit('.', 1)[-1]}: {len(v)}" for t, v in pushed.items())
                     or "no content change")
        if synced is not None and update.resync:
            synced.set()

    return sink


def pods_on_node(store: ObjectStore, trust_domain: str) -> Callable[[str], set[SpiffeId]]:
    """The identities of the pods scheduled on a node, from the control plane's objects (what
    the CA lets that node's ztunnel impersonate)."""

    def lookup(node: str) -> set[SpiffeId]:
        out = set()
        for key, obj in store.objects.items():
            if not key.startswith("Pod/"):
                continue
            spec, meta = obj.get("spec") or {}, obj.get("metadata") or {}
            phase = (obj.get("status") or {}).get("phase")
            if spec.get("nodeName") == node and phase not in ("Succeeded", "Failed"):
                out.add(SpiffeId(trust_domain, str(meta.get("namespace") or "default"),
                                 str(spec.get("serviceAccountName") or "default")))
        return out

    return lookup


def nodes_of(store: ObjectStore) -> set[str]:
    return {str((o.get("spec") or {}).get("nodeName")) for k, o in store.objects.items()
            if k.startswith("Pod/") and (o.get("spec") or {}).get("nodeName")}


def load_or_create_secret(path: Path) -> bytes:
    """The local token-signing secret (32 random bytes, mode 0600), created on first use."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        secret = os.urandom(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secret)
        return secret


def mint_node_tokens(auth: LocalTokenAuthenticator, token_dir: Path, nodes: set[str],
                     namespace: str, service_account: str) -> None:
    """``<token_dir>/<node>``: the token a node's ztunnel sends as ``AUTH_TOKEN``."""
    token_dir.mkdir(parents=True, exist_ok=True)
    for node in sorted(nodes):
        path = token_dir / node
        if not path.exists():
            write_token_file(path, auth.mint_token(node, namespace, service_account,
                                                   timedelta(days=30)))
            log.info("minted the ztunnel token of node %s into %s", node, path)


WAYPOINT_CLASS = "istio-waypoint"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"


def waypoints_of(store: ObjectStore) -> set[tuple[str, str, str]]:
    """``(namespace, gateway name, service account)`` of every waypoint Gateway.

    The service account is the Gateway's name (what Istio's deployment controller gives a
    waypoint), unless a pod of the Gateway (label ``gateway.networking.k8s.io/gateway-name``)
    names another one."""
    out = set()
    for key, obj in store.objects.items():
        if not key.startswith("Gateway/"):
            continue
        if (obj.get("spec") or {}).get("gatewayClassName") != WAYPOINT_CLASS:
            continue
        meta = obj.get("metadata") or {}
        ns, name = str(meta.get("namespace") or "default"), str(meta.get("name") or "")
        if not name:
            continue
        sa = name
        for pkey, pod in sorted(store.objects.items()):
            pmeta = pod.get("metadata") or {}
            if (pkey.startswith("Pod/") and str(pmeta.get("namespace") or "default") == ns
                    and (pmeta.get("labels") or {}).get(GATEWAY_NAME_LABEL) == name):
                sa = str((pod.get("spec") or {}).get("serviceAccountName") or sa)
                break
        out.add((ns, name, sa))
    return out


def mint_waypoint_tokens(auth: LocalTokenAuthenticator, token_dir: Path,
                         waypoints: set[tuple[str, str, str]]) -> None:
    """``<token_dir>/waypoint.<ns>.<name>``: a waypoint's ``AUTH_TOKEN``.  It names no node, so
    the CA gives its holder only its own identity ``ns/<ns>/sa/<sa>`` (no impersonation)."""
    token_dir.mkdir(parents=True, exist_ok=True)
    for ns, name, sa in sorted(waypoints):
        path = token_dir / f"waypoint.{ns}.{name}"
        if not path.exists():
            write_token_file(path, auth.mint_token("", ns, sa, timedelta(days=30)))
            log.info("minted the token of waypoint %s/%s (service account %s) into %s",
                     ns, name, sa, path)


def load_or_create_ca(ca_dir: Path, trust_domain: str) -> CertificateAuthority:
    """Load Istio's ``cacerts`` layout from ``ca_dir``, or create a new root there."""
    if (ca_dir / CA_CERT_FILE).exists():
        return CertificateAuthority.load_dir(ca_dir, trust_domain=trust_domain)
    ca = CertificateAuthority.generate(trust_domain)
    ca.save_dir(ca_dir)
    log.info("created a new mesh root CA in %s (trust domain %s)", ca_dir, trust_domain)
    return ca


async def run(
    opts: Options,
    *,
    feed: Callable[[Sink], Coroutine[Any, Any, None]] | None = None,
    pipeline: PipelineLike | None = None,
    stop: asyncio.Event | None = None,
    on_started: Callable[[ControlPlaneServer], None] | None = None,
    api: Any = None,
) -> int:
    """Run until ``stop`` is set (or a signal arrives); returns the exit status.

    ``feed(sink)`` runs the object source (default: ``LocalSource`` on ``opts.manifests``, or
    ``KubernetesSource`` on ``api`` (an ApiClient; built from the environment when None) with
    ``opts.kubernetes``).
    """
    ca = None
    if opts.xds_tls is not None or opts.ca_dir is not None:
        if opts.ca_dir is None:
            log.error("--xds-tls needs --ca-dir: the TLS server certificate is signed by the "
                      "mesh CA")
            return 2
        try:
            ca = load_or_create_ca(opts.ca_dir, opts.trust_domain)
        except (CaError, OSError) as e:
            log.error("cannot load the mesh CA from %s: %s", opts.ca_dir, e)
            return 1
    if pipeline is None:
        from ambient.config.manifests import Settings as TranslateSettings
        from controlplane.pipeline import Pipeline

        pipeline = Pipeline(TranslateSettings(cluster_id=opts.cluster_id,
                                              trust_domain=opts.trust_domain,
                                              root_namespace=opts.root_namespace))
    if opts.kubernetes and api is None:
        from cni.agent_main import kube_client

        api = kube_client()
    if feed is None and api is not None:
        from controlplane.k8s_source import KubernetesSource

        feed = KubernetesSource(api).run
    elif feed is None:
        from controlplane.local_source import LocalSource

        def feed(sink: Sink) -> Coroutine[Any, Any, None]:
            return LocalSource(str(opts.manifests), sink).run()
    cache = SnapshotCache()
    synced = asyncio.Event()
    # In Kubernetes mode every caller (xDS and CA) proves its ServiceAccount with a token
    # (TokenReview); locally, xDS is open like istiod's 15010 and the CA takes node tokens.
    token_review = TokenReviewAuthenticator(api) if api is not None else None
    try:
        server = ControlPlaneServer(
            cache, plain_addr=opts.xds_plain, tls_addr=opts.xds_tls, ca=ca,
            client_auth="require" if opts.require_client_cert else "none",
            authenticator=(from_object_authenticator(token_review, opts.trust_domain)
                           if token_review is not None else None),
        )
    except ServerError as e:
        log.error("%s", e)
        return 2
    store: ObjectStore | None = getattr(pipeline, "store", None)
    local_auth: LocalTokenAuthenticator | None = None
    if ca is not None and store is not None:
        assert opts.ca_dir is not None
        authenticator: Any
        if token_review is not None:
            authenticator = token_review
        else:
            local_auth = LocalTokenAuthenticator(load_or_create_secret(
                opts.ca_dir / "node-token.key"))
            authenticator = local_auth
        trusted = parse_trusted_accounts(opts.trusted_node_accounts)
        ca_service = CertificateService(ca, authenticator,
                                        pods_on_node(store, opts.trust_domain),
                                        trusted_node_accounts=trusted)
        server.add_servicer(ca_service.add_to_server)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    feeding = asyncio.create_task(feed(make_sink(pipeline, cache, synced)))
    try:
        waiters = [asyncio.ensure_future(synced.wait()), asyncio.ensure_future(stop.wait())]
        await asyncio.wait([feeding, *waiters], return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        if feeding.done():
            exc = feeding.exception()
            log.error("the object source stopped before its first sync: %s", exc or "it ended")
            return 1
        if stop.is_set():
            return 0
        if local_auth is not None and opts.node_token_dir is not None and store is not None:
            ns, _, sa = opts.trusted_node_accounts.split(",")[0].partition("/")
            mint_node_tokens(local_auth, opts.node_token_dir, nodes_of(store), ns, sa)
            mint_waypoint_tokens(local_auth, opts.node_token_dir, waypoints_of(store))
        if api is not None and ca is not None and store is not None:
            namespaces = [k.split("/")[2] for k in store.objects if k.startswith("Namespace/")]
            written = await asyncio.to_thread(publish_root_configmaps, api, namespaces,
                                              ca.roots_pem)
            log.info("published %s in %d namespaces", "istio-ca-root-cert", len(written))
        try:
            await server.start()
        except ServerError as e:
            log.error("%s", e)
            return 1
        if on_started is not None:
            on_started(server)
        await stop.wait()
        return 0
    finally:
        feeding.cancel()
        await asyncio.gather(feeding, return_exceptions=True)
        await server.stop(1.0)
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError):
                pass


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifests", type=Path, default=None,
                   help="directory (or file) of Kubernetes manifests describing the cluster")
    p.add_argument("--xds-plain", default=DEFAULT_PLAIN_ADDR, metavar="ADDR",
                   help="plaintext xDS address, or 'off' (default: %(default)s)")
    p.add_argument("--xds-tls", default=None, metavar="ADDR",
                   help="TLS xDS address, e.g. 0.0.0.0:15012 (needs --ca-dir)")
    p.add_argument("--ca-dir", type=Path, default=None,
                   help="mesh CA in Istio's cacerts layout; created if empty")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--cluster-id", default="Kubernetes")
    p.add_argument("--require-client-cert", action="store_true",
                   help="on the TLS port, require a mesh client certificate (mTLS only)")
    p.add_argument("--node-token-dir", type=Path, default=None,
                   help="local mode: write a token per node (<dir>/<node>) for its ztunnel's "
                        "AUTH_TOKEN; the CA accepts these instead of Kubernetes tokens")
    p.add_argument("--kubernetes", action="store_true",
                   help="watch the Kubernetes API (in-cluster or KUBECONFIG) instead of "
                        "--manifests; callers authenticate with ServiceAccount tokens")
    p.add_argument("--root-namespace", default="istio-system",
                   help="the namespace whose policies apply mesh-wide (default: %(default)s)")
    p.add_argument("--trusted-node-accounts", default="istio-system/ztunnel",
                   help="namespace/serviceaccount of node proxies allowed to impersonate")
    p.add_argument("--log-level", default="info")


def run_from_args(args: argparse.Namespace) -> int:
    if (args.manifests is None) == (not args.kubernetes):
        print("ambientctl controlplane: give exactly one source: --manifests DIR or "
              "--kubernetes")
        return 2
    logging.basicConfig(level=str(args.log_level).upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    opts = Options(
        manifests=args.manifests,
        xds_plain=None if args.xds_plain in ("off", "") else args.xds_plain,
        xds_tls=args.xds_tls,
        ca_dir=args.ca_dir,
        trust_domain=args.trust_domain,
        cluster_id=args.cluster_id,
        require_client_cert=args.require_client_cert,
        node_token_dir=args.node_token_dir,
        kubernetes=args.kubernetes,
        trusted_node_accounts=args.trusted_node_accounts,
        root_namespace=args.root_namespace,
    )
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(run(opts))
    return uvloop.run(run(opts))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ambient-controlplane")
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
