"""``ambientctl install | uninstall | manifest generate``: flags and orchestration.

``ambient/cli.py`` registers these with :func:`add_subcommands` and dispatches to :func:`run`.
The steps are: load values -> render -> apply (CRDs and Namespace, the CA Secret, the rest)
-> optionally wait for rollouts.  Uninstall: stop the CNI agent, clean every node, delete
every object we labelled.  Exit codes: 0 done, 1 failed or timed out, 2 bad values/flags.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ambient.install import apply as ap
from ambient.install.common import CNI, CONTROLPLANE, Obj
from ambient.install.nodes import CLEANUP, cni_cleanup_daemonset
from ambient.install.render import render, to_yaml
from ambient.install.values import Values, ValuesError, load

COMMANDS = ("install", "uninstall", "manifest")


def _values_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--values", type=Path, action="append", default=[],
                   metavar="FILE", help="a values YAML file (repeatable; later wins)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one value, e.g. --set capture=ebpf (repeatable)")


def _kube_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: "
                   "$KUBECONFIG or ~/.kube/config; in a pod, its service account)")
    p.add_argument("--context", default=None, help="kubeconfig context")
    p.add_argument("--dry-run", action="store_true", help="say what would change; write "
                   "nothing")


def add_subcommands(sub: Any) -> None:
    """Add ``install``, ``uninstall`` and ``manifest`` to an argparse subparsers object."""
    inst = sub.add_parser("install", help="install ambient into the current Kubernetes "
                          "cluster (idempotent: run again to repair drift)")
    _values_flags(inst)
    _kube_flags(inst)
    inst.add_argument("--wait", action="store_true",
                      help="wait until the control plane and the DaemonSets are rolled out")
    inst.add_argument("--timeout", type=float, default=300.0, help="seconds for --wait")
    un = sub.add_parser("uninstall", help="remove everything `ambientctl install` created")
    _kube_flags(un)
    un.add_argument("--skip-node-cleanup", action="store_true",
                    help="do not run the per-node clean-up (CNI chaining, pod captures)")
    un.add_argument("--timeout", type=float, default=300.0,
                    help="seconds to wait for the node clean-up")
    man = sub.add_parser("manifest", help="render the install manifests")
    msub = man.add_subparsers(dest="manifest_command", required=True)
    gen = msub.add_parser("generate", help="print every object `install` applies as YAML")
    _values_flags(gen)
    gen.add_argument("--with-ca-secret", action="store_true",
                     help="also print a freshly generated mesh root CA as the cacerts Secret "
                          "(for `kubectl apply` without ambientctl install)")


def kube_client(kubeconfig: str | None = None, context: str | None = None) -> Any:
    from kubernetes import client, config  # type: ignore[import-untyped]

    if kubeconfig is None and context is None:
        try:
            config.load_incluster_config()
            return client.ApiClient()
        except config.ConfigException:
            pass
    try:
        cfg = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, context=context,
                                client_configuration=cfg)
    except (config.ConfigException, OSError) as e:
        raise ap.InstallError(f"cannot load a kubeconfig ({e}); pass --kubeconfig FILE or "
                              "set KUBECONFIG") from None
    return client.ApiClient(cfg)


def install(kube: ap.Kube, v: Values, dry_run: bool = False, wait: bool = False,
            timeout_s: float = 300.0) -> int:
    objs = render(v)
    split = next((i + 1 for i, o in enumerate(objs) if o["kind"] == "Namespace"),
                 sum(1 for o in objs if o["kind"] == "CustomResourceDefinition"))
    report = ap.apply_objects(kube, objs[:split], dry_run)
    ca_line = ap.ensure_ca_secret(kube, v, dry_run)
    rest = ap.apply_objects(kube, objs[split:], dry_run)
    for line in [*report.lines, ca_line, *rest.lines]:
        print(line)
    changed = report.changed + rest.changed + int(ca_line.startswith(("created", "would")))
    print(f"{'dry run: ' if dry_run else ''}{changed} change(s), "
          f"{len(objs) + 1 - changed} object(s) as wanted or kept")
    if wait and not dry_run:
        print("waiting for rollouts")
        if not ap.wait_rollouts(kube, objs, timeout_s):
            print(f"ambientctl install: not rolled out after {timeout_s:.0f}s; check `kubectl "
                  f"-n {v.namespace} get pods` and the pods' events", file=sys.stderr)
            return 1
    return 0


def uninstall(kube: ap.Kube, dry_run: bool = False, node_cleanup: bool = True,
              timeout_s: float = 300.0) -> int:
    objs = ap.managed_objects(kube)
    status = 0
    cni_ds = next((o for o in objs if o["kind"] == "DaemonSet"
                   and o["metadata"]["name"] == CNI), None)
    if cni_ds is not None and node_cleanup:
        status = _clean_nodes(kube, cni_ds, dry_run, timeout_s)
        objs = ap.managed_objects(kube) if not dry_run else objs
    if any(o["kind"] == "Deployment" and o["metadata"]["name"] == CONTROLPLANE for o in objs):
        objs = objs + ap.root_configmaps(kube)  # deleted first (the list is walked backwards)
    report = ap.delete_objects(kube, objs, dry_run)
    for line in report.lines:
        print(line)
    print(f"{'dry run: ' if dry_run else ''}{report.changed} object(s) removed"
          if report.lines else "nothing installed by ambientctl was found")
    return status


def _clean_nodes(kube: ap.Kube, cni_ds: Obj, dry_run: bool, timeout_s: float) -> int:
    """Stop the CNI agent, then run the clean-up DaemonSet on every node and wait for it."""
    cleanup = cni_cleanup_daemonset(cni_ds)
    if dry_run:
        print(f"would delete {_label(cni_ds)}, then run DaemonSet {CLEANUP} on every node "
              "(removes the CNI chaining and pod captures)")
        return 0
    ap.delete_objects(kube, [cni_ds])
    print(f"deleted DaemonSet {CNI} (the CNI agent)")
    report = ap.apply_objects(kube, [cleanup])
    for line in report.lines:
        print(line)
    print("cleaning nodes: CNI chaining, plugin and pod captures")
    if not ap.wait_rollouts(kube, [cleanup], timeout_s):
        print(f"ambientctl uninstall: the node clean-up did not finish on every node within "
              f"{timeout_s:.0f}s; look at `kubectl -n {cni_ds['metadata']['namespace']} logs "
              f"ds/{CLEANUP} -c cleanup`; on nodes it missed, run "
              "`python -m ambient.install.hostplugin uninstall` by hand", file=sys.stderr)
        return 1
    return 0


def _label(obj: Obj) -> str:
    return f"{obj['kind']} {obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"


def manifest_generate(v: Values, with_ca_secret: bool = False) -> str:
    objs = render(v)
    if with_ca_secret:
        split = next(i + 1 for i, o in enumerate(objs) if o["kind"] in ("Namespace",
                                                                         "ServiceAccount"))
        objs = objs[:split] + [ap.ca_secret(v)] + objs[split:]
    return to_yaml(objs)


def run(args: argparse.Namespace) -> int:
    prog = f"ambientctl {args.command}"
    try:
        if args.command == "manifest":
            sys.stdout.write(manifest_generate(load(args.values, args.sets),
                                               args.with_ca_secret))
            return 0
        kube = ap.Kube(kube_client(args.kubeconfig, args.context))
        if args.command == "install":
            return install(kube, load(args.values, args.sets), args.dry_run, args.wait,
                           args.timeout)
        return uninstall(kube, args.dry_run, not args.skip_node_cleanup, args.timeout)
    except ValuesError as e:
        print(f"{prog}: bad values: {e}", file=sys.stderr)
        return 2
    except ap.InstallError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
