"""Offline validation of what we install: Kubernetes OpenAPI schemas, CRD structure, and
custom resources against our CRDs.

Role: the check a real API server would do, without one (none can run on our machines):
built-in kinds go through ``kubernetes-validate`` (strict: unknown fields are errors), CRDs
must be *structural* (apiextensions.k8s.io/v1 rules), and AuthorizationPolicy /
PeerAuthentication / HTTPTrafficPolicy objects are checked against the schema our CRDs
serve (so examples and user manifests fail here, not at apply time).

Invariants: pure functions returning a list of human-readable errors (empty = valid).
Gateway API kinds are not validated here: their CRDs come from the Gateway API release.
"""

from __future__ import annotations

from typing import Any

from ambient.install.crds import crds

K8S_VERSION = "1.30.0"
UNVALIDATED_KINDS = frozenset({"Gateway", "GatewayClass", "HTTPRoute"})

Obj = dict[str, Any]


def _where(obj: Obj) -> str:
    m = obj.get("metadata") or {}
    ns = f"{m['namespace']}/" if m.get("namespace") else ""
    return f"{obj.get('kind')} {ns}{m.get('name')}"


def structural_errors(schema: Any, path: str = "") -> list[str]:
    """Violations of Kubernetes' structural-schema rules in an openAPIV3Schema."""
    errs: list[str] = []
    if not isinstance(schema, dict):
        return [f"{path or '<root>'}: a schema must be a mapping"]
    preserve = schema.get("x-kubernetes-preserve-unknown-fields") is True
    if "type" not in schema and not preserve and not schema.get("x-kubernetes-int-or-string"):
        errs.append(f"{path or '<root>'}: no type (structural schemas need one everywhere)")
    if "properties" in schema and "additionalProperties" in schema:
        errs.append(f"{path}: properties and additionalProperties are mutually exclusive")
    for bad in ("$ref", "definitions", "dependencies"):
        if bad in schema:
            errs.append(f"{path}: {bad} is not allowed in a CRD schema")
    for name, sub in (schema.get("properties") or {}).items():
        errs += structural_errors(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        errs += structural_errors(schema["items"], f"{path}[]")
    elif "items" in schema:
        errs.append(f"{path}: items must be a single schema")
    if isinstance(schema.get("additionalProperties"), dict):
        errs += structural_errors(schema["additionalProperties"], f"{path}{{}}")
    if schema.get("type") == "array" and "items" not in schema:
        errs.append(f"{path}: an array needs items")
    return errs


def crd_errors(crd: Obj) -> list[str]:
    """Structure and consistency of one CustomResourceDefinition."""
    where = _where(crd)
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    errs = []
    if crd["metadata"]["name"] != f"{names.get('plural')}.{spec.get('group')}":
        errs.append(f"{where}: metadata.name must be <plural>.<group>")
    versions = spec.get("versions") or []
    if sum(1 for v in versions if v.get("storage")) != 1:
        errs.append(f"{where}: exactly one version must be the storage version")
    for v in versions:
        schema = (v.get("schema") or {}).get("openAPIV3Schema")
        if schema is None:
            errs.append(f"{where} {v.get('name')}: no openAPIV3Schema")
            continue
        if schema.get("type") != "object":
            errs.append(f"{where} {v.get('name')}: the root schema must be type object")
        errs += [f"{where} {v.get('name')}: {e}" for e in structural_errors(schema)]
    return errs


def _crd_schemas() -> dict[tuple[str, str], Obj]:
    """(apiVersion, kind) -> openAPIV3Schema for every version our CRDs serve."""
    out = {}
    for crd in crds():
        spec = crd["spec"]
        for v in spec["versions"]:
            out[(f"{spec['group']}/{v['name']}", spec["names"]["kind"])] = \
                v["schema"]["openAPIV3Schema"]
    return out


def custom_resource_errors(obj: Obj) -> list[str]:
    """A custom resource of ours against its CRD schema (jsonschema; x-kubernetes-* keys are
    annotations to it), plus the object metadata every resource needs."""
    import jsonschema

    key = (str(obj.get("apiVersion")), str(obj.get("kind")))
    schema = _crd_schemas().get(key)
    if schema is None:
        return [f"{_where(obj)}: no CRD of ours serves {key[0]} {key[1]}"]
    errs = []
    if not (obj.get("metadata") or {}).get("name"):
        errs.append(f"{_where(obj)}: metadata.name is required")
    body = {k: v for k, v in obj.items() if k in ("spec", "status")}
    validator = jsonschema.Draft7Validator(schema)
    for e in sorted(validator.iter_errors(body), key=lambda e: list(e.path)):
        field = ".".join(str(p) for p in e.path) or "<root>"
        errs.append(f"{_where(obj)}: {field}: {e.message}")
    return errs


def object_errors(obj: Obj, k8s_version: str = K8S_VERSION) -> list[str]:
    """Every problem with one object we would apply (empty list: valid)."""
    import kubernetes_validate as kv

    kind = str(obj.get("kind"))
    if kind in UNVALIDATED_KINDS:
        return []
    if (str(obj.get("apiVersion")), kind) in _crd_schemas():
        return custom_resource_errors(obj)
    errs = []
    try:
        kv.validate(obj, k8s_version, strict=True)
    except kv.ValidationError as e:
        field = ".".join(str(p) for p in e.path) or "<root>"
        errs.append(f"{_where(obj)}: {field}: {e.message}")
    except (kv.SchemaNotFoundError, kv.InvalidSchemaError) as e:
        errs.append(f"{_where(obj)}: no Kubernetes {k8s_version} schema: {e}")
    if kind == "CustomResourceDefinition":
        errs += crd_errors(obj)
    return errs


def validate_all(objs: list[Obj], k8s_version: str = K8S_VERSION) -> list[str]:
    out: list[str] = []
    for o in objs:
        out += object_errors(o, k8s_version)
    return out
