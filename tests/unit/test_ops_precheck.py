"""``precheck``: pure checks over an injected system view, plus one real run on this node."""

# ruff: noqa: E501

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ambient.ops.precheck import SystemView, exit_code, format_findings, gather, run_checks

OK = SystemView()


def by_check(view: SystemView) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in run_checks(view):
        out.setdefault(f.check, []).append(f.severity)
    return out


def test_a_good_node_has_no_problems() -> None:
    findings = run_checks(OK)
    assert {f.severity for f in findings} == {"ok"}
    assert exit_code(findings) == 0


def _primary(*types: str) -> dict:
    return {"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": t} for t in types]}


# (id, changes to a good view, check, severity, exit code, words in the message or fix)
CASES = [
    ("not root", {"euid": 1000}, "root", "warning", 0, "sudo"),
    ("no bcc", {"bcc_error": "ModuleNotFoundError: No module named 'bcc'"}, "ebpf", "warning", 0, "python3-bpfcc"),
    ("no BTF", {"btf_vmlinux": False}, "ebpf", "warning", 0, "CONFIG_DEBUG_INFO_BTF"),
    ("no bpffs", {"bpffs_mounted": False}, "ebpf", "warning", 0, "mount -t bpf"),
    ("no cgroup v2", {"cgroup2_mount": None}, "ebpf", "warning", 0, "unified_cgroup_hierarchy"),
    ("legacy iptables", {"iptables_version": "iptables v1.8.7 (legacy)"}, "iptables", "ok", 0, "legacy backend"),
    ("rules in both backends", {"nft_rules": 12, "legacy_rules": 3}, "iptables-backends", "warning", 0, "update-alternatives"),
    ("no iptables but nft", {"iptables_version": None}, "iptables", "warning", 0, "--capture nftables"),
    ("no iptables, no nft", {"iptables_version": None, "nft_available": False}, "iptables", "error", 1, "install iptables"),
    ("no CNI conf dir", {"cni_conf_dir_exists": False}, "cni-config", "error", 1, "install the primary CNI first"),
    ("empty CNI conf dir", {"primary_name": None, "primary": None}, "cni-config", "error", 1, "install the primary CNI first"),
    ("broken primary", {"primary_error": "10-x.conf is not valid JSON"}, "cni-config", "error", 1, "not valid JSON"),
    ("istio-cni chained", {"primary": _primary("bridge", "istio-cni")}, "conflicting-mesh", "error", 1, "istioctl uninstall"),
    ("linkerd-cni chained", {"primary": _primary("calico", "linkerd-cni")}, "conflicting-mesh", "error", 1, "linkerd uninstall"),
    ("cilium primary", {"primary": _primary("cilium-cni")}, "cilium", "warning", 0, "cni.exclusive=false"),
    ("istio-cni socket", {"sockets": ("/var/run/istio-cni/pluginevent.sock",)}, "conflicting-mesh", "warning", 0, "Istio's CNI"),
    ("ISTIO chains", {"istio_chains": ("ISTIO_POSTRT",)}, "iptables-chains", "info", 0, "ISTIO_POSTRT"),
]


@pytest.mark.parametrize(("changes", "check", "severity", "code", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_findings(changes, check, severity, code, words) -> None:
    view = dataclasses.replace(OK, **changes)
    findings = run_checks(view)
    hits = [f for f in findings if f.check == check and f.severity == severity]
    assert hits, format_findings(findings)
    assert any(words in f.message + f.fix for f in hits), hits
    assert exit_code(findings) == code
    if severity in ("warning", "error"):
        assert all(f.fix for f in hits), "every problem says how to fix it"


def test_ours_installed_is_reported() -> None:
    f = next(f for f in run_checks(dataclasses.replace(OK, primary=_primary("bridge", "ambient-cni"))) if f.check == "cni-config")
    assert "is installed" in f.message


def test_real_node(tmp_path: Path) -> None:
    """gather() on this machine with a CNI dir we control: a conflist with istio-cni chained."""
    conf = tmp_path / "net.d"
    conf.mkdir()
    (conf / "10-bridge.conflist").write_text(json.dumps(_primary("bridge", "istio-cni")))
    (conf / "99-later.conf").write_text("{not json")  # not the primary: ignored
    view = gather(str(conf))
    assert view.cni_conf_dir_exists and view.primary_name == "10-bridge.conflist"
    assert view.iptables_version and "iptables" in view.iptables_version
    findings = run_checks(view)
    assert any(f.check == "conflicting-mesh" and f.severity == "error" for f in findings)
    assert exit_code(findings) == 1
    (conf / "10-bridge.conflist").write_text(json.dumps(_primary("bridge")))
    view = gather(str(conf))
    assert not [f for f in run_checks(view) if f.check in ("cni-config", "conflicting-mesh") and f.severity == "error"]
    assert gather(str(tmp_path / "missing")).cni_conf_dir_exists is False
