"""Pure parts of the Kubernetes source and of the test API server: backoff, watch lines,
merge/JSON patches, selectors, REST paths."""

from __future__ import annotations

import json
from typing import Any

import pytest
from k8s_apiserver import ApiError, json_patch, matches_selectors, merge_patch, parse_path

from controlplane.k8s_source import KIND_APIS, Backoff, Gone, WatchError, parse_watch_line

POD_API = KIND_APIS["Pod"]


@pytest.mark.parametrize(("rng", "want"), [
    (0.0, [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]),
    (0.999999, [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]),
])
def test_backoff_doubles_to_the_cap_with_jitter(rng: float, want: list[float]) -> None:
    b = Backoff(base=1.0, cap=8.0, rng=lambda: rng)
    got = [round(b.next(), 3) for _ in range(6)]
    assert got == want
    b.reset()
    assert round(b.next(), 3) == want[0]


def line(type_: str, obj: dict[str, Any]) -> bytes:
    return json.dumps({"type": type_, "object": obj}).encode()


def test_watch_lines() -> None:
    t, obj, rv = parse_watch_line(line("ADDED", {"metadata": {"name": "p",
                                                              "resourceVersion": "7"}}), POD_API)
    assert (t, obj["kind"], obj["apiVersion"], rv) == ("ADDED", "Pod", "v1", "7")
    t, _, rv = parse_watch_line(line("BOOKMARK", {"kind": "Pod", "apiVersion": "v1",
                                                  "metadata": {"resourceVersion": "9"}}), POD_API)
    assert (t, rv) == ("BOOKMARK", "9")
    with pytest.raises(Gone, match="too old"):
        parse_watch_line(line("ERROR", {"kind": "Status", "code": 410, "reason": "Expired",
                                        "message": "too old resource version"}), POD_API)
    with pytest.raises(WatchError, match="500"):
        parse_watch_line(line("ERROR", {"code": 500, "reason": "InternalError"}), POD_API)
    for bad in (b"not json", line("WHAT", {"metadata": {}}), b'{"type": "ADDED"}'):
        with pytest.raises(WatchError):
            parse_watch_line(bad, POD_API)


def test_merge_patch_deletes_with_null() -> None:
    doc = {"metadata": {"annotations": {"a": "1", "b": "2"}}, "spec": {"x": 1}}
    got = merge_patch(doc, {"metadata": {"annotations": {"a": None, "c": "3"}}})
    assert got == {"metadata": {"annotations": {"b": "2", "c": "3"}}, "spec": {"x": 1}}
    assert doc["metadata"]["annotations"] == {"a": "1", "b": "2"}  # input untouched


def test_json_patch_escapes_and_ops() -> None:
    doc: dict[str, Any] = {"metadata": {"annotations": {}}, "list": [1, 2]}
    got = json_patch(doc, [
        {"op": "add", "path": "/metadata/annotations/ambient.istio.io~1redirection",
         "value": "enabled"},
        {"op": "add", "path": "/list/-", "value": 3},
        {"op": "replace", "path": "/list/0", "value": 0},
        {"op": "remove", "path": "/list/1"},
    ])
    assert got == {"metadata": {"annotations": {"ambient.istio.io/redirection": "enabled"}},
                   "list": [0, 3]}
    with pytest.raises(ApiError):
        json_patch(doc, [{"op": "replace", "path": "/metadata/missing", "value": 1}])
    with pytest.raises(ApiError):
        json_patch(doc, [{"op": "test", "path": "/list/0", "value": 9}])


@pytest.mark.parametrize(("labels", "selector", "ok"), [
    ({"app": "web"}, "app=web", True),
    ({"app": "web"}, "app==web", True),
    ({"app": "web"}, "app!=web", False),
    ({"app": "web"}, "app", True),
    ({"app": "web"}, "!app", False),
    ({}, "app!=web", True),
    ({"app": "web", "v": "1"}, "app=web,v=2", False),
])
def test_label_selectors(labels: dict[str, str], selector: str, ok: bool) -> None:
    assert matches_selectors({"metadata": {"labels": labels}}, selector, "") is ok


def test_field_selectors() -> None:
    pod = {"metadata": {"name": "p", "namespace": "ns"}, "spec": {"nodeName": "n1"}}
    assert matches_selectors(pod, "", "spec.nodeName=n1,metadata.namespace=ns")
    assert not matches_selectors(pod, "", "spec.nodeName=n2")
    assert matches_selectors(pod, "", "spec.nodeName!=n2")


@pytest.mark.parametrize(("path", "kind", "ns", "name"), [
    ("/api/v1/pods", "Pod", None, None),
    ("/api/v1/namespaces", "Namespace", None, None),
    ("/api/v1/namespaces/default", "Namespace", None, "default"),
    ("/api/v1/namespaces/default/pods", "Pod", "default", None),
    ("/api/v1/namespaces/default/pods/p1", "Pod", "default", "p1"),
    ("/apis/discovery.k8s.io/v1/endpointslices", "EndpointSlice", None, None),
    ("/apis/security.istio.io/v1/namespaces/x/authorizationpolicies/a",
     "AuthorizationPolicy", "x", "a"),
    ("/apis/gateway.networking.k8s.io/v1/httproutes", "HTTPRoute", None, None),
])
def test_rest_paths(path: str, kind: str, ns: str | None, name: str | None) -> None:
    route = parse_path(path)
    assert route.resource is not None
    assert (route.resource.kind, route.namespace, route.name) == (kind, ns, name)


@pytest.mark.parametrize("path", ["/api/v1/widgets", "/healthz", "/api/v1/namespaces/x/namespaces",
                                  "/api/v1/namespaces/x/pods/p/exec/y"])
def test_unknown_paths_are_404(path: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_path(path)
    assert info.value.code == 404
