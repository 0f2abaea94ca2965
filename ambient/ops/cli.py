"""argparse wiring of the operator verbs; ``ambient.cli`` calls ``add_commands`` and ``run``.

Verbs: ``ztunnel-config`` (alias ``zc``), ``policy explain``, ``tap``, ``precheck``,
``enroll``/``unenroll``, ``waypoint``, ``version``. Where a ztunnel is read, the source is
``--admin URL`` (repeatable), ``--node NODE`` (repeatable; a node of the local cluster
``--cluster NAME``, default: the only one under ``--run-dir``) or ``--file dump.json``.
Where cluster objects change, the target is Kubernetes (kubeconfig) unless ``--cluster`` names
a local cluster.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ambient import __version__
from ambient.ops.targets import DEFAULT_RUN_ROOT, TargetError

__all__ = ["COMMANDS", "add_commands", "run"]

COMMANDS = ("ztunnel-config", "zc", "policy", "tap", "precheck", "enroll", "unenroll",
            "waypoint", "version")


def _ztunnel_source(p: argparse.ArgumentParser, *, file: bool = True, many: bool = False) -> None:
    p.add_argument("--admin", action="append", default=[], metavar="URL",
                   help="a ztunnel admin endpoint (default http://127.0.0.1:15000)"
                   + ("; repeat for several" if many else ""))
    p.add_argument("--node", action="append", default=[],
                   help="a node of the local cluster (its ztunnel's admin port in the node's "
                   "netns)" + ("; repeat for several" if many else ""))
    p.add_argument("--cluster", default=None,
                   help="local cluster name (default: the only one under --run-dir)")
    p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_ROOT)
    p.add_argument("--admin-port", type=int, default=15000,
                   help="the admin port inside a node (default %(default)s)")
    if file:
        p.add_argument("-f", "--file", type=Path, default=None,
                       help="a saved config dump (curl :15000/config_dump > dump.json)")


def _objects_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", default=None,
                   help="change a local cluster's manifests instead of Kubernetes")
    p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_ROOT)
    p.add_argument("--context", default=None, help="kubeconfig context")


def add_commands(sub: Any) -> None:
    zc = sub.add_parser("ztunnel-config", aliases=["zc"],
                        help="show a ztunnel's workloads, services, policies, certificates, "
                        "connections")
    zc.add_argument("section", choices=["workloads", "workload", "w", "services", "service",
                                        "svc", "policies", "policy", "pol", "certificates",
                                        "certificate", "cert", "connections", "cons", "all"])
    _ztunnel_source(zc)
    zc.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    zc.add_argument("-n", "--namespace", default=None, help="only this namespace")
    zc.add_argument("--address", default=None, help="only this workload/service IP")
    zc.add_argument("--workload-node", default=None, help="only workloads on this node")

    pol = sub.add_parser("policy", help="explain L4 authorization decisions")
    psub = pol.add_subparsers(dest="policy_command", required=True)
    ex = psub.add_parser("explain", help="which policies apply to SRC -> DST:PORT and why")
    ex.add_argument("src", help="source: NS/POD or an IP")
    ex.add_argument("dst", help="destination: NS/POD:PORT, NS/SERVICE:PORT, HOSTNAME:PORT or "
                    "IP:PORT (a pod or a service VIP)")
    _ztunnel_source(ex)
    ex.add_argument("--plaintext", action="store_true",
                    help="explain as if the source sent plaintext (no identity)")
    ex.add_argument("-o", "--output", choices=["text", "json"], default="text")

    tap = sub.add_parser("tap", help="stream live connection events from ztunnels")
    _ztunnel_source(tap, file=False, many=True)
    tap.add_argument("-n", "--namespace", default=None)
    tap.add_argument("--workload", default=None, help="POD or NS/POD (source or destination)")
    tap.add_argument("--denied", action="store_true", help="only connections that were denied")
    tap.add_argument("--closed", action="store_true", help="only close events (with totals)")
    tap.add_argument("-o", "--output", choices=["table", "json"], default="table")
    tap.add_argument("--count", type=int, default=None, help="stop after N events")
    tap.add_argument("--duration", type=float, default=None, help="stop after S seconds")

    pre = sub.add_parser("precheck", help="check this node for ambient's requirements")
    pre.add_argument("--cni-conf-dir", default="/etc/cni/net.d")
    pre.add_argument("-o", "--output", choices=["text", "json"], default="text")

    for verb, text in (("enroll", "add a namespace to the mesh"),
                       ("unenroll", "take a namespace out of the mesh")):
        e = sub.add_parser(verb, help=f"{text} (label istio.io/dataplane-mode)")
        e.add_argument("namespace")
        _objects_target(e)

    wp = sub.add_parser("waypoint", help="manage waypoints (Gateways of class istio-waypoint)")
    wsub = wp.add_subparsers(dest="waypoint_command", required=True)
    for verb in ("apply", "list", "status", "delete"):
        w = wsub.add_parser(verb)
        w.add_argument("-n", "--namespace", default=None if verb == "list" else "default")
        if verb != "list":
            w.add_argument("--name", default="waypoint")
        if verb == "apply":
            w.add_argument("--for", dest="for_", default="service",
                           choices=["service", "workload", "all", "none"])
            w.add_argument("--enroll-namespace", action="store_true",
                           help="label the namespace istio.io/use-waypoint=<name>")
        if verb == "list":
            w.add_argument("-A", "--all-namespaces", action="store_true")
        _objects_target(w)

    ver = sub.add_parser("version", help="print the version (and the mesh's with --remote)")
    ver.add_argument("--remote", action="store_true",
                     help="also ask ztunnels (--admin/--node, or every node of a local cluster)")
    _ztunnel_source(ver, file=False, many=True)


_SECTION = {"workload": "workloads", "w": "workloads", "service": "services",
            "svc": "services", "policy": "policies", "pol": "policies",
            "certificate": "certificates", "cert": "certificates", "cons": "connections"}


def _targets(args: argparse.Namespace, *, all_nodes: bool = False) -> list[Any]:
    from ambient.ops.targets import resolve_targets

    return resolve_targets(args.admin, args.node, args.cluster, args.run_dir,
                           port=args.admin_port, all_nodes=all_nodes)


def _dump(args: argparse.Namespace) -> dict[str, Any]:
    from ambient.ops.targets import get_json, load_dump_file

    if getattr(args, "file", None) is not None:
        return load_dump_file(args.file)
    targets = _targets(args)
    if len(targets) != 1:
        raise TargetError("give one ztunnel (one --admin or --node)")
    dump = get_json(targets[0], "/config_dump")
    if not isinstance(dump, dict):
        raise TargetError(f"{targets[0].describe()}/config_dump is not a JSON object")
    return dump


def _ztunnel_config(args: argparse.Namespace) -> int:
    from ambient.ops import zconfig
    from ambient.ops.targets import get_json

    section = _SECTION.get(args.section, args.section)
    conns: list[Any] = []
    dump: dict[str, Any] = {}
    if section in ("connections", "all"):
        if args.file is not None:
            dump = _dump(args)
            conns = list(dump.get("connections") or [])
        else:
            conns = list(get_json(_targets(args)[0], "/connections") or [])
    if section != "connections" and not dump:
        dump = _dump(args)
    f = zconfig.Filters(args.namespace, args.address, args.workload_node)
    sys.stdout.write(zconfig.render(section, dump, args.output, f, connections=conns))
    return 0


def _explain(args: argparse.Namespace) -> int:
    from ambient.ops import explain
    from ambient.ops.dumpstate import state_from_dump

    state, errors = state_from_dump(_dump(args))
    for e in errors:
        print(f"warning: skipped from the config dump: {e}", file=sys.stderr)
    try:
        cases = explain.resolve(state, args.src, args.dst, plaintext=args.plaintext)
    except explain.ExplainError as e:
        print(f"policy explain: {e}", file=sys.stderr)
        return 2
    items = [explain.explain_case(state, c) for c in cases]
    if args.output == "json":
        print(json.dumps(explain.to_json(items), indent=2))
    else:
        sys.stdout.write(explain.render(items))
    return 0


def _tap(args: argparse.Namespace) -> int:
    from ambient.ops.tap import TapFilter, run_tap

    f = TapFilter(args.namespace, args.workload, args.denied, args.closed)
    return run_tap(_targets(args, all_nodes=True), f, args.output, count=args.count,
                   duration=args.duration)


def _precheck(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ambient.ops.precheck import exit_code, format_findings, gather, run_checks

    findings = run_checks(gather(args.cni_conf_dir))
    if args.output == "json":
        print(json.dumps([asdict(f) for f in findings], indent=2))
    else:
        sys.stdout.write(format_findings(findings))
    return exit_code(findings)


def _backend(args: argparse.Namespace) -> Any:
    from ambient.ops.objects import KubeBackend, LocalBackend

    if args.cluster:
        return LocalBackend.for_cluster(args.run_dir, args.cluster)
    return KubeBackend(context=args.context)


def _waypoint(args: argparse.Namespace) -> int:
    from ambient.ops import objects
    from ambient.ops.zconfig import render_table

    b = _backend(args)
    cmd = args.waypoint_command
    if cmd == "apply":
        for line in objects.waypoint_apply(b, args.namespace, args.name, args.for_,
                                           args.enroll_namespace):
            print(line)
    elif cmd == "list":
        ns = None if args.all_namespaces else (args.namespace or "default")
        rows = objects.waypoint_list(b, ns)
        if not rows:
            print("no waypoints found" + ("" if ns is None else f" in namespace {ns}"))
        else:
            sys.stdout.write(render_table(("NAMESPACE", "NAME", "FOR", "PROGRAMMED"), rows))
    elif cmd == "status":
        ok, why = objects.waypoint_status(b, args.namespace, args.name)
        print(f"waypoint {args.namespace}/{args.name}: {'ready' if ok else 'NOT ready'}: {why}")
        return 0 if ok else 1
    else:
        print(objects.waypoint_delete(b, args.namespace, args.name))
    return 0


def _version(args: argparse.Namespace) -> int:
    print(f"client version: {__version__}")
    if not args.remote:
        return 0
    from ambient.ops.targets import get_json

    status = 0
    for t in _targets(args, all_nodes=True):
        try:
            dump = get_json(t, "/config_dump")
            print(f"ztunnel version ({t.label}): {dump.get('version', 'unknown')}")
            cp = (dump.get("config") or {}).get("xds_address")
            if cp:
                print(f"  control plane ({t.label}): {cp} (serves xDS; its version is not "
                      "exposed over xDS)")
        except TargetError as e:
            print(f"ztunnel version ({t.label}): unreachable: {e}")
            status = 1
    return status


def run(args: argparse.Namespace) -> int | None:
    """Run an operator verb; None if ``args.command`` is not one of ours."""
    from ambient.ops.objects import ObjectError, enroll

    handlers = {
        "ztunnel-config": _ztunnel_config, "zc": _ztunnel_config, "tap": _tap,
        "precheck": _precheck, "waypoint": _waypoint, "version": _version,
        "policy": _explain,
        "enroll": lambda a: print(enroll(_backend(a), a.namespace, True)) or 0,
        "unenroll": lambda a: print(enroll(_backend(a), a.namespace, False)) or 0,
    }
    handler = handlers.get(args.command)
    if handler is None:
        return None
    try:
        return int(handler(args))
    except (TargetError, ObjectError) as e:
        print(f"{args.command}: {e}", file=sys.stderr)
        return 1
