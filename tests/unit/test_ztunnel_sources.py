"""File-backed ztunnel inputs: pods file, last-good config, and the two watchers."""

# Case tables are kept one case per line for readability.
# ruff: noqa: E501

from __future__ import annotations

import copy
import os

import pytest
import yaml

from ambient.model import Action, Scope
from ambient.store import MeshStore
from ztunnel.config import Settings
from ztunnel.sources import (
    ConfigWatcher,
    keep_last_good,
    load_config_text,
)

SETTINGS = Settings()
DB_UID = "Kubernetes//Pod/shop/db"
WEB_UID = "Kubernetes//Pod/shop/web"
POLICY_KEY = "shop/db-allow-backend"


# -- manifest builders -----------------------------------------------------------------------


def namespace(name="shop"):
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"istio.io/dataplane-mode": "ambient"}}}  # fmt: skip


def pod(name, ip, labels=None, ns="shop"):
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {"app": name}},
        "spec": {"nodeName": "node-a", "serviceAccountName": name,
                 "containers": [{"name": "app", "ports": [{"name": "tcp", "containerPort": 8080}]}]},
        "status": {"podIP": ip},
    }  # fmt: skip


def service(name, ip, selector, ns="shop"):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": ip, "selector": selector, "ports": [{"port": 80, "targetPort": 8080}]}}  # fmt: skip


def policy(action="ALLOW", port="8080"):
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "db-allow-backend", "namespace": "shop"},
        "spec": {
            "selector": {"matchLabels": {"app": "db"}},
            "action": action,
            "rules": [{"to": [{"operation": {"ports": [port]}}]}],
        },
    }


def dump(*objs):
    return yaml.safe_dump_all(list(objs))


def good_objects():
    return [namespace(), pod("db", "10.0.0.5"), pod("web", "10.0.0.6"),
            service("db", "10.96.0.20", {"app": "db"}), policy()]  # fmt: skip


def bad_pod(name="db"):
    p = pod(name, "10.0.0.5")
    p["status"]["podIP"] = "not-an-ip"
    return p


def loaded_store():
    store, last_good = MeshStore(), {}
    r = load_config_text(
        dump(*good_objects()), SETTINGS, store, manifests=True, last_good=last_good
    )
    assert r.rejected == []
    return store, last_good


def policy_ports(state, key=POLICY_KEY):
    pol = state.policies[key]
    return [m.destination_ports for grp in pol.groups for rule in grp for m in rule]


# -- keep_last_good ---------------------------------------------------------------------------


def test_keep_last_good_records_good_objects():
    last_good = {}
    objs = good_objects()
    out, errors = keep_last_good(objs, last_good, SETTINGS)
    assert errors == [] and out == objs
    assert ("Pod", "shop", "db") in last_good and (
        "AuthorizationPolicy",
        "shop",
        "db-allow-backend",
    ) in last_good


def test_keep_last_good_replaces_a_bad_object_by_its_last_good_version():
    last_good = {}
    keep_last_good(good_objects(), last_good, SETTINGS)
    good_pol = last_good[("AuthorizationPolicy", "shop", "db-allow-backend")]
    objs = good_objects()
    objs[-1] = policy(action="BOGUS")
    out, errors = keep_last_good(objs, last_good, SETTINGS)
    assert len(errors) == 1 and "db-allow-backend" in errors[0] and "BOGUS" in errors[0]
    assert out[:-1] == objs[:-1]  # the good ones pass through unchanged
    assert out[-1] == good_pol
    assert last_good[("AuthorizationPolicy", "shop", "db-allow-backend")] == good_pol


def test_keep_last_good_updates_to_a_new_good_version():
    last_good = {}
    keep_last_good(good_objects(), last_good, SETTINGS)
    objs = good_objects()
    objs[-1] = policy(port="9090")
    out, errors = keep_last_good(objs, last_good, SETTINGS)
    assert errors == [] and out[-1] == policy(port="9090")
    assert last_good[("AuthorizationPolicy", "shop", "db-allow-backend")] == policy(port="9090")


