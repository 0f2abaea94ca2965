"""The install renderer: values, objects per values, least-privilege RBAC, security contexts,
the committed daemonset/ files, and the host plugin bundle."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ambient.install import apply as ap
from ambient.install.files import expected_files
from ambient.install.hostplugin import BUNDLE_DIR, install, uninstall
from ambient.install.nodes import cni_cleanup_daemonset, cni_daemonset
from ambient.install.render import rbac_rules, render, to_yaml
from ambient.install.values import Values, ValuesError, load, parse_set
from ambient.install.waypoint import render_waypoint

ROOT = Path(__file__).resolve().parents[2]


def by(objs: list[dict], kind: str, name: str) -> dict:
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


def container(obj: dict, name: str) -> dict:
    spec = obj["spec"]["template"]["spec"]
    return next(c for c in spec.get("initContainers", []) + spec["containers"]
                if c["name"] == name)


def env_of(c: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


# -- values -------------------------------------------------------------------------------


@pytest.mark.parametrize("expr,want", [
    ("capture=ebpf", {"capture": "ebpf"}),
    ("resources.ztunnel.requests.cpu=1", {"resources": {"ztunnel": {"requests": {"cpu": "1"}}}}),
    ("image=a=b", {"image": "a=b"}),
])
def test_parse_set(expr: str, want: dict) -> None:
    assert parse_set(expr) == want


@pytest.mark.parametrize("sets,error", [
    (["capture=bpf"], "capture 'bpf'"),
    (["nope=1"], "unknown key nope"),
    (["resources.ztunnel.requests.cpu=lots"], "not a Kubernetes quantity"),
    (["namespace=Istio_System"], "not a valid namespace"),
    (["createNamespace=maybe"], "expected true or false"),
    (["controlplaneReplicas=0"], "at least 1"),
    (["novalue"], "expected key=value"),
])
def test_bad_values_name_the_key(sets: list[str], error: str) -> None:
    with pytest.raises(ValuesError, match=error):
        load(sets=sets)


def test_values_file_then_set_merge_like_helm(tmp_path: Path) -> None:
    f = tmp_path / "v.yaml"
    f.write_text("trustDomain: example.org\nresources:\n  ztunnel:\n    requests: {cpu: 500m}\n"
                 "cni:\n  excludeNamespaces: [a, b]\n")
    v = load([f], ["resources.ztunnel.limits.memory=null", "log_level=debug"])
    assert v.trust_domain == "example.org" and v.log_level == "debug"
    assert v.resources.ztunnel.requests == {"cpu": "500m", "memory": "512Mi"}  # merged
    assert v.resources.ztunnel.limits == {}  # null removed the key
    assert v.cni.exclude_namespaces == ["a", "b"]


# -- objects per values -------------------------------------------------------------------


def test_values_reach_the_objects() -> None:
    v = load(sets=["namespace=mesh", "image=reg.example/amb:9", "trustDomain=td.example",
                   "pullPolicy=Always", "logLevel=debug", "capture=nftables"])
    objs = render(v)
    zt = by(objs, "DaemonSet", "ztunnel")
    c = container(zt, "istio-proxy")
    assert c["image"] == "reg.example/amb:9" and c["imagePullPolicy"] == "Always"
    e = env_of(c)
    assert e["CA_ADDRESS"] == e["XDS_ADDRESS"] == "https://ambient-controlplane.mesh.svc:15012"
    assert e["TRUST_DOMAIN"] == "td.example" and e["RUST_LOG"] == "debug"
    cp = container(by(objs, "Deployment", "ambient-controlplane"), "discovery")
    cmd = cp["command"]
    assert cmd[cmd.index("--trusted-node-accounts") + 1] == "mesh/ztunnel"
    assert cmd[cmd.index("--trust-domain") + 1] == "td.example"
    assert by(objs, "ConfigMap", "ambient-cni-config")["data"]["CAPTURE_BACKEND"] == "nftables"
    assert {o["metadata"].get("namespace") for o in objs} <= {"mesh", None}
    binding = by(objs, "ClusterRoleBinding", "ambient-cni")
    assert binding["subjects"][0]["namespace"] == "mesh"


def test_without_namespace_or_gateway_class() -> None:
    objs = render(load(sets=["createNamespace=false", "gatewayClass=false"]))
    assert not [o for o in objs if o["kind"] in ("Namespace", "GatewayClass")]


def test_every_object_is_labelled_for_uninstall() -> None:
    for o in render() + render_waypoint():
        assert o["metadata"]["labels"][ap.MANAGED_BY_KEY] == ap.MANAGED_BY, o["kind"]


def test_ebpf_adds_bpffs_and_cgroup_mounts_only_when_chosen() -> None:
    def mounts(objs: list[dict]) -> set[str]:
        out = set()
        for name in ("ztunnel", "ambient-cni"):
            for c in by(objs, "DaemonSet", name)["spec"]["template"]["spec"]["containers"]:
                out |= {m["mountPath"] for m in c["volumeMounts"]}
        return out

    assert not {"/sys/fs/bpf", "/host/sys/fs/cgroup"} & mounts(render())
    ebpf = render(load(sets=["capture=ebpf"]))
    assert {"/sys/fs/bpf", "/host/sys/fs/cgroup"} <= mounts(ebpf)
    assert env_of(container(by(ebpf, "DaemonSet", "ztunnel"), "istio-proxy"))["BPF_PIN_DIR"]


def test_cni_config_change_rolls_the_agent() -> None:
    def checksum(v: Values) -> str:
        return cni_daemonset(v)["spec"]["template"]["metadata"]["annotations"][
            "ambient.io/config-checksum"]

    assert checksum(Values()) == checksum(Values())
    assert checksum(Values()) != checksum(Values(capture="nftables"))


# -- ztunnel: the deployment contract -----------------------------------------------------


def test_ztunnel_daemonset_contract() -> None:
    zt = by(render(), "DaemonSet", "ztunnel")
    spec, tmpl = zt["spec"], zt["spec"]["template"]
    assert spec["updateStrategy"] == {"type": "RollingUpdate",
                                      "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    pod = tmpl["spec"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert not pod.get("hostNetwork")
    assert {"operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"operator": "Exists", "effect": "NoExecute"} in pod["tolerations"]
    assert tmpl["metadata"]["labels"]["istio.io/dataplane-mode"] == "none"
    assert tmpl["metadata"]["annotations"]["prometheus.io/port"] == "15020"
    assert tmpl["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    c = container(zt, "istio-proxy")
    sc = c["securityContext"]
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_ADMIN", "NET_RAW"]}
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    host = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert host == {"/var/run/ztunnel"}
    token = next(v for v in pod["volumes"] if "projected" in v)
    src = token["projected"]["sources"][0]["serviceAccountToken"]
    assert src["audience"] == "istio-ca"
    e = env_of(c)
    assert e["INPOD_UDS"] == "/var/run/ztunnel/ztunnel.sock"
    assert e["AUTH_TOKEN"] == "/var/run/secrets/tokens/istio-token"
    for name in ("NODE_NAME", "POD_NAME", "POD_NAMESPACE", "INSTANCE_IP", "SERVICE_ACCOUNT"):
        assert isinstance(e[name], dict), name  # from the downward API
    assert pod["automountServiceAccountToken"] is False  # no Kubernetes API access at all


def test_cni_daemonset_contract() -> None:
    ds = by(render(), "DaemonSet", "ambient-cni")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] and pod["hostPID"]
    assert pod["priorityClassName"] == "system-node-critical"
    host = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert {"/opt/cni/bin", "/etc/cni/net.d", "/var/run/netns", "/var/run/ztunnel",
            "/var/run/ambient-cni"} <= host
    agent = container(ds, "cni-agent")
    assert agent["command"][:4] == ["python", "-m", "cni.agent_main", "run"]
    assert "--kubernetes" in agent["command"]
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8000}
    assert agent["securityContext"]["privileged"] is False
    assert agent["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert set(agent["securityContext"]["capabilities"]["add"]) == {
        "NET_ADMIN", "NET_RAW", "SYS_PTRACE", "SYS_ADMIN", "DAC_OVERRIDE"}
    installer = container(ds, "install-cni")
    assert installer["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": []}
    cmd = installer["command"]
    assert cmd[cmd.index("--host-python") + 1] == "/usr/bin/python3"


def test_controlplane_is_unprivileged_and_serves_15010_15012() -> None:
    objs = render()
    svc = by(objs, "Service", "ambient-controlplane")
    assert {p["port"] for p in svc["spec"]["ports"]} == {15010, 15012}
    c = container(by(objs, "Deployment", "ambient-controlplane"), "discovery")
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["readOnlyRootFilesystem"]
    assert c["command"][:4] == ["python", "-m", "ambient.cli", "controlplane"]


# -- RBAC ---------------------------------------------------------------------------------


def test_rbac_least_privilege() -> None:
    objs = render()
    roles = [o for o in objs if o["kind"] in ("ClusterRole", "Role")]
    assert {r["metadata"]["name"] for r in roles} == {"ambient-controlplane", "ambient-cni",
                                                      "ambient-waypoint"}
    for r in roles:
        for rule in r["rules"]:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key], (r["metadata"]["name"], rule)
            assert "resourceNames" not in rule or rule["resourceNames"]
    grants = {(r["metadata"]["name"], g, res, verb) for r in roles for rule in r["rules"]
              for g in rule["apiGroups"] for res in rule["resources"] for verb in rule["verbs"]}
    # nobody may read Secrets, write workloads, or escalate
    for _, _, res, verb in grants:
        assert res not in ("secrets", "roles", "clusterroles", "rolebindings")
        assert verb not in ("delete", "deletecollection", "escalate", "bind", "impersonate")
    cni = {(g, res, verb) for n, g, res, verb in grants if n == "ambient-cni"}
    assert cni == {("", "pods", v) for v in ("get", "list", "watch", "patch")} | {
        ("", "namespaces", v) for v in ("get", "list", "watch")} | {("", "nodes", "get")}
    cp = {(g, res, verb) for n, g, res, verb in grants if n == "ambient-controlplane"}
    assert ("authentication.k8s.io", "tokenreviews", "create") in cp
    assert {("", "configmaps", v) for v in ("get", "create", "patch")} <= cp
    writes = {(g, res) for g, res, v in cp if v not in ("get", "list", "watch")}
    assert writes == {("authentication.k8s.io", "tokenreviews"), ("", "configmaps")}
    wp = {(g, res, verb) for n, g, res, verb in grants if n == "ambient-waypoint"}
    assert {verb for _, _, verb in wp} == {"list", "watch"}  # read-only


def test_controlplane_may_watch_every_kind_it_reads() -> None:
    from controlplane.k8s_source import KIND_APIS
    from controlplane.objects import KINDS

    for role in ("ambient-controlplane", "ambient-waypoint"):
        rules = rbac_rules()[role]
        for kind in KINDS:
            api = KIND_APIS.get(kind)
            if api is None:
                continue  # not watchable yet: nothing to grant
            group = api.api_version.rpartition("/")[0]
            assert any(group in r["apiGroups"] and api.plural in r["resources"]
                       and {"list", "watch"} <= set(r["verbs"]) for r in rules), (role, kind)


def test_ztunnel_has_no_rbac_and_each_waypoint_its_own_binding() -> None:
    objs = render()
    bound = {s["name"] for o in objs if o["kind"].endswith("Binding") for s in o["subjects"]}
    assert "ztunnel" not in bound
    binding = render_waypoint("wp", "shop")[2]
    assert binding["kind"] == "ClusterRoleBinding"
    assert binding["roleRef"]["name"] == "ambient-waypoint"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "wp", "namespace": "shop"}]


# -- waypoint and clean-up templates ------------------------------------------------------


def test_waypoint_template_matches_translation_contract() -> None:
    gw, sa, _, dep, svc = render_waypoint("wp", "shop", Values(namespace="mesh"), "all")
    assert gw["spec"]["gatewayClassName"] == "istio-waypoint"
    assert gw["spec"]["listeners"] == [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]
    assert gw["metadata"]["labels"]["istio.io/waypoint-for"] == "all"
    assert svc["metadata"]["name"] == "wp" and svc["metadata"]["namespace"] == "shop"
    assert svc["metadata"]["labels"]["gateway.istio.io/managed"] == "istio.io-mesh-controller"
    assert {"name": "mesh", "port": 15008, "targetPort": 15008, "protocol": "TCP"} in \
        svc["spec"]["ports"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert labels["gateway.networking.k8s.io/gateway-name"] == "wp"
    assert labels["istio.io/dataplane-mode"] == "none"
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    e = env_of(container(dep, "istio-proxy"))
    assert e["WAYPOINT_NAME"] == "wp"
    assert e["CA_ADDRESS"] == "https://ambient-controlplane.mesh.svc:15012"
    with pytest.raises(ValueError, match="waypoint-for"):
        render_waypoint("wp", "shop", waypoint_for="everything")


def test_cleanup_daemonset_reuses_the_installed_agent_settings() -> None:
    ds = cni_daemonset(load(sets=["capture=ebpf", "image=x/y:1"]))
    cl = cni_cleanup_daemonset(ds)
    c = container(cl, "cleanup")
    assert c["image"] == "x/y:1"
    assert "hostplugin uninstall" in c["command"][-1]
    assert "cni.agent_main uninstall" in c["command"][-1]
    paths = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/host/etc/cni/net.d", "/host/opt/cni/bin", "/var/run/ambient-cni",
            "/sys/fs/bpf"} <= paths


# -- committed files ----------------------------------------------------------------------


def test_daemonset_files_match_the_renderer() -> None:
    for name, text in expected_files().items():
        path = ROOT / "daemonset" / name
        assert path.exists(), f"{path} missing: run `make manifests`"
        assert path.read_text(encoding="utf-8") == text, \
            f"daemonset/{name} is stale: run `make manifests`"


def test_render_is_deterministic() -> None:
    assert to_yaml(render()) == to_yaml(render())


# -- the CNI plugin on the host -----------------------------------------------------------


def test_host_plugin_bundle_runs_with_only_the_bundle(tmp_path: Path) -> None:
    conf, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf.mkdir()
    (conf / "10-bridge.conf").write_text(
        '{"cniVersion": "1.0.0", "name": "k8s", "type": "bridge"}')
    changes = install(str(conf), str(bin_dir), str(bin_dir), "/usr/bin/python3", "mesh")
    assert any(BUNDLE_DIR in c for c in changes)
    assert install(str(conf), str(bin_dir), str(bin_dir), "/usr/bin/python3", "mesh") == []
    launcher = bin_dir / "ambient-cni"
    assert launcher.read_text().startswith("#!/usr/bin/python3 -I\n")
    # the launcher finds cni and msgpack in the bundle alone (an empty environment, -I)
    out = subprocess.run([str(launcher)], env={"CNI_COMMAND": "VERSION"}, cwd="/",
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert '"supportedVersions"' in out.stdout
    conflist = (conf / "10-bridge.conflist").read_text()
    assert '"pod_namespace": "mesh"' in conflist
    uninstall(str(conf), str(bin_dir))
    assert not os.path.exists(bin_dir / BUNDLE_DIR) and not launcher.exists()
    assert "ambient-cni" not in (conf / "10-bridge.conflist").read_text()


# -- apply decisions ----------------------------------------------------------------------

_OURS = {"labels": {ap.MANAGED_BY_KEY: ap.MANAGED_BY}}


@pytest.mark.parametrize("want,live,expected", [
    ({"a": 1}, {"a": 1, "b": 2}, True),  # server defaults are fine
    ({"a": 1}, {"a": 2}, False),
    ({"l": [{"x": 1}]}, {"l": [{"x": 1, "d": 0}]}, True),
    ({"l": [{"x": 1}]}, {"l": [{"x": 1}, {"x": 2}]}, False),  # an extra list item is drift
    ({"p": 8000}, {"p": "8000"}, True),
    ({"b": True}, {"b": "True"}, False),
])
def test_is_subset(want: dict, live: dict, expected: bool) -> None:
    assert ap.is_subset(want, live) is expected


@pytest.mark.parametrize("kind,live,action", [
    ("ConfigMap", None, "create"),
    ("ConfigMap", {"metadata": {"name": "c", **_OURS}, "data": {"k": "v"}}, "unchanged"),
    ("ConfigMap", {"metadata": {"name": "c", **_OURS}, "data": {"k": "w"}}, "patch"),
    ("ConfigMap", {"metadata": {"name": "c"}, "data": {"k": "v"}}, "conflict"),
    ("Namespace", {"metadata": {"name": "c"}}, "foreign"),
    ("CustomResourceDefinition", {"metadata": {"name": "c"}}, "foreign"),
])
def test_decide(kind: str, live: dict | None, action: str) -> None:
    want = {"apiVersion": "v1", "kind": kind, "metadata": {"name": "c", **_OURS},
            "data": {"k": "v"}}
    assert ap.decide(want, live) == action


@pytest.mark.parametrize("obj,done", [
    ({"kind": "DaemonSet", "metadata": {"name": "z", "generation": 2},
      "status": {"observedGeneration": 1, "desiredNumberScheduled": 1,
                 "updatedNumberScheduled": 1, "numberAvailable": 1}}, False),
    ({"kind": "DaemonSet", "metadata": {"name": "z"}, "status": {}}, False),
    ({"kind": "DaemonSet", "metadata": {"name": "z"},
      "status": {"desiredNumberScheduled": 3, "updatedNumberScheduled": 3,
                 "numberAvailable": 2}}, False),
    ({"kind": "DaemonSet", "metadata": {"name": "z"},
      "status": {"desiredNumberScheduled": 3, "updatedNumberScheduled": 3,
                 "numberAvailable": 3}}, True),
    ({"kind": "Deployment", "metadata": {"name": "d"}, "spec": {"replicas": 2},
      "status": {"updatedReplicas": 2, "availableReplicas": 1}}, False),
    ({"kind": "Deployment", "metadata": {"name": "d"}, "spec": {"replicas": 2},
      "status": {"updatedReplicas": 2, "availableReplicas": 2}}, True),
])
def test_rollout_status(obj: dict, done: bool) -> None:
    assert ap.rollout_status(obj)[0] is done


def test_object_paths() -> None:
    assert ap.object_path("DaemonSet", "z", "ns", "apps/v1") == \
        "/apis/apps/v1/namespaces/ns/daemonsets/z"
    assert ap.object_path("Namespace", "ns", None, "v1") == "/api/v1/namespaces/ns"
    assert ap.object_path("ClusterRole", "r", "ignored", "rbac.authorization.k8s.io/v1") == \
        "/apis/rbac.authorization.k8s.io/v1/clusterroles/r"
    with pytest.raises(ap.InstallError):
        ap.object_path("Pod", "p", "ns", "v1")
