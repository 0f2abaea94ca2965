"""The node agent's process: flags, the cluster source, the sockets, readiness, shutdown.

``python -m cni.agent_main run --node-name N --manifests FILE`` (local cluster) or
``--kubernetes`` (in a cluster, with the pod's service account), plus
``python -m cni.agent_main uninstall`` to remove every capture this node's agent programmed.

Start-up order (see ``cni/agent.py`` for why): capture backend and probe SNAT set up ->
checkpoint restored -> cluster source synced -> reconcile -> ZDS socket opened (ztunnel
gets a complete snapshot) -> plugin socket opened -> ready on ``:8000/readyz``.
Stopping the agent (SIGTERM) leaves every capture in place: pods stay captured (fail
closed) and the next agent reconciles them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from ambient.bpfmap import PIN_DIR
from ambient.splicemap import DEFAULT_MAX_ENTRIES
from cni.agent import AgentConfig, Annotate, NodeAgent, load_checkpoint
from cni.capture import default_backend_name, make_backend
from cni.capture.base import BACKENDS, CaptureBackend, CaptureError
from cni.capture.probe import ProbeSnat
from cni.enroll import DEFAULT_EXCLUDED, REDIRECTION_ANNOTATION
from cni.events import SOCKET_NAME, serve_events
from cni.plugin import DEFAULT_RUN_DIR
from cni.zds import ZdsServer
from controlplane.objects import Update
from ztunnel.httpserve import HttpServer, Request, Response, text

log = logging.getLogger("cni.agent")

DEFAULT_ZDS_SOCKET = "/var/run/ztunnel/ztunnel.sock"
STATE_FILE = "agent-state.msgpack"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    p = argparse.ArgumentParser(prog="ambient-cni-agent", description=__doc__.split("\n")[0])
    p.add_argument("command", choices=["run", "uninstall"], nargs="?", default="run")
    p.add_argument("--node-name", default=env.get("NODE_NAME", ""))
    p.add_argument("--run-dir", default=env.get("CNI_AGENT_RUN_DIR", DEFAULT_RUN_DIR),
                   help="holds pluginevent.sock and the state checkpoint")
    p.add_argument("--zds-socket", default=env.get("ZDS_SOCKET", DEFAULT_ZDS_SOCKET))
    p.add_argument("--capture", default=env.get("CAPTURE_BACKEND", "auto"),
                   choices=["auto", *BACKENDS])
    p.add_argument("--cgroup", default=env.get("CAPTURE_CGROUP", ""),
                   help="eBPF: cgroup v2 directory whose pods are captured (default: the "
                        "cgroup2 root)")
    p.add_argument("--bpf-pin-dir", default=env.get("BPF_PIN_DIR", PIN_DIR),
                   help="eBPF: where the maps ztunnel reads are pinned")
    p.add_argument("--kernel-splice", default=env.get("KERNEL_SPLICE", "on").lower(),
                   choices=["on", "off"],
                   help="load the eBPF sockmap that lets ztunnel splice same-node "
                        "connections in the kernel (any capture backend)")
    p.add_argument("--kernel-splice-entries", type=int,
                   default=int(env.get("KERNEL_SPLICE_ENTRIES", DEFAULT_MAX_ENTRIES)),
                   help="sockets the kernel splice holds at once (two per connection)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--manifests", default=env.get("LOCAL_MANIFESTS_PATH", ""),
                     help="local mode: a manifests file or directory to take labels from")
    src.add_argument("--kubernetes", action="store_true",
                     default=env.get("KUBERNETES_SERVICE_HOST") is not None)
    p.add_argument("--exclude-namespaces",
                   default=env.get("EXCLUDE_NAMESPACES", ",".join(DEFAULT_EXCLUDED)))
    p.add_argument("--no-probe-snat", action="store_true")
    p.add_argument("--ready-addr", default=env.get("AGENT_READY_ADDR", "0.0.0.0:8000"))
    p.add_argument("--log-level", default=env.get("LOG_LEVEL", "info"))
    return p.parse_args(argv)


def choose_backend(args: argparse.Namespace) -> CaptureBackend:
    """The backend asked for; ``auto`` prefers eBPF and falls back to iptables, saying why."""
    opts: dict[str, Any] = {}
    name = args.capture
    if name == "auto":
        name = default_backend_name()
    if name == "ebpf":
        opts["cgroup_path"] = args.cgroup or _cgroup2_root()
        opts["pin_dir"] = args.bpf_pin_dir
    backend = make_backend(name, **opts)
    reason = backend.unavailable_reason()
    if reason is None:
        return backend
    if args.capture != "auto":
        raise CaptureError(f"capture backend {name} cannot run here: {reason}")
    log.warning("eBPF capture unavailable (%s); falling back to iptables", reason)
    return make_backend("iptables")


def start_kernel_splice(args: argparse.Namespace) -> bool:
    """Load the kernel splice for ztunnel (``bpf/splice.py``); never fails the agent."""
    if args.kernel_splice != "on":
        log.info("kernel splice off (--kernel-splice=off): ztunnel relays same-node "
                 "connections itself")
        return False
    from bpf import splice

    reason = splice.unavailable_reason()
    if reason is None:
        try:
            fresh = splice.load_splice(args.bpf_pin_dir, max_entries=args.kernel_splice_entries)
        except Exception as e:  # noqa: BLE001 - bcc raises bare Exceptions; never fatal here
            reason = f"loading it failed: {e}"
        else:
            log.info("kernel splice %s in %s", "loaded" if fresh else "already loaded",
                     args.bpf_pin_dir)
            return True
    log.warning("kernel splice not loaded (%s); ztunnel relays same-node connections "
                "itself", reason)
    return False


def _cgroup2_root() -> str:
    from ambient.cluster.cgroups import cgroup2_mount

    return cgroup2_mount()


def kube_client() -> Any:
    """An ApiClient from the pod's service account, else from KUBECONFIG."""
    from kubernetes import client, config  # type: ignore[import-untyped]

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def make_source(args: argparse.Namespace, api: Any = None) -> Callable[
        [Callable[[Update], None]], Coroutine[Any, Any, None]]:
    """The cluster source as ``run(sink)``: local manifests or the Kubernetes API."""
    if api is not None:
        from controlplane.k8s_source import KubernetesSource

        return KubernetesSource(api, kinds=("Pod", "Namespace")).run
    if not args.manifests:
        raise SystemExit("ambient-cni-agent: give --manifests FILE (local mode) or --kubernetes")
    from controlplane.local_source import LocalSource

    path = args.manifests

    async def run_local(sink: Callable[[Update], None]) -> None:
        await LocalSource(path, sink).run()

    return run_local