def test_keep_last_good_forgets_deleted_objects():
    last_good = {}
    keep_last_good(good_objects(), last_good, SETTINGS)
    keep_last_good(good_objects()[:-1], last_good, SETTINGS)
    assert ("AuthorizationPolicy", "shop", "db-allow-backend") not in last_good
    # Re-adding it in a bad form now has nothing to fall back to.
    out, errors = keep_last_good(
        [*good_objects()[:-1], policy(action="BOGUS")], last_good, SETTINGS
    )
    assert len(errors) == 1 and len(out) == 4


def test_keep_last_good_drops_a_new_bad_object_with_its_error():
    last_good = {}
    out, errors = keep_last_good([namespace(), bad_pod("new")], last_good, SETTINGS)
    assert out == [namespace()]
    assert len(errors) == 1 and "shop/new" in errors[0] and "not-an-ip" in errors[0]
    assert ("Pod", "shop", "new") not in last_good


def test_keep_last_good_drops_objects_without_metadata():
    out, errors = keep_last_good(["just a string", {"kind": "Pod"}], {}, SETTINGS)
    assert out == [] and len(errors) == 2


# -- load_config_text, manifests --------------------------------------------------------------


def test_manifests_load_into_store():
    store, _ = loaded_store()
    s = store.snapshot
    assert set(s.workloads) == {DB_UID, WEB_UID}
    db = s.workload_by_uid(DB_UID)
    assert [p.key for p in s.policies_for(db)] == [POLICY_KEY]
    assert s.service_by_vip("", "10.96.0.20").name == "db"


def test_manifests_bad_policy_keeps_its_last_good_version_and_selector():
    store, last_good = loaded_store()
    objs = good_objects()
    objs[-1] = policy(action="BOGUS")
    r = load_config_text(dump(*objs), SETTINGS, store, manifests=True, last_good=last_good)
    assert len(r.rejected) == 1 and "db-allow-backend" in r.rejected[0]
    s = store.snapshot
    db = s.workload_by_uid(DB_UID)
    pols = s.policies_for(db)
    assert [p.key for p in pols] == [POLICY_KEY]
    assert pols[0].action is Action.ALLOW and pols[0].scope is Scope.WORKLOAD_SELECTOR
    assert policy_ports(s) == [(8080,)]
    assert s.policies_for(s.workload_by_uid(WEB_UID)) == []


def test_manifests_bad_policy_keeps_applying_while_other_objects_change():
    store, last_good = loaded_store()
    objs = good_objects()
    objs[-1] = policy(action="BOGUS")
    objs[1] = pod("db", "10.0.0.50")  # the selected pod moves at the same time
    load_config_text(dump(*objs), SETTINGS, store, manifests=True, last_good=last_good)
    s = store.snapshot
    db = s.workload_by_address("", "10.0.0.50")
    assert db is not None and [p.key for p in s.policies_for(db)] == [POLICY_KEY]


def test_manifests_bad_pod_keeps_last_good_pod():
    store, last_good = loaded_store()
    objs = good_objects()
    objs[1] = bad_pod("db")
    r = load_config_text(dump(*objs), SETTINGS, store, manifests=True, last_good=last_good)
    assert len(r.rejected) == 1 and "shop/db" in r.rejected[0]
    db = store.snapshot.workload_by_address("", "10.0.0.5")
    assert db is not None and db.uid == DB_UID


def test_manifests_new_bad_object_is_rejected_and_the_rest_applies():
    store, last_good = loaded_store()
    r = load_config_text(dump(*good_objects(), bad_pod("newcomer")), SETTINGS, store,
                         manifests=True, last_good=last_good)  # fmt: skip
    assert len(r.rejected) == 1 and "newcomer" in r.rejected[0]
    assert set(store.snapshot.workloads) == {DB_UID, WEB_UID}


def test_manifests_fix_after_bad_version_applies_the_fix():
    store, last_good = loaded_store()
    objs = good_objects()
    objs[-1] = policy(action="BOGUS")
    load_config_text(dump(*objs), SETTINGS, store, manifests=True, last_good=last_good)
    objs[-1] = policy(port="9090")
    r = load_config_text(dump(*objs), SETTINGS, store, manifests=True, last_good=last_good)
    assert r.rejected == []
    assert policy_ports(store.snapshot) == [(9090,)]


def test_manifests_yaml_syntax_error_raises_and_leaves_store_untouched():
    store, last_good = loaded_store()
    before = store.snapshot
    saved = copy.deepcopy(last_good)
    with pytest.raises(ValueError, match="YAML"):
        load_config_text("kind: Pod\nmetadata: {name: [oops\n", SETTINGS, store,
                         manifests=True, last_good=last_good)  # fmt: skip
    assert store.snapshot is before
    assert last_good == saved


