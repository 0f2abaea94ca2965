"""``ambientctl precheck``: can this node run ambient, and what would get in the way?

Two halves:
- ``gather(conf_dir)`` reads the node (mounts, ``/sys/kernel/btf/vmlinux``, whether bcc
  imports, ``iptables -V`` and the rules in the nft and legacy backends, the CNI config dir
  and its primary config, istio-cni sockets) into a ``SystemView``. It only reads; every
  command it runs is bounded by a timeout.
- ``run_checks(view)`` is pure: findings, each with a severity (``ok``, ``info``,
  ``warning``, ``error``), what was found, and the fix. ``exit_code`` is 1 when any finding is
  an error (the node cannot run ambient as it is), else 0.

What is checked: root; eBPF capture (bcc, BTF, bpffs, cgroup v2: without them ambient falls
back to iptables, a warning); the iptables backend (which one ``iptables`` uses, and rules in
both nft and legacy, which means two writers disagree); the CNI config dir and the primary
config (``cni.install``'s choice); conflicting meshes (istio-cni / linkerd-cni entries in the
conflist, Cilium as the primary CNI, istio-cni sockets, ``ISTIO_*`` chains).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cni.install import DEFAULT_CONF_DIR, InstallError, _load, is_ours, pick_primary, to_conflist

__all__ = ["Finding", "SystemView", "exit_code", "format_findings", "gather", "run_checks"]

ISTIO_CNI_SOCKETS = ("/var/run/istio-cni/pluginevent.sock", "/var/run/istio-cni/log.sock")
CONFLICTING_PLUGINS = {
    "istio-cni": "Istio's CNI plugin (istio-cni)",
    "linkerd-cni": "Linkerd's CNI plugin (linkerd-cni)",
}


@dataclass(frozen=True)
class SystemView:
    """What ``gather`` saw; every field has a harmless default so tests set only what
    matters to them."""

    euid: int = 0
    bcc_error: str | None = None  # None: ``import bcc`` works
    btf_vmlinux: bool = True
    bpffs_mounted: bool = True
    cgroup2_mount: str | None = "/sys/fs/cgroup"
    iptables_version: str | None = "iptables v1.8.9 (nf_tables)"
    nft_rules: int = 0  # -A lines in iptables-nft-save
    legacy_rules: int = 0  # -A lines in iptables-legacy-save
    nft_available: bool = True  # the nft command or python3-nftables
    istio_chains: tuple[str, ...] = ()
    cni_conf_dir: str = DEFAULT_CONF_DIR
    cni_conf_dir_exists: bool = True
    primary_name: str | None = "10-bridge.conflist"
    primary: dict[str, Any] | None = field(default_factory=lambda: {
        "cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "bridge"}]})
    primary_error: str | None = None
    sockets: tuple[str, ...] = ()  # istio-cni sockets that exist


@dataclass(frozen=True)
class Finding:
    check: str
    severity: str
    message: str
    fix: str = ""


def _root(v: SystemView) -> Iterable[Finding]:
    if v.euid == 0:
        yield Finding("root", "ok", "running as root")
    else:
        yield Finding("root", "warning", f"running as uid {v.euid}: some checks (bpffs, "
                      "iptables rules) are incomplete, and the node components need root",
                      "run `sudo ambientctl precheck` on the node")


def _ebpf(v: SystemView) -> Iterable[Finding]:
    missing = []
    if v.bcc_error is not None:
        missing.append(f"bcc does not import ({v.bcc_error})")
    if not v.btf_vmlinux:
        missing.append("no /sys/kernel/btf/vmlinux (kernel built without BTF)")
    if not v.bpffs_mounted:
        missing.append("bpffs is not mounted at /sys/fs/bpf")
    if v.cgroup2_mount is None:
        missing.append("no cgroup v2 mount")
    if not missing:
        yield Finding("ebpf", "ok", f"eBPF capture is available (bcc, BTF, bpffs, cgroup v2 "
                      f"at {v.cgroup2_mount})")
        return
    fixes = []
    if v.bcc_error is not None:
        fixes.append("install python3-bpfcc (Debian/Ubuntu) or bcc-tools")
    if not v.bpffs_mounted:
        fixes.append("mount -t bpf bpf /sys/fs/bpf (and mount it into the agent's pod)")
    if v.cgroup2_mount is None:
        fixes.append("boot with systemd.unified_cgroup_hierarchy=1 (cgroup v2)")
    if not v.btf_vmlinux:
        fixes.append("use a kernel with CONFIG_DEBUG_INFO_BTF=y")
    yield Finding("ebpf", "warning", "eBPF capture is not available: " + "; ".join(missing)
                  + ". The agent falls back to iptables (--capture auto).", "; ".join(fixes))


def _cgroup(v: SystemView) -> Iterable[Finding]:
    if v.cgroup2_mount is not None:
        yield Finding("cgroup-v2", "ok", f"cgroup v2 is mounted at {v.cgroup2_mount}")


def _iptables(v: SystemView) -> Iterable[Finding]:
    if v.iptables_version is None and not v.nft_available:
        yield Finding("iptables", "error", "neither iptables nor nftables is available: no "
                      "capture backend can work without eBPF",
                      "install iptables (and nftables) on the node / in the image")
        return
    if v.iptables_version is None:
        yield Finding("iptables", "warning", "iptables is not installed; only the nftables "
                      "(or eBPF) backend can be used", "install iptables, or run the agent "
                      "with --capture nftables")
    else:
        mode = "nft" if "nf_tables" in v.iptables_version else "legacy"
        yield Finding("iptables", "ok", f"{v.iptables_version.strip()}: the {mode} backend")
    if v.nft_rules and v.legacy_rules:
        yield Finding("iptables-backends", "warning",
                      f"rules exist in both the nft ({v.nft_rules}) and legacy "
                      f"({v.legacy_rules}) iptables backends: two tools on this node disagree, "
                      "and packets traverse both rulesets",
                      "make kube-proxy, the primary CNI and ambient use one backend "
                      "(update-alternatives --set iptables /usr/sbin/iptables-nft)")


def _cni(v: SystemView) -> Iterable[Finding]:
    if not v.cni_conf_dir_exists:
        yield Finding("cni-config", "error", f"the CNI config dir {v.cni_conf_dir} does not "
                      "exist", "install the primary CNI first (kubelet reads its config from "
                      "there), or pass --cni-conf-dir")
        return
    if v.primary_error is not None:
        yield Finding("cni-config", "error", f"the primary CNI config is unusable: "
                      f"{v.primary_error}", "fix or remove the file; the runtime cannot use "
                      "it either")
        return
    if v.primary_name is None or v.primary is None:
        yield Finding("cni-config", "error", f"no CNI network config in {v.cni_conf_dir}",
                      "install the primary CNI first, then ambient (its plugin is chained "
                      "after the primary)")
        return
    plugins = [p for p in v.primary.get("plugins", []) if isinstance(p, dict)]
    types = [str(p.get("type")) for p in plugins]
    ours = "installed" if any(is_ours(p) for p in plugins) else "not installed yet"
    yield Finding("cni-config", "ok", f"primary CNI config {v.primary_name} (plugins: "
                  f"{', '.join(types) or 'none'}); ambient's plugin is {ours}")
    for t in types:
        if t in CONFLICTING_PLUGINS:
            yield Finding("conflicting-mesh", "error", f"{CONFLICTING_PLUGINS[t]} is chained "
                          f"in {v.primary_name}: two meshes would capture the same pods",
                          f"uninstall it first (e.g. `istioctl uninstall --purge` or "
                          f"`linkerd uninstall`), or remove the {t!r} entry")
    if types and types[0].startswith("cilium"):
        yield Finding("cilium", "warning", "Cilium is the primary CNI: with its defaults it "
                      "removes other CNI configs and its socket load-balancing bypasses "
                      "in-pod capture", "install Cilium with cni.exclusive=false and "
                      "socketLB.hostNamespaceOnly=true (and without bpf masquerade)")


def _leftovers(v: SystemView) -> Iterable[Finding]:
    if v.sockets:
        yield Finding("conflicting-mesh", "warning", f"istio-cni sockets exist "
                      f"({', '.join(v.sockets)}): Istio's node agent runs or ran here",
                      "uninstall Istio's CNI DaemonSet before installing ambient")
    if v.istio_chains:
        yield Finding("iptables-chains", "info", f"ISTIO_* chains exist in the host netns "
                      f"({', '.join(v.istio_chains)}): kubelet-probe SNAT of ambient, or of an "
                      "Istio install", "if Istio is not (or no longer) installed and ambient "
                      "is not running, remove them")


_CHECKS = (_root, _ebpf, _cgroup, _iptables, _cni, _leftovers)


def run_checks(view: SystemView) -> list[Finding]:
    """Every finding for ``view``, in a stable order."""
    return [f for check in _CHECKS for f in check(view)]


def exit_code(findings: Iterable[Finding]) -> int:
    return 1 if any(f.severity == "error" for f in findings) else 0


def format_findings(findings: Iterable[Finding]) -> str:
    marks = {"ok": "[ok]     ", "info": "[info]   ", "warning": "[warning]", "error": "[ERROR]  "}
    lines = []
    for f in findings:
        lines.append(f"{marks[f.severity]} {f.check}: {f.message}")
        if f.fix and f.severity != "ok":
            lines.append(f"           fix: {f.fix}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# gathering (the only I/O)


def _mounts() -> list[tuple[str, str]]:
    out = []
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) > 4 and right:
                    out.append((fields[4], right.split()[0]))
    except OSError:
        pass
    return out


def _run(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout if p.returncode == 0 else None


def _rules(save: str | None) -> tuple[int, set[str]]:
    if not save:
        return 0, set()
    lines = save.splitlines()
    chains = {ln[1:].split()[0] for ln in lines if ln.startswith(":ISTIO_")}
    return sum(1 for ln in lines if ln.startswith("-A ")), chains


def _bcc_error() -> str | None:
    try:
        import bcc  # noqa: F401
    except Exception as e:  # bcc raises various errors when libbcc is missing
        return f"{type(e).__name__}: {e}"
    return None


def gather(conf_dir: str = DEFAULT_CONF_DIR) -> SystemView:
    mounts = _mounts()
    cg2 = next((mp for mp, fs in mounts if fs == "cgroup2"), None)
    bpffs = any(fs == "bpf" for _, fs in mounts)
    nft_n, nft_chains = _rules(_run(["iptables-nft-save"]))
    leg_n, leg_chains = _rules(_run(["iptables-legacy-save"]))
    version = _run(["iptables", "-V"])
    try:
        import nftables  # noqa: F401

        nft_ok = True
    except ImportError:
        nft_ok = shutil.which("nft") is not None
    exists = os.path.isdir(conf_dir)
    primary_name = primary = primary_error = None
    if exists:
        try:
            primary_name = pick_primary(
                [n for n in os.listdir(conf_dir) if os.path.isfile(os.path.join(conf_dir, n))])
            if primary_name is not None:
                primary = to_conflist(_load(os.path.join(conf_dir, primary_name)), primary_name)
        except (InstallError, OSError) as e:
            primary_error = str(e)
    return SystemView(
        euid=os.geteuid(), bcc_error=_bcc_error(),
        btf_vmlinux=os.path.exists("/sys/kernel/btf/vmlinux"), bpffs_mounted=bpffs,
        cgroup2_mount=cg2, iptables_version=version, nft_rules=nft_n, legacy_rules=leg_n,
        nft_available=nft_ok, istio_chains=tuple(sorted(nft_chains | leg_chains)),
        cni_conf_dir=conf_dir, cni_conf_dir_exists=exists, primary_name=primary_name,
        primary=primary, primary_error=primary_error,
        sockets=tuple(s for s in ISTIO_CNI_SOCKETS if os.path.exists(s)),
    )