def k8s_annotator(api: Any) -> Annotate:
    """Writes ``ambient.istio.io/redirection`` on the pod (a merge patch; None removes it)."""
    from kubernetes import client

    core = client.CoreV1Api(api)

    async def annotate(namespace: str, name: str, value: str | None) -> None:
        body = {"metadata": {"annotations": {REDIRECTION_ANNOTATION: value}}}
        await asyncio.to_thread(core.patch_namespaced_pod, name, namespace, body)

    return annotate


async def run(args: argparse.Namespace) -> int:
    try:
        backend = choose_backend(args)
        backend.setup_node()
    except CaptureError as e:
        log.error("%s", e)
        return 1
    start_kernel_splice(args)
    probe: ProbeSnat | None = None
    if not args.no_probe_snat:
        probe = ProbeSnat("iptables" if backend.name == "iptables" else "nftables", None)
        probe.setup()
    config = AgentConfig(node_name=args.node_name,
                         state_path=os.path.join(args.run_dir, STATE_FILE),
                         excluded_namespaces=tuple(x for x in args.exclude_namespaces.split(",")
                                                   if x))
    zds = ZdsServer(args.zds_socket, lambda: agent.snapshot())
    api = kube_client() if args.kubernetes else None
    agent = NodeAgent(config, backend, zds, probe, k8s_annotator(api) if api else None)
    await agent.restore()
    source = make_source(args, api)
    tasks: list[asyncio.Task[None]] = [asyncio.create_task(source(agent.on_update))]
    log.info("waiting for the cluster source")
    await agent.synced.wait()
    await agent.reconcile()
    await zds.start()
    events = await serve_events(os.path.join(args.run_dir, SOCKET_NAME), agent.handle_event)
    tasks.append(asyncio.create_task(agent.retry_loop()))

    async def health(req: Request) -> Response:
        if req.path in ("/readyz", "/healthz"):
            return text(200, "ready\n")
        if req.path == "/debug/pods":
            import json

            return text(200, json.dumps(agent.dump(), indent=1) + "\n")
        return text(404, "not found\n")

    ready = HttpServer(health, name="cni-agent-ready")
    host, _, port = args.ready_addr.rpartition(":")
    await ready.start(host or "0.0.0.0", int(port))
    log.info("node agent ready on node %r with the %s backend", args.node_name, backend.name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping; captures stay in place")
    for t in tasks:
        t.cancel()
    events.close()
    await zds.close()
    await ready.close()
    return 0


def uninstall(args: argparse.Namespace) -> int:
    """Remove every capture recorded in the checkpoint, then the node-wide state."""
    state = os.path.join(args.run_dir, STATE_FILE)
    backend = choose_backend(args)
    errors: list[str] = []
    for pod in load_checkpoint(state):
        if pod.captured:
            errors += backend.remove(pod.capture_spec())
    from bpf.splice import unload_splice

    errors += unload_splice(args.bpf_pin_dir)  # first: the eBPF backend removes the dir
    errors += backend.teardown_node()
    if not args.no_probe_snat:
        errors += ProbeSnat("iptables" if backend.name == "iptables" else "nftables",
                            None).teardown()
    if os.path.exists(state):
        os.unlink(state)
    for e in errors:
        print(f"uninstall: {e}", file=sys.stderr)
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "uninstall":
        return uninstall(args)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
