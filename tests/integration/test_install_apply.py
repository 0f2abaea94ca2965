"""``ambientctl install | uninstall`` against the in-process API server with the real
``kubernetes`` client: objects created, a second install idempotent, drift repaired,
ownership respected, uninstall leaves nothing behind."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from k8s_apiserver import FakeApiServer

from ambient.cli import main as ambientctl
from ambient.install import apply as ap
from ambient.install.commands import install, uninstall
from ambient.install.render import render
from ambient.install.values import Values

NS = "istio-system"
KINDS = [kind for _, kind, _ in ap.MANAGED_KINDS]


@pytest.fixture
def srv() -> Iterator[FakeApiServer]:
    with FakeApiServer() as s:
        yield s


def kube_of(srv: FakeApiServer) -> ap.Kube:
    return ap.Kube(srv.api_client())


def ours(srv: FakeApiServer) -> set[tuple[str, str, str]]:
    out = set()
    for kind in KINDS:
        for o in srv.objects(kind):
            if (o["metadata"].get("labels") or {}).get(ap.MANAGED_BY_KEY) == ap.MANAGED_BY:
                out.add((kind, o["metadata"].get("namespace", ""), o["metadata"]["name"]))
    return out


def everything(srv: FakeApiServer) -> set[tuple[str, str, str]]:
    return {(k, o["metadata"].get("namespace", ""), o["metadata"]["name"])
            for k in KINDS for o in srv.objects(k)}


def expected(v: Values) -> set[tuple[str, str, str]]:
    return {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])
            for o in render(v)} | {("Secret", v.namespace, "cacerts")}


class DaemonSetController:
    """Plays the DaemonSet/Deployment controllers for one node: marks rollouts complete."""

    def __init__(self, srv: FakeApiServer, names: set[str]) -> None:
        self.srv, self.names = srv, names
        self.stop = threading.Event()
        self.done: set[str] = set()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        for _ in range(600):  # bounded: at most ~60 s
            if self.stop.wait(0.1):
                return
            for o in self.srv.objects("DaemonSet") + self.srv.objects("Deployment"):
                name = o["metadata"]["name"]
                if name not in self.names or name in self.done:
                    continue
                status = ({"desiredNumberScheduled": 1, "updatedNumberScheduled": 1,
                           "numberAvailable": 1, "numberReady": 1}
                          if o["kind"] == "DaemonSet" else
                          {"replicas": 1, "updatedReplicas": 1, "availableReplicas": 1})
                self.srv.patch(o["kind"], name, {"status": status}, o["metadata"]["namespace"])
                self.done.add(name)

    def __enter__(self) -> DaemonSetController:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def test_install_creates_everything_then_changes_nothing(srv: FakeApiServer,
                                                         capsys: pytest.CaptureFixture) -> None:
    v = Values()
    assert install(kube_of(srv), v) == 0
    assert ours(srv) == expected(v)
    secret = srv.get("Secret", "cacerts", NS)
    assert secret is not None and {"ca-cert.pem", "ca-key.pem", "root-cert.pem",
                                   "cert-chain.pem"} <= set(secret["data"])
    rv = srv.resource_version
    kube = kube_of(srv)
    capsys.readouterr()
    assert install(kube, v) == 0
    assert kube.writes == 0 and srv.resource_version == rv  # nothing written at all
    assert "0 change(s)" in capsys.readouterr().out
    # the CA survives a re-install (never regenerated)
    assert srv.get("Secret", "cacerts", NS)["data"] == secret["data"]


def test_drift_is_repaired(srv: FakeApiServer) -> None:
    v = Values()
    install(kube_of(srv), v)
    srv.patch("DaemonSet", "ztunnel", {"spec": {"updateStrategy": {
        "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}}}, NS)
    srv.patch("ClusterRole", "ambient-cni", {"rules": [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]})
    srv.delete("Service", "ambient-controlplane", NS)
    srv.patch("ConfigMap", "ambient-cni-config", {"data": {"CAPTURE_BACKEND": "nftables"}}, NS)
    assert install(kube_of(srv), v) == 0
    ds = srv.get("DaemonSet", "ztunnel", NS)
    assert ds["spec"]["updateStrategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    role = srv.get("ClusterRole", "ambient-cni")
    assert all("secrets" not in r["resources"] for r in role["rules"])
    assert srv.get("Service", "ambient-controlplane", NS) is not None
    assert srv.get("ConfigMap", "ambient-cni-config", NS)["data"]["CAPTURE_BACKEND"] == \
        "iptables"
    kube = kube_of(srv)
    install(kube, v)
    assert kube.writes == 0


def test_values_change_is_applied(srv: FakeApiServer) -> None:
    install(kube_of(srv), Values())
    install(kube_of(srv), Values(image="reg.example/ambient:2", capture="ebpf"))
    ds = srv.get("DaemonSet", "ambient-cni", NS)
    agent = ds["spec"]["template"]["spec"]["containers"][0]
    assert agent["image"] == "reg.example/ambient:2"
    assert "/sys/fs/bpf" in {m["mountPath"] for m in agent["volumeMounts"]}


def test_dry_run_writes_nothing(srv: FakeApiServer, capsys: pytest.CaptureFixture) -> None:
    kube = kube_of(srv)
    assert install(kube, Values(), dry_run=True) == 0
    assert kube.writes == 0 and everything(srv) == set()
    out = capsys.readouterr().out
    assert "would create DaemonSet istio-system/ztunnel" in out
    assert "would create Secret istio-system/cacerts" in out


def test_foreign_objects_are_not_adopted(srv: FakeApiServer) -> None:
    srv.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    srv.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "cacerts",
                "namespace": NS}, "data": {"ca-cert.pem": "eA=="}})
    with DaemonSetController(srv, {"ambient-node-cleanup"}):
        assert install(kube_of(srv), Values()) == 0
        assert "labels" not in srv.get("Namespace", NS)["metadata"]  # used, not adopted
        assert srv.get("Secret", "cacerts", NS)["data"] == {"ca-cert.pem": "eA=="}  # BYO CA
        assert uninstall(kube_of(srv)) == 0
    assert ours(srv) == set()
    assert everything(srv) == {("Namespace", "", NS), ("Secret", NS, "cacerts")}


def test_conflicting_object_is_an_error(srv: FakeApiServer) -> None:
    srv.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    srv.create({"apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": "ztunnel", "namespace": NS}})
    with pytest.raises(ap.InstallError, match="not created by ambientctl"):
        install(kube_of(srv), Values())


def test_wait_for_rollouts(srv: FakeApiServer) -> None:
    v = Values()
    install(kube_of(srv), v)
    assert not ap.wait_rollouts(kube_of(srv), render(v), timeout_s=0.2, log=lambda _: None,
                                poll_s=0.05)
    with DaemonSetController(srv, {"ztunnel", "ambient-cni", "ambient-controlplane"}):
        assert install(kube_of(srv), v, wait=True, timeout_s=30) == 0


def test_uninstall_leaves_nothing_behind(srv: FakeApiServer,
                                         capsys: pytest.CaptureFixture) -> None:
    srv.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    before = everything(srv)
    install(kube_of(srv), Values())
    # what the running control plane adds: root ConfigMaps in every namespace
    for ns in ("shop", NS):
        srv.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
            "name": "istio-ca-root-cert", "namespace": ns,
            "labels": {"istio.io/config": "true"}}, "data": {"root-cert.pem": "x"}})
    kube = kube_of(srv)
    assert uninstall(kube, dry_run=True) == 0
    assert kube.writes == 0
    with DaemonSetController(srv, {"ambient-node-cleanup"}) as ctl:
        assert uninstall(kube_of(srv)) == 0
    assert "ambient-node-cleanup" in ctl.done  # the node clean-up ran before deletion
    assert everything(srv) == before
    out = capsys.readouterr().out
    assert "deleted DaemonSet ambient-cni" in out
    capsys.readouterr()
    assert uninstall(kube_of(srv)) == 0
    assert "nothing installed by ambientctl was found" in capsys.readouterr().out


def test_uninstall_reports_a_node_cleanup_that_never_finishes(srv: FakeApiServer) -> None:
    install(kube_of(srv), Values())
    assert uninstall(kube_of(srv), timeout_s=0.3) == 1  # no controller: never rolled out
    assert ours(srv) == set()  # everything else is still removed


def test_cli_end_to_end_with_a_kubeconfig(srv: FakeApiServer, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": srv.url}}],
        "users": [{"name": "u", "user": {}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}]}))
    values = tmp_path / "values.yaml"
    values.write_text("namespace: mesh\ncapture: nftables\n")
    args = ["--kubeconfig", str(kubeconfig)]
    assert ambientctl(["install", "-f", str(values), "--set", "logLevel=debug", *args]) == 0
    assert srv.get("DaemonSet", "ztunnel", "mesh") is not None
    assert ambientctl(["install", "--set", "capture=bogus", *args]) == 2
    assert "capture 'bogus'" in capsys.readouterr().err
    assert ambientctl(["uninstall", "--skip-node-cleanup", *args]) == 0
    assert ours(srv) == set()
    assert ambientctl(["install", "--kubeconfig", str(tmp_path / "missing")]) == 1
    assert "kubeconfig" in capsys.readouterr().err


def test_manifest_generate_prints_what_install_applies(capsys: pytest.CaptureFixture) -> None:
    assert ambientctl(["manifest", "generate", "--set", "namespace=mesh"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert docs == render(Values(namespace="mesh"))
    assert ambientctl(["manifest", "generate", "--with-ca-secret"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    secret = next(d for d in docs if d["kind"] == "Secret")
    kinds = [d["kind"] for d in docs]
    assert kinds.index("Namespace") < kinds.index("Secret") < kinds.index("Deployment")
    assert "ca-key.pem" in secret["data"]
