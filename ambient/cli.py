"""``ambientctl``: the operator CLI.

The local-cluster verbs (``demo``, ``down``), the control plane, and the operator verbs
(``ztunnel-config``, ``policy explain``, ``tap``, ``precheck``, ``enroll``/``unenroll``,
``waypoint``, ``version``; see ``ambient.ops``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_MANIFESTS = Path(__file__).resolve().parent.parent / "examples" / "demo.yaml"
DEFAULT_RUN_DIR = Path("/run/ambient")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ambientctl", description="ambient service mesh CLI")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build the local mesh and show it working")
    demo.add_argument("-f", "--manifests", type=Path, default=DEFAULT_MANIFESTS,
                      help="Kubernetes manifests describing the cluster (default: %(default)s)")
    demo.add_argument("--keep", action="store_true",
                      help="leave the cluster running; remove it later with `ambientctl down`")
    demo.add_argument("--name", default="ambdemo", help="cluster name (default: %(default)s)")
    demo.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    demo.add_argument("--capture", choices=["auto", "iptables", "nftables", "ebpf"],
                      default="auto", help="capture backend of the CNI agents (default: eBPF "
                      "where the kernel supports it, else iptables)")
    down = sub.add_parser("down", help="remove a local cluster left by `demo --keep` or a crash")
    down.add_argument("--name", default=None, help="cluster name (default: all under --run-dir)")
    down.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    from ambient.ops.cli import add_commands as add_ops_commands

    add_ops_commands(sub)  # ztunnel-config, policy, tap, precheck, (un)enroll, waypoint, version
    from ambient.install.commands import add_subcommands as add_install_commands

    add_install_commands(sub)  # install, uninstall, manifest generate (ambient.install)
    from controlplane.main import add_arguments as controlplane_arguments

    controlplane_arguments(sub.add_parser(
        "controlplane", help="run the control plane (xDS server) from a manifests directory"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from ambient.ops.cli import run as run_ops

    status = run_ops(args)
    if status is not None:
        return status
    if args.command in ("install", "uninstall", "manifest"):
        from ambient.install.commands import run as run_install

        return run_install(args)
    if args.command == "demo":
        from ambient.cluster.demo import run_demo

        return run_demo(args.manifests, name=args.name, run_dir=args.run_dir, keep=args.keep,
                        capture=args.capture)
    if args.command == "controlplane":
        from controlplane.main import run_from_args

        return run_from_args(args)
    if args.command == "down":
        from ambient.cluster.demo import down

        return down(args.run_dir, args.name)
    return 2


if __name__ == "__main__":
    sys.exit(main())