def test_manifests_only_bad_objects_raise_and_leave_store_untouched():
    store, last_good = loaded_store()
    before = store.snapshot
    with pytest.raises(ValueError):
        load_config_text(dump(bad_pod("x")), SETTINGS, store, manifests=True, last_good={})
    assert store.snapshot is before


def test_manifests_removal_from_a_clean_file_removes_from_store():
    store, last_good = loaded_store()
    objs = [o for o in good_objects() if o["kind"] != "AuthorizationPolicy"
            and o["metadata"]["name"] != "web"]  # fmt: skip
    r = load_config_text(dump(*objs), SETTINGS, store, manifests=True, last_good=last_good)
    assert r.rejected == []
    s = store.snapshot
    assert set(s.workloads) == {DB_UID}
    assert POLICY_KEY not in s.policies
    assert s.policies_for(s.workload_by_uid(DB_UID)) == []


def test_manifests_empty_clean_file_empties_the_store():
    store, last_good = loaded_store()
    load_config_text("# nothing here\n", SETTINGS, store, manifests=True, last_good=last_good)
    assert (
        not store.snapshot.workloads and not store.snapshot.policies and not store.snapshot.services
    )


def test_manifests_without_last_good_dict():
    store = MeshStore()
    r = load_config_text(dump(*good_objects()), SETTINGS, store, manifests=True)
    assert r.rejected == [] and DB_UID in store.snapshot.workloads


def test_manifests_deeply_nested_yaml_is_a_value_error():
    store, last_good = loaded_store()
    before = store.snapshot
    with pytest.raises(ValueError):
        load_config_text(
            "[" * 5000 + "]" * 5000, SETTINGS, store, manifests=True, last_good=last_good
        )
    assert store.snapshot is before


# -- load_config_text, ztunnel local format ---------------------------------------------------

LOCAL = """
workloads:
- uid: K//Pod/default/a
  name: a
  namespace: default
  workloadIps: ["{a_ip}"]
  protocol: HBONE
  services:
    "default/svc.example": {{80: 8080}}
- uid: K//Pod/default/b
  name: b
  namespace: default
  workloadIps: ["10.1.0.2"]
  protocol: TCP
services:
- name: svc
  namespace: default
  hostname: svc.example
  vips: ["/10.96.1.1"]
  ports: {{80: 8080}}
policies:
- name: allow-a
  namespace: default
  scope: Namespace
  action: Allow
  rules: [[[ {{destinationPorts: [8080]}} ]]]
"""


def local(a_ip="10.1.0.1"):
    return LOCAL.format(a_ip=a_ip)


def test_local_format_loads():
    store = MeshStore()
    r = load_config_text(local(), SETTINGS, store, manifests=False)
    assert r.rejected == [] and r.applied == 4
    s = store.snapshot
    assert set(s.workloads) == {"K//Pod/default/a", "K//Pod/default/b"}
    assert "default/allow-a" in s.policies


def test_local_format_bad_entry_keeps_last_good_and_other_entries():
    store = MeshStore()
    load_config_text(local(), SETTINGS, store, manifests=False)
    bad = local(a_ip="bogus").replace("10.1.0.2", "10.1.0.22")
    r = load_config_text(bad, SETTINGS, store, manifests=False)
    assert len(r.rejected) == 1 and "bogus" in r.rejected[0]
    s = store.snapshot
    assert s.workload_by_address("", "10.1.0.1").uid == "K//Pod/default/a"
    assert s.workload_by_address("", "10.1.0.22").uid == "K//Pod/default/b"


def test_local_format_removal_waits_for_a_clean_file():
    store = MeshStore()
    load_config_text(local(), SETTINGS, store, manifests=False)
    without_policy = local(a_ip="bogus").split("policies:")[0]
    load_config_text(without_policy, SETTINGS, store, manifests=False)
    assert "default/allow-a" in store.snapshot.policies  # still errors: nothing removed
    load_config_text(local().split("policies:")[0], SETTINGS, store, manifests=False)
    assert "default/allow-a" not in store.snapshot.policies  # clean: removed


