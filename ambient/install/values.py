"""Install values: what an operator may choose, with defaults, loaded from YAML and ``--set``.

Role: the single input of the pure renderer (``ambient.install.render``).  A values file uses
Helm-style camelCase keys (``trustDomain``, ``resources.ztunnel.requests.cpu``); snake_case
is accepted too.  ``--set a.b=c`` overrides one leaf after the file is read.

Invariants:
- Unknown keys are errors that name the known keys (a typo never silently does nothing).
- Every field is validated once, in :func:`validate`; the renderer trusts a ``Values``.
- ``Values()`` are the defaults that produce the committed ``daemonset/*.yaml``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ambient import __version__

CAPTURE_BACKENDS = ("iptables", "nftables", "ebpf", "auto")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "error")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")


class ValuesError(ValueError):
    """A values file or ``--set`` is wrong; the message says which key and what is allowed."""


@dataclass
class ResourceSpec:
    """A container's ``resources`` (Kubernetes quantities as strings)."""

    requests: dict[str, str] = field(default_factory=dict)
    limits: dict[str, str] = field(default_factory=dict)

    def to_k8s(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        if self.requests:
            out["requests"] = dict(self.requests)
        if self.limits:
            out["limits"] = dict(self.limits)
        return out


def _res(cpu: str, mem: str, mem_limit: str) -> ResourceSpec:
    return ResourceSpec(requests={"cpu": cpu, "memory": mem}, limits={"memory": mem_limit})


@dataclass
class Resources:
    ztunnel: ResourceSpec = field(default_factory=lambda: _res("200m", "512Mi", "1Gi"))
    cni: ResourceSpec = field(default_factory=lambda: _res("100m", "128Mi", "512Mi"))
    controlplane: ResourceSpec = field(default_factory=lambda: _res("200m", "256Mi", "1Gi"))
    waypoint: ResourceSpec = field(default_factory=lambda: _res("100m", "128Mi", "512Mi"))


@dataclass
class CniValues:
    conf_dir: str = "/etc/cni/net.d"  # the host's CNI config dir
    bin_dir: str = "/opt/cni/bin"  # the host's CNI binaries dir
    # The plugin runs on the host (kubelet/containerd exec it), not in our image: it needs a
    # Python 3.11+ there.  The installer copies the plugin's code next to the launcher.
    host_python: str = "/usr/bin/python3"
    exclude_namespaces: list[str] = field(default_factory=lambda: ["istio-system",
                                                                    "kube-system"])
    cgroup_root: str = "/sys/fs/cgroup"  # host cgroup2 mount (eBPF attaches here)


@dataclass
class Values:
    image: str = f"ambient:{__version__}"
    pull_policy: str = "IfNotPresent"
    namespace: str = "istio-system"
    create_namespace: bool = True
    capture: str = "iptables"
    trust_domain: str = "cluster.local"
    cluster_id: str = "Kubernetes"
    log_level: str = "info"
    controlplane_replicas: int = 1
    gateway_class: bool = True  # install GatewayClass istio-waypoint (needs Gateway API CRDs)
    resources: Resources = field(default_factory=Resources)
    cni: CniValues = field(default_factory=CniValues)

    @property
    def ebpf(self) -> bool:
        """Whether nodes may run eBPF capture (``auto`` may pick it): mount bpffs and cgroups."""
        return self.capture in ("ebpf", "auto")


# ------------------------------------------------------------------ loading


def _snake(key: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key).lower()


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def _coerce(value: Any, like: Any, where: str) -> Any:
    if isinstance(like, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValuesError(f"{where}: expected true or false, got {value!r}")
    if isinstance(like, int):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValuesError(f"{where}: expected an integer, got {value!r}") from None
    if isinstance(like, list):
        if isinstance(value, str):
            return [v for v in value.split(",") if v]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ValuesError(f"{where}: expected a list of strings (or a,b,c), got {value!r}")
    if isinstance(like, dict):  # merged like Helm merges maps; a null value removes a key
        if not isinstance(value, dict):
            raise ValuesError(f"{where}: expected a mapping, got {value!r}")
        merged = dict(like)
        for k, v in value.items():
            if v is None or v == "null":
                merged.pop(str(k), None)
            else:
                merged[str(k)] = str(v)
        return merged
    if isinstance(value, (dict, list)):
        raise ValuesError(f"{where}: expected a single value, got {value!r}")
    return str(value)


def _apply(obj: Any, data: dict[str, Any], where: str) -> None:
    names = {f.name: f for f in dataclasses.fields(obj)}
    for raw_key, value in data.items():
        name = _snake(str(raw_key))
        if name not in names:
            known = ", ".join(_camel(n) for n in names)
            raise ValuesError(f"unknown key {where}{raw_key}; known here: {known}")
        cur = getattr(obj, name)
        if dataclasses.is_dataclass(cur):
            if not isinstance(value, dict):
                raise ValuesError(f"{where}{raw_key}: expected a mapping, got {value!r}")
            _apply(cur, value, f"{where}{raw_key}.")
        else:
            setattr(obj, name, _coerce(value, cur, f"{where}{raw_key}"))


def parse_set(expr: str) -> dict[str, Any]:
    """``a.b.c=v`` -> ``{"a": {"b": {"c": "v"}}}`` (the value stays a string; typed later)."""
    key, sep, value = expr.partition("=")
    if not sep or not key.strip():
        raise ValuesError(f"--set {expr!r}: expected key=value, e.g. --set capture=ebpf")
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load(files: list[Path] | None = None, sets: list[str] | None = None) -> Values:
    """Defaults, then each YAML file in order, then each ``--set``; validated."""
    import yaml

    values = Values()
    for path in files or []:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise ValuesError(f"cannot read values file {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ValuesError(f"values file {path} is not valid YAML: {e}") from None
        if data is None:
            continue
        if not isinstance(data, dict):
            raise ValuesError(f"values file {path} must hold a mapping at the top level")
        _apply(values, data, "")
    for expr in sets or []:
        _apply(values, parse_set(expr), "")
    validate(values)
    return values


def validate(v: Values) -> None:
    """Raise :class:`ValuesError` for the first value Kubernetes or our processes would reject."""
    if not _DNS_LABEL.match(v.namespace):
        raise ValuesError(f"namespace {v.namespace!r} is not a valid namespace name "
                          "(lowercase letters, digits and '-', at most 63)")
    if v.capture not in CAPTURE_BACKENDS:
        raise ValuesError(f"capture {v.capture!r}: choose one of {', '.join(CAPTURE_BACKENDS)}")
    if v.pull_policy not in PULL_POLICIES:
        raise ValuesError(f"pullPolicy {v.pull_policy!r}: choose one of "
                          f"{', '.join(PULL_POLICIES)}")
    if v.log_level.lower() not in LOG_LEVELS:
        raise ValuesError(f"logLevel {v.log_level!r}: choose one of {', '.join(LOG_LEVELS)}")
    if not v.image or any(c.isspace() for c in v.image):
        raise ValuesError(f"image {v.image!r} is not an image reference")
    if not v.trust_domain or "/" in v.trust_domain or any(c.isspace() for c in v.trust_domain):
        raise ValuesError(f"trustDomain {v.trust_domain!r} is not a valid SPIFFE trust domain")
    if v.controlplane_replicas < 1:
        raise ValuesError("controlplaneReplicas must be at least 1")
    for comp in dataclasses.fields(v.resources):
        spec: ResourceSpec = getattr(v.resources, comp.name)
        for kind, table in (("requests", spec.requests), ("limits", spec.limits)):
            for res, qty in table.items():
                if res not in ("cpu", "memory", "ephemeral-storage"):
                    raise ValuesError(f"resources.{comp.name}.{kind}.{res}: only cpu, memory "
                                      "and ephemeral-storage are allowed")
                if not _QUANTITY.match(qty):
                    raise ValuesError(f"resources.{comp.name}.{kind}.{res}={qty!r} is not a "
                                      "Kubernetes quantity (e.g. 100m, 512Mi)")
    for p in (v.cni.conf_dir, v.cni.bin_dir, v.cni.host_python, v.cni.cgroup_root):
        if not p.startswith("/"):
            raise ValuesError(f"cni path {p!r} must be absolute")

