"""Structured property tests for configuration inputs: Kubernetes object dicts into the
translator (never raises; every resource passes ``from_proto``; incremental == batch),
ztunnel's local config, and the control plane's manifests directory reader.
"""

from __future__ import annotations

import json
from typing import Any

import yaml
from fuzz.hypo import fuzz_settings
from fuzz.targets_cp import K8S_KEYS, MANIFESTS
from hypothesis import given
from hypothesis import strategies as st

from ambient.config import manifests
from ambient.config.k8s_parse import key_of, normalise
from ambient.config.local import parse_local_config, parse_local_data
from ambient.model import from_proto
from controlplane.local_source import ParseError, parse_manifests

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 70_000), st.floats(),
                    st.sampled_from(["", "a", "10.0.0.1", "fd00::1", "10.0.0.0/8", "80", "http",
                                     "TCP", "ambient", "istio-waypoint", "ALLOW", "DENY",
                                     "STRICT", "*", "cluster.local/ns/a/sa/b"]),
                    st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.one_of(st.sampled_from(K8S_KEYS), st.text(max_size=5)), inner,
                    max_size=4)), max_leaves=15)
KINDS = ["Namespace", "Pod", "Service", "EndpointSlice", "ServiceAccount", "AuthorizationPolicy",
         "PeerAuthentication", "Gateway", "HTTPRoute", "Secret"]


@st.composite
def k8s_objects(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(values)
    meta: dict[str, Any] = {"name": draw(st.sampled_from(["a", "web", "wp", "x"])),
                            "namespace": draw(st.sampled_from(["shop", "default", "b"]))}
    meta.update(draw(st.dictionaries(st.sampled_from(["labels", "annotations", "uid", "name"]),
                                     values, max_size=2)))
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": draw(st.sampled_from(KINDS)),
                           "metadata": meta}
    obj.update(draw(st.dictionaries(st.sampled_from(["spec", "status", "endpoints", "ports",
                                                     "addressType"]), values, max_size=3)))
    return obj


DEMO = list(yaml.safe_load_all(MANIFESTS))


@fuzz_settings(150)
@given(st.lists(k8s_objects(), max_size=6), st.booleans())
def test_translation_never_raises_and_every_resource_is_valid(objs: list[Any],
                                                              with_demo: bool) -> None:
    src = (DEMO if with_demo else []) + objs
    res = manifests.translate_manifests(src)
    for _, msg in res.resources:
        from_proto(msg)


@fuzz_settings(100)
@given(st.lists(k8s_objects(), max_size=5))
def test_incremental_translation_equals_batch(objs: list[Any]) -> None:
    """Applying objects one at a time gives what translating them at once gives (when every
    object has its own key and no producer failed to build)."""
    keyed: dict[str, Any] = {}
    for o in DEMO + objs:
        try:
            keyed.setdefault(key_of(normalise(o)), o)
        except Exception:  # noqa: BLE001 - refused objects: covered by the test above
            continue
    inc = manifests.Translator()
    for key, o in keyed.items():
        inc.apply({key: o})
    batch = manifests.Translator()
    batch.apply(keyed, resync=True)
    if not inc._build_errors and not batch._build_errors:  # noqa: SLF001
        assert inc.resources == batch.resources
    for key in list(keyed):  # deleting everything leaves nothing behind
        inc.apply({}, [key])
    assert inc.resources == {}


LOCAL_KEYS = ["uid", "name", "namespace", "addresses", "protocol", "status", "serviceAccount",
              "trustDomain", "services", "ports", "waypoint", "destination", "hostname", "vips",
              "scope", "action", "rules", "groups", "sourceIps", "destinationPorts", "exact",
              "principals", "capacity", "loadBalancer", "applicationTunnel", "node", "locality"]
local_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(LOCAL_KEYS), inner, max_size=5)), max_leaves=15)


@fuzz_settings(200)
@given(st.dictionaries(st.sampled_from(["workloads", "services", "policies", "other"]),
                       st.one_of(st.lists(local_values, max_size=3), local_values), max_size=3))
def test_local_config_never_raises(data: dict[str, Any]) -> None:
    res = parse_local_data(data)
    for _, msg in res.resources:
        from_proto(msg)
    assert parse_local_config(json.dumps(data, default=str)).errors is not None


@fuzz_settings(300)
@given(st.text(max_size=200))
def test_local_source_text_only_raises_parse_error(text: str) -> None:
    try:
        out = parse_manifests(text, "x.yaml")
    except ParseError as e:
        assert str(e).startswith("x.yaml")
        return
    assert all(isinstance(o, dict) for o in out.values())


@fuzz_settings(150)
@given(st.lists(st.one_of(k8s_objects(), values), max_size=4))
def test_local_source_objects_only_raise_parse_error(docs: list[Any]) -> None:
    text = yaml.safe_dump_all(docs)
    try:
        parse_manifests(text, "x.yaml")
    except ParseError:
        pass
