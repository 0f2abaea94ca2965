"""Every object we install validates against the Kubernetes OpenAPI schemas
(``kubernetes-validate``, strict), our CRDs are structural, and custom resources (the
examples) validate against our CRD schemas."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ambient.install.apply import ca_secret
from ambient.install.crds import crds
from ambient.install.nodes import cni_cleanup_daemonset, cni_daemonset
from ambient.install.render import render
from ambient.install.validate import (
    UNVALIDATED_KINDS,
    custom_resource_errors,
    object_errors,
    structural_errors,
    validate_all,
)
from ambient.install.values import load
from ambient.install.waypoint import render_waypoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("sets", [[], ["capture=ebpf"], ["capture=auto", "namespace=mesh",
                                                          "createNamespace=false"]])
@pytest.mark.parametrize("k8s", ["1.30.0", "1.33.0"])
def test_every_rendered_object_is_valid(sets: list[str], k8s: str) -> None:
    v = load(sets=sets)
    objs = render(v) + render_waypoint(values=v) + [cni_cleanup_daemonset(cni_daemonset(v)),
                                                    ca_secret(v)]
    assert validate_all(objs, k8s) == []
    # only Gateway API kinds go unvalidated (their CRDs are a prerequisite)
    assert {o["kind"] for o in objs if o["kind"] in UNVALIDATED_KINDS} <= {"Gateway",
                                                                          "GatewayClass"}


def test_committed_yaml_is_valid() -> None:
    for name in ("ambient.yaml", "crds.yaml", "waypoint.yaml"):
        docs = [d for d in yaml.safe_load_all((ROOT / "daemonset" / name).read_text()) if d]
        assert docs and validate_all(docs) == [], name


def test_the_validator_catches_mistakes() -> None:
    ds = cni_daemonset(load())
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privilegd"] = True
    assert any("privilegd" in e for e in object_errors(ds))  # strict: unknown field
    ds = cni_daemonset(load())
    ds["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    assert object_errors(ds)


def test_crds_are_structural() -> None:
    for crd in crds():
        assert object_errors(crd) == [], crd["metadata"]["name"]
    assert structural_errors({"type": "object", "properties": {"a": {}}}) == [
        ".a: no type (structural schemas need one everywhere)"]
    assert structural_errors({"type": "array"}) == [": an array needs items"]
    bad = crds()[0]
    bad["spec"]["versions"][1]["storage"] = True
    assert any("storage version" in e for e in object_errors(bad))


def test_crds_serve_the_versions_the_control_plane_watches() -> None:
    from controlplane.k8s_source import KIND_APIS

    served = {(f"{c['spec']['group']}/{v['name']}", c["spec"]["names"]["plural"])
              for c in crds() for v in c["spec"]["versions"] if v["served"]}
    for kind in ("AuthorizationPolicy", "PeerAuthentication"):
        api = KIND_APIS[kind]
        assert (api.api_version, api.plural) in served


def _example_custom_resources() -> list[dict]:
    out = []
    for path in sorted((ROOT / "examples").glob("**/*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and str(doc.get("apiVersion", "")).startswith(("security.istio.io/",
                                                                  "ambient.io/")):
                out.append(doc)
    return out


def test_examples_validate_against_our_crds() -> None:
    docs = _example_custom_resources()
    assert any(d["kind"] == "AuthorizationPolicy" for d in docs)
    for d in docs:
        assert custom_resource_errors(d) == [], d["metadata"]["name"]


@pytest.mark.parametrize("doc,error", [
    ({"spec": {"action": "MAYBE"}}, "spec.action: 'MAYBE' is not one of"),
    ({"spec": {"rules": [{"from": [{"source": {"principals": "a"}}]}]}},
     "principals: 'a' is not of type 'array'"),
    ({"spec": {"rules": [{"when": [{"values": ["x"]}]}]}}, "'key' is a required property"),
])
def test_bad_authorization_policies_are_rejected(doc: dict, error: str) -> None:
    obj = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
           "metadata": {"name": "p", "namespace": "shop"}, **doc}
    assert any(error in e for e in custom_resource_errors(obj)), custom_resource_errors(obj)


def test_peer_authentication_and_traffic_policy() -> None:
    pa = {"apiVersion": "security.istio.io/v1beta1", "kind": "PeerAuthentication",
          "metadata": {"name": "strict"},
          "spec": {"mtls": {"mode": "STRICT"}, "portLevelMtls": {"8080": {"mode": "DISABLE"}}}}
    assert custom_resource_errors(pa) == []
    pa["spec"]["mtls"]["mode"] = "ON"
    assert custom_resource_errors(pa)
    htp = {"apiVersion": "ambient.io/v1alpha1", "kind": "HTTPTrafficPolicy",
           "metadata": {"name": "chaos"},
           "spec": {"targetRefs": [{"kind": "Service", "name": "backend"}],
                    "rules": [{"fault": {"abort": {"httpStatus": 503, "percentage": 10}},
                               "rateLimit": {"maxTokens": 10, "fillInterval": "1s"}}]}}
    assert custom_resource_errors(htp) == []
    htp["spec"]["rules"][0]["fault"]["abort"]["percentage"] = 200
    assert custom_resource_errors(htp)
