"""The CustomResourceDefinitions ambient serves, as pure data.

Role: ``security.istio.io`` AuthorizationPolicy and PeerAuthentication (the same group, kinds,
versions and field names as Istio's, so manifests written for Istio apply unchanged and
Istio's own CRDs can stand in for these), and our ``ambient.io/v1alpha1`` HTTPTrafficPolicy
(fault injection and local rate limiting for waypoints).  The Gateway API CRDs are a
prerequisite installed from the Gateway API release (see ``daemonset/README.md``).

Invariants:
- Every schema is *structural* (each node has a ``type`` or preserves unknown fields), as
  ``apiextensions.k8s.io/v1`` requires; ``tests/unit/test_install_validate.py`` checks it.
- Schemas are written from the field list in Istio's API reference; field names are the
  contract, the schema text is ours.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

SECURITY_GROUP = "security.istio.io"
AMBIENT_GROUP = "ambient.io"


def _str() -> Schema:
    return {"type": "string"}


def _strs() -> Schema:
    return {"type": "array", "items": {"type": "string"}}


def _obj(props: dict[str, Schema], **extra: Any) -> Schema:
    return {"type": "object", "properties": props, **extra}


def _selector() -> Schema:
    return _obj({"matchLabels": {"type": "object",
                                 "additionalProperties": {"type": "string"}}},
                description="Which pods this applies to (in the policy's namespace).")


def _target_ref() -> Schema:
    return _obj({"group": _str(), "kind": _str(), "name": _str(), "namespace": _str()},
                required=["kind", "name"])


def _status() -> Schema:
    return {"type": "object", "x-kubernetes-preserve-unknown-fields": True}


def authorization_policy_spec() -> Schema:
    source = _obj({k: _strs() for k in (
        "principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals",
        "namespaces", "notNamespaces", "serviceAccounts", "notServiceAccounts",
        "ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks")})
    operation = _obj({k: _strs() for k in (
        "hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths",
        "notPaths")})
    rule = _obj({
        "from": {"type": "array", "items": _obj({"source": source})},
        "to": {"type": "array", "items": _obj({"operation": operation})},
        "when": {"type": "array", "items": _obj(
            {"key": _str(), "values": _strs(), "notValues": _strs()}, required=["key"])},
    })
    return _obj({
        "selector": _selector(),
        "targetRef": _target_ref(),
        "targetRefs": {"type": "array", "items": _target_ref()},
        "action": {"type": "string", "enum": ["ALLOW", "DENY", "AUDIT", "CUSTOM"]},
        "provider": _obj({"name": _str()}),
        "rules": {"type": "array", "items": rule},
    })


def peer_authentication_spec() -> Schema:
    mode = {"type": "string", "enum": ["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]}
    return _obj({
        "selector": _selector(),
        "mtls": _obj({"mode": mode}),
        "portLevelMtls": {"type": "object",
                          "additionalProperties": _obj({"mode": mode}),
                          "description": "Per target port (a number as the key)."},
    })


def http_traffic_policy_spec() -> Schema:
    percent = {"type": "number", "minimum": 0, "maximum": 100}
    fault = _obj({
        "delay": _obj({"fixedDelay": _str(), "percentage": percent}, required=["fixedDelay"]),
        "abort": _obj({"httpStatus": {"type": "integer", "minimum": 200, "maximum": 599},
                       "percentage": percent}, required=["httpStatus"]),
    })
    rate = _obj({"maxTokens": {"type": "integer", "minimum": 1},
                 "tokensPerFill": {"type": "integer", "minimum": 1},
                 "fillInterval": _str()}, required=["maxTokens", "fillInterval"])
    rule = _obj({
        "matches": {"type": "array", "items": {"type": "object",
                                               "x-kubernetes-preserve-unknown-fields": True},
                    "description": "HTTPRoute-style matches (path, headers, method)."},
        "fault": fault,
        "rateLimit": rate,
    })
    return _obj({"targetRefs": {"type": "array", "items": _target_ref()},
                 "rules": {"type": "array", "items": rule}}, required=["targetRefs"])


def _crd(group: str, kind: str, plural: str, versions: list[str], storage: str,
         spec: Schema, short: list[str], categories: list[str],
         columns: list[dict[str, Any]]) -> dict[str, Any]:
    version_list = []
    for v in versions:
        version_list.append({
            "name": v, "served": True, "storage": v == storage,
            "schema": {"openAPIV3Schema": _obj({"spec": spec, "status": _status()},
                                               description=f"{kind} ({group}/{v})")},
            "subresources": {"status": {}},
            "additionalPrinterColumns": columns,
        })
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural,
                      "singular": kind.lower(), "shortNames": short,
                      "categories": categories},
            "scope": "Namespaced",
            "versions": version_list,
        },
    }


def _age() -> dict[str, Any]:
    return {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


def crds() -> list[dict[str, Any]]:
    """Every CRD we install, in a stable order."""
    istio_cats = ["istio-io", "security-istio-io"]
    return [
        _crd(SECURITY_GROUP, "AuthorizationPolicy", "authorizationpolicies",
             ["v1", "v1beta1"], "v1", authorization_policy_spec(), ["ap"], istio_cats,
             [{"name": "Action", "type": "string", "jsonPath": ".spec.action"}, _age()]),
        _crd(SECURITY_GROUP, "PeerAuthentication", "peerauthentications",
             ["v1", "v1beta1"], "v1", peer_authentication_spec(), ["pa"], istio_cats,
             [{"name": "Mode", "type": "string", "jsonPath": ".spec.mtls.mode"}, _age()]),
        _crd(AMBIENT_GROUP, "HTTPTrafficPolicy", "httptrafficpolicies", ["v1alpha1"],
             "v1alpha1", http_traffic_policy_spec(), ["htp"], ["ambient"], [_age()]),
    ]