def test_local_format_yaml_error_raises_and_leaves_store_untouched():
    store = MeshStore()
    load_config_text(local(), SETTINGS, store, manifests=False)
    before = store.snapshot
    with pytest.raises(ValueError, match="YAML"):
        load_config_text("workloads: [\n", SETTINGS, store, manifests=False)
    assert store.snapshot is before


# -- ConfigWatcher ----------------------------------------------------------------------------


class _Clock:
    """Distinct, increasing mtimes so (mtime, size) stamps always change on a rewrite."""

    def __init__(self):
        self.t = 1_700_000_000

    def write(self, path, text):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        self.t += 10
        os.utime(path, (self.t, self.t))


def test_config_watcher_manifests_reload_on_change(tmp_path):
    path, clock = str(tmp_path / "mesh.yaml"), _Clock()
    clock.write(path, dump(*good_objects()))
    store = MeshStore()
    w = ConfigWatcher(Settings(local_manifests_path=path), store)
    r = w.load_once()
    assert r is not None and r.rejected == [] and w.last_error is None
    assert DB_UID in store.snapshot.workloads
    assert w.load_once() is None  # unchanged file: nothing to do
    clock.write(path, dump(*good_objects()[:2]))
    assert w.load_once() is not None
    assert set(store.snapshot.workloads) == {DB_UID}


def test_config_watcher_keeps_last_good_on_bad_policy(tmp_path):
    path, clock = str(tmp_path / "mesh.yaml"), _Clock()
    clock.write(path, dump(*good_objects()))
    store = MeshStore()
    w = ConfigWatcher(Settings(local_manifests_path=path), store)
    w.load_once()
    objs = good_objects()
    objs[-1] = policy(action="BOGUS")
    clock.write(path, dump(*objs))
    r = w.load_once()
    assert r is not None and len(r.rejected) == 1
    s = store.snapshot
    assert [p.key for p in s.policies_for(s.workload_by_uid(DB_UID))] == [POLICY_KEY]


def test_config_watcher_unreadable_file_keeps_last_good(tmp_path):
    path, clock = str(tmp_path / "mesh.yaml"), _Clock()
    clock.write(path, dump(*good_objects()))
    store = MeshStore()
    w = ConfigWatcher(Settings(local_manifests_path=path), store)
    w.load_once()
    before = store.snapshot
    os.remove(path)
    assert w.load_once() is None
    assert w.last_error is not None and path in w.last_error and "cannot read" in w.last_error
    assert store.snapshot is before
    os.mkdir(path)  # exists but cannot be read as a file
    assert w.load_once() is None and w.last_error is not None and path in w.last_error
    assert store.snapshot is before
    os.rmdir(path)
    clock.write(path, dump(*good_objects()[:2]))
    assert w.load_once() is not None
    assert w.last_error is None
    assert set(store.snapshot.workloads) == {DB_UID}


def test_config_watcher_syntax_error_sets_last_error_and_recovers(tmp_path):
    path, clock = str(tmp_path / "mesh.yaml"), _Clock()
    clock.write(path, dump(*good_objects()))
    store = MeshStore()
    w = ConfigWatcher(Settings(local_manifests_path=path), store)
    w.load_once()
    before = store.snapshot
    clock.write(path, "kind: [\n")
    assert w.load_once() is None
    assert w.last_error is not None and path in w.last_error
    assert store.snapshot is before
    clock.write(path, dump(*good_objects()))
    assert w.load_once() is not None and w.last_error is None


def test_config_watcher_local_xds_path(tmp_path):
    path, clock = str(tmp_path / "local.yaml"), _Clock()
    clock.write(path, local())
    store = MeshStore()
    w = ConfigWatcher(Settings(local_xds_path=path), store)
    assert w.load_once().applied == 4
    clock.write(path, local(a_ip="10.1.0.9"))
    w.load_once()
    assert store.snapshot.workload_by_address("", "10.1.0.9").name == "a"


def test_config_watcher_inline_local_xds_loads_once():
    store = MeshStore()
    w = ConfigWatcher(Settings(local_xds=local()), store)
    assert w.load_once().applied == 4
    assert w.load_once() is None


def test_config_watcher_without_source_does_nothing():
    store = MeshStore()
    assert ConfigWatcher(Settings(), store).load_once() is None
    assert store.snapshot.version == 0
