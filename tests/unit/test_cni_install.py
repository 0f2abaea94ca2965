"""The CNI config installer: golden conf dirs (tests/golden/cni/<case>/in -> out), the pure
merge/unmerge functions, errors, the launcher and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cni import install as inst

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "cni"
REPO = Path(__file__).resolve().parents[2]

INSTALL_CASES = ["conflist_merge", "conf_conversion", "json_conversion", "drift_altered",
                 "drift_duplicate", "already_installed", "lexical_choice", "values"]


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _assert_matches_golden(conf_dir: Path, expected: Path) -> None:
    got, want = _snapshot(conf_dir), _snapshot(expected)
    assert sorted(got) == sorted(want), "file names differ"
    for name, data in want.items():
        if name.endswith(inst.CONF_EXTENSIONS):
            # meaning-equal, key order included (json.dumps keeps insertion order)
            assert json.dumps(json.loads(got[name])) == json.dumps(json.loads(data)), name
        else:
            assert got[name] == data, name


def _setup(tmp_path: Path, case: str) -> tuple[Path, Path]:
    conf_dir, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    shutil.copytree(GOLDEN / case / "in", conf_dir)
    return conf_dir, bin_dir


def _values(case: str) -> dict[str, Any]:
    path = GOLDEN / case / "values.json"
    return json.loads(path.read_text()) if path.exists() else {}


@pytest.mark.parametrize("case", INSTALL_CASES)
def test_install_golden_and_idempotent(tmp_path: Path, case: str) -> None:
    conf_dir, bin_dir = _setup(tmp_path, case)
    before = _snapshot(conf_dir)
    report = inst.install(str(conf_dir), str(bin_dir), values=_values(case))
    _assert_matches_golden(conf_dir, GOLDEN / case / "out")
    # untouched files are byte-identical (not rewritten)
    after = _snapshot(conf_dir)
    for name, data in before.items():
        if name in after and os.path.join(str(conf_dir), name) != report.primary:
            assert after[name] == data, name
    # installing again changes nothing, not even mtimes
    stamps = {p.name: p.stat().st_mtime_ns for p in conf_dir.iterdir()}
    again = inst.install(str(conf_dir), str(bin_dir), values=_values(case))
    assert again.changes == []
    assert {p.name: p.stat().st_mtime_ns for p in conf_dir.iterdir()} == stamps
    assert _snapshot(conf_dir) == after
    assert inst.check(str(conf_dir), str(bin_dir), values=_values(case)).changes == []
    assert not [p for p in conf_dir.iterdir() if p.name.endswith(".tmp")]


def test_already_installed_writes_nothing(tmp_path: Path) -> None:
    conf_dir, bin_dir = _setup(tmp_path, "already_installed")
    inst.install_launcher(str(bin_dir), sys.executable, inst.SOURCE_ROOT)
    report = inst.install(str(conf_dir), str(bin_dir))
    assert report.changes == []


def test_drift_is_reported_then_repaired(tmp_path: Path) -> None:
    for case, needle in (("drift_altered", "differs in: ambient_enabled, bogus, "
                                           "cni_agent_run_dir, exclude_namespaces"),
                         ("drift_duplicate", "2 ambient-cni entries"),
                         ("conflist_merge", "no ambient-cni entry"),
                         ("conf_conversion", "lone plugin config")):
        conf_dir, bin_dir = _setup(tmp_path / case, case)
        found = inst.check(str(conf_dir), str(bin_dir)).changes
        assert any(needle in f for f in found), (case, found)
        assert any("ambient-cni is missing" in f for f in found)
        inst.install(str(conf_dir), str(bin_dir))
        assert inst.check(str(conf_dir), str(bin_dir)).changes == []


def test_removed_entry_restored(tmp_path: Path) -> None:
    conf_dir, bin_dir = _setup(tmp_path, "conflist_merge")
    inst.install(str(conf_dir), str(bin_dir))
    path = conf_dir / "10-bridge.conflist"
    doc = json.loads(path.read_text())
    doc["plugins"] = [p for p in doc["plugins"] if p["type"] != "ambient-cni"]
    path.write_text(json.dumps(doc))  # someone else (the primary CNI) rewrote its config
    assert inst.install(str(conf_dir), str(bin_dir)).changes == [f"wrote {path}"]
    _assert_matches_golden(conf_dir, GOLDEN / "conflist_merge" / "out")


def test_uninstall_golden(tmp_path: Path) -> None:
    conf_dir, bin_dir = _setup(tmp_path, "uninstall")
    inst.install_launcher(str(bin_dir), sys.executable, inst.SOURCE_ROOT)
    report = inst.uninstall(str(conf_dir), str(bin_dir))
    _assert_matches_golden(conf_dir, GOLDEN / "uninstall" / "out")
    assert not (bin_dir / "ambient-cni").exists()
    assert len(report.changes) == 3
    assert inst.uninstall(str(conf_dir), str(bin_dir)).changes == []


def test_uninstall_after_conversion_keeps_conflist(tmp_path: Path) -> None:
    conf_dir, bin_dir = _setup(tmp_path, "conf_conversion")
    inst.install(str(conf_dir), str(bin_dir))
    inst.uninstall(str(conf_dir), str(bin_dir))
    assert sorted(p.name for p in conf_dir.iterdir()) == ["10-flannel.conflist",
                                                           "99-loopback.conf"]
    doc = json.loads((conf_dir / "10-flannel.conflist").read_text())
    assert doc == {"cniVersion": "0.3.1", "name": "cbr0", "plugins": [
        {"type": "flannel", "delegate": {"hairpinMode": True, "isDefaultGateway": True}}]}


def test_conf_name_overrides_lexical_choice(tmp_path: Path) -> None:
    conf_dir, bin_dir = _setup(tmp_path, "lexical_choice")
    report = inst.install(str(conf_dir), str(bin_dir), conf_name="50-other.json")
    assert report.primary == str(conf_dir / "50-other.json")
    doc = json.loads((conf_dir / "50-other.json").read_text())
    assert [p["type"] for p in doc["plugins"]] == ["portmap", "ambient-cni"]
    assert json.loads((conf_dir / "05-cilium.conflist").read_text())["plugins"][-1]["type"] \
        == "cilium-cni"
    with pytest.raises(inst.InstallError, match="no such file"):
        inst.install(str(conf_dir), str(bin_dir), conf_name="nope.conflist")


# ------------------------------------------------------------------ errors


def test_no_primary_config(tmp_path: Path) -> None:
    (tmp_path / "net.d").mkdir()
    (tmp_path / "net.d" / "README").write_text("x")
    with pytest.raises(inst.InstallError, match="install the primary CNI first"):
        inst.install(str(tmp_path / "net.d"), str(tmp_path / "bin"))
    with pytest.raises(inst.InstallError, match="does not exist: install the primary CNI"):
        inst.install(str(tmp_path / "missing"), str(tmp_path / "bin"))
    assert not (tmp_path / "bin").exists()


@pytest.mark.parametrize("text, needle", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not an object"),
    ('{"cniVersion": "1.0.0", "name": "x", "plugins": {}}', "'plugins' is not a list"),
    ('{"cniVersion": "1.0.0", "type": "bridge"}', "no 'name'"),
    ('{"name": "n", "type": "bridge"}', "no 'cniVersion'"),
    ('{"cniVersion": "1.0.0", "name": "n", "type": "ambient-cni"}', "install the primary CNI"),
])
def test_invalid_primary_config(tmp_path: Path, text: str, needle: str) -> None:
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    (conf_dir / "10-x.conf").write_text(text)
    with pytest.raises(inst.InstallError, match=needle):
        inst.install(str(conf_dir), str(tmp_path / "bin"))
    assert (conf_dir / "10-x.conf").read_text() == text
    assert sorted(os.listdir(conf_dir)) == ["10-x.conf"]


def test_conversion_refuses_to_clobber_existing_conflist(tmp_path: Path) -> None:
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    (conf_dir / "10-x.conf").write_text('{"cniVersion": "1.0.0", "name": "a", "type": "ptp"}')
    (conf_dir / "10-x.conflist").write_text('{"cniVersion": "1.0.0", "name": "b", "plugins": []}')
    with pytest.raises(inst.InstallError, match="exists already"):
        inst.install(str(conf_dir), str(tmp_path / "bin"))


@pytest.mark.parametrize("values, needle", [
    ({"nope": 1}, "unknown field"),
    ({"type": "other"}, "may not change type"),
    ({"exclude_namespaces": "kube-system"}, "exclude_namespaces"),
    ({"agent_timeout_s": -1}, "agent_timeout_s"),
])
def test_invalid_values(values: dict[str, Any], needle: str) -> None:
    with pytest.raises(inst.InstallError, match=needle):
        inst.make_entry(values)


# ------------------------------------------------------------------ pure functions


def test_merge_and_unmerge_do_not_mutate_input() -> None:
    doc = json.loads((GOLDEN / "drift_duplicate" / "in" / "10-bridge.conflist").read_text())
    frozen = json.dumps(doc)
    entry = inst.make_entry()
    merged = inst.merge(doc, entry)
    assert json.dumps(doc) == frozen
    assert inst.merge(merged, entry) == merged
    cleaned = inst.unmerge(merged)
    assert json.dumps(doc) == frozen
    assert [p["type"] for p in cleaned["plugins"]] == ["bridge", "portmap"]
    assert inst.merge(cleaned, entry)["plugins"][-1] == entry
    assert inst.drift(merged, entry) == []


@pytest.mark.parametrize("names, want", [
    (["99-b.conflist", "10-a.conf", "05-z.json", "00-readme.md"], "05-z.json"),
    (["10-a.conflist", "10-a.conf"], "10-a.conf"),
    (["a.CONF", "notes"], None),
    ([], None),
])
def test_pick_primary(names: list[str], want: str | None) -> None:
    assert inst.pick_primary(names) == want


def test_load_values_inline_and_file(tmp_path: Path) -> None:
    assert inst.load_values('{"plugin_log_level": "debug"}') == {"plugin_log_level": "debug"}
    f = tmp_path / "v.yaml"
    f.write_text("pod_namespace: mesh\nexclude_namespaces: [a, b]\n")
    assert inst.load_values(str(f)) == {"pod_namespace": "mesh", "exclude_namespaces": ["a", "b"]}
    with pytest.raises(inst.InstallError, match="mapping"):
        inst.load_values("[1]")


# ------------------------------------------------------------------ launcher and CLI


def test_launcher_has_absolute_interpreter_and_runs_with_empty_env(tmp_path: Path) -> None:
    conf_dir, bin_dir = _setup(tmp_path, "conflist_merge")
    inst.install(str(conf_dir), str(bin_dir))
    launcher = bin_dir / "ambient-cni"
    text = launcher.read_text()
    assert text.startswith(f"#!{sys.executable} -I\n")
    assert f"_SOURCE_ROOT = {json.dumps(inst.SOURCE_ROOT)}" in text
    assert os.access(launcher, os.X_OK)
    proc = subprocess.run([str(launcher)], input=b'{"cniVersion": "0.4.0"}',
                          env={"CNI_COMMAND": "VERSION"}, cwd="/", capture_output=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"cniVersion": "0.4.0",
                                       "supportedVersions": ["0.3.1", "0.4.0", "1.0.0"]}
    # with no agent listening, an ADD for a Kubernetes pod fails with "try again later"
    stdin = json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "ambient-cni",
                        "cni_agent_run_dir": str(tmp_path / "none"),
                        "prevResult": {"cniVersion": "1.0.0", "ips": []}}).encode()
    proc = subprocess.run([str(launcher)], input=stdin, cwd="/", capture_output=True, timeout=60,
                          env={"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_NETNS": "/x",
                               "CNI_IFNAME": "eth0",
                               "CNI_ARGS": "K8S_POD_NAMESPACE=d;K8S_POD_NAME=p"}, check=False)
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["code"] == 11
    assert b"not reachable" in proc.stderr


def test_launcher_changed_is_rewritten(tmp_path: Path) -> None:
    conf_dir, bin_dir = _setup(tmp_path, "already_installed")
    inst.install(str(conf_dir), str(bin_dir))
    (bin_dir / "ambient-cni").write_text("#!/bin/sh\nexit 0\n")
    assert any("differs" in f for f in inst.check(str(conf_dir), str(bin_dir)).changes)
    assert inst.install(str(conf_dir), str(bin_dir)).changes == [
        f"wrote {bin_dir / 'ambient-cni'}"]
    assert inst.check(str(conf_dir), str(bin_dir)).changes == []


def test_render_launcher_refuses_relative_interpreter() -> None:
    with pytest.raises(inst.InstallError, match="absolute"):
        inst.render_launcher("#!/usr/bin/env python3\n_SOURCE_ROOT = \"\"\n", "python3", "/x")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cni.install", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)


def test_cli(tmp_path: Path) -> None:
    conf_dir, bin_dir = _setup(tmp_path, "conf_conversion")
    common = ["--conf-dir", str(conf_dir), "--bin-dir", str(bin_dir)]
    r = _cli("check", *common)
    assert r.returncode == 1 and "drift:" in r.stdout
    r = _cli("install", *common, "--values", '{"pod_namespace": "mesh"}')
    assert r.returncode == 0, r.stderr
    assert "10-flannel.conflist" in r.stdout
    r = _cli("check", *common, "--values", '{"pod_namespace": "mesh"}')
    assert (r.returncode, r.stdout.strip()) == (0, "ok: installed as configured")
    r = _cli("check", *common)
    assert r.returncode == 1 and "pod_namespace" in r.stdout
    r = _cli("uninstall", *common)
    assert r.returncode == 0 and "removed" in r.stdout
    r = _cli("install", "--conf-dir", str(tmp_path / "empty"), "--bin-dir", str(bin_dir))
    assert r.returncode == 2
    assert "install the primary CNI first" in r.stderr
