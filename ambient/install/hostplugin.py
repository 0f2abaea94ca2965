"""Put the chained CNI plugin on a Kubernetes node (the CNI DaemonSet's init container).

The container runtime runs CNI plugins on the *host*, outside our image, so the launcher
``python -m cni.install`` writes must not point at the image's interpreter or source tree.
This step copies what the plugin imports (``cni/plugin.py``, ``cni/events.py``,
``cni/enroll.py`` and msgpack's pure-Python modules, no compiled code) into
``<bin-dir>/ambient-cni.d`` and installs the launcher with the host's interpreter
(``--host-python``, default ``/usr/bin/python3``, 3.11 or newer) and the bundle's *host*
path baked in, then chains our entry into the primary CNI
config.  ``uninstall`` removes the entry, the launcher and the bundle.

Usage (inside the DaemonSet, host dirs mounted under ``/host``)::

    python -m ambient.install.hostplugin install --conf-dir /host/etc/cni/net.d \\
        --bin-dir /host/opt/cni/bin --host-bin-dir /opt/cni/bin --host-python /usr/bin/python3

Invariants: the bundle is replaced atomically (a new dir renamed over the old), an
unchanged bundle is not rewritten, and the pure ``bundle_files`` decides what is copied.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile
from pathlib import Path

BUNDLE_DIR = "ambient-cni.d"
PLUGIN_MODULES = ("cni/__init__.py", "cni/plugin.py", "cni/events.py", "cni/enroll.py")


def bundle_files(source_root: Path, msgpack_dir: Path) -> list[tuple[Path, str]]:
    """(source file, path inside the bundle) for everything the plugin imports."""
    files = [(source_root / rel, rel) for rel in PLUGIN_MODULES]
    for py in sorted(msgpack_dir.glob("*.py")):
        files.append((py, f"msgpack/{py.name}"))
    return files


def _same(files: list[tuple[Path, str]], dest: Path) -> bool:
    if not dest.is_dir():
        return False
    present = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()}
    if present != {rel for _, rel in files}:
        return False
    return all(filecmp.cmp(src, dest / rel, shallow=False) for src, rel in files)


def write_bundle(bin_dir: Path, source_root: Path, msgpack_dir: Path) -> bool:
    """Copy the plugin's modules to ``<bin_dir>/ambient-cni.d``; returns whether it changed."""
    files = bundle_files(source_root, msgpack_dir)
    dest = bin_dir / BUNDLE_DIR
    if _same(files, dest):
        return False
    bin_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ambient-cni.", dir=bin_dir))
    try:
        for src, rel in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / rel)
        tmp.chmod(0o755)
        old = None
        if dest.exists():
            old = bin_dir / f".{BUNDLE_DIR}.old"
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
        tmp.rename(dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def _roots() -> tuple[Path, Path]:
    import msgpack  # type: ignore[import-untyped]

    import cni

    return Path(cni.__file__).resolve().parent.parent, Path(msgpack.__file__).resolve().parent


def install(conf_dir: str, bin_dir: str, host_bin_dir: str, host_python: str,
            pod_namespace: str) -> list[str]:
    from cni.install import install as install_conf

    source_root, msgpack_dir = _roots()
    changes = []
    if write_bundle(Path(bin_dir), source_root, msgpack_dir):
        changes.append(f"wrote {os.path.join(bin_dir, BUNDLE_DIR)}")
    report = install_conf(conf_dir, bin_dir, values={"pod_namespace": pod_namespace},
                          python=host_python,
                          source_root=os.path.join(host_bin_dir, BUNDLE_DIR))
    return changes + report.changes


def uninstall(conf_dir: str, bin_dir: str) -> list[str]:
    from cni.install import uninstall as uninstall_conf

    changes = uninstall_conf(conf_dir, bin_dir).changes
    bundle = Path(bin_dir) / BUNDLE_DIR
    if bundle.exists():
        shutil.rmtree(bundle)
        changes.append(f"removed {bundle}")
    return changes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ambient.install.hostplugin",
                                description=__doc__.split("\n")[0])
    p.add_argument("action", choices=("install", "uninstall"))
    p.add_argument("--conf-dir", default="/host/etc/cni/net.d")
    p.add_argument("--bin-dir", default="/host/opt/cni/bin")
    p.add_argument("--host-bin-dir", default="/opt/cni/bin",
                   help="where --bin-dir is on the host (baked into the launcher)")
    p.add_argument("--host-python", default="/usr/bin/python3",
                   help="the host's Python 3.11+ interpreter that runs the plugin")
    p.add_argument("--pod-namespace", default="istio-system")
    a = p.parse_args(argv)
    from cni.install import InstallError

    try:
        if a.action == "install":
            changes = install(a.conf_dir, a.bin_dir, a.host_bin_dir, a.host_python,
                              a.pod_namespace)
        else:
            changes = uninstall(a.conf_dir, a.bin_dir)
    except (InstallError, OSError) as e:
        print(f"ambient-cni host install: error: {e}", file=sys.stderr)
        return 2
    for line in changes or [f"{a.action}: nothing to do"]:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
