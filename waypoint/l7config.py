"""``build_config``: Kubernetes objects -> one waypoint's ``WaypointConfig`` (+ problems).

Role: picks out what concerns the waypoint ``<namespace>/<name>`` from the object set the
control plane sees (keys ``Kind/ns/name`` as in ``controlplane/objects.py``):

- the Services it serves: ``istio.io/use-waypoint`` (and ``istio.io/use-waypoint-namespace``)
  on the Service, else on its Namespace; ``none`` opts out; skipped when the waypoint's
  Gateway says ``istio.io/waypoint-for: workload|none``;
- ``HTTPRoute``/``GRPCRoute`` with a ``parentRefs`` entry of kind Service naming one of them
  (optional ``port``/``sectionName``); backendRefs to Services (cross-namespace ones need a
  ``ReferenceGrant``);
- ``AuthorizationPolicy`` with ``targetRefs`` to this waypoint's Gateway or to such a Service;
- ``HTTPTrafficPolicy`` (ours: faults, rate limits) targeting those routes (optionally one rule
  by ``sectionName``) or Services.  The most specific target wins per field: rule, then
  route, then Service; ties go to the oldest, then ``ns/name``.

Invariants: pure, deterministic (objects read in key order), never raises: every object that
cannot be used yields a problem naming ``Kind ns/name`` and is skipped (authorization rules
that do not parse are kept, fail closed - see ``authz.py``); the rest still apply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ambient.config._common import FieldError
from waypoint.authz import L7Policy, parse_policy
from waypoint.policy import (
    TRAFFIC_POLICY_KIND,
    Fault,
    RateLimit,
    TrafficPolicy,
    parse_traffic_policy,
)
from waypoint.route_parse import BackendResolver, ParsedRoute, entries_for, parse_route
from waypoint.routes import Backend, Entry, RouteTable

__all__ = ["WaypointConfig", "build_config"]

USE_WAYPOINT = "istio.io/use-waypoint"
USE_WAYPOINT_NS = "istio.io/use-waypoint-namespace"
WAYPOINT_FOR = "istio.io/waypoint-for"
_GATEWAY_GROUP = "gateway.networking.k8s.io"


@dataclass(frozen=True)
class WaypointConfig:
    """Everything the L7 decisions of one waypoint need; immutable, swapped whole."""

    namespace: str
    name: str
    trust_domain: str = "cluster.local"
    cluster_domain: str = "cluster.local"
    services: frozenset[str] = frozenset()  # FQDNs of the services this waypoint serves
    routes: RouteTable = field(default_factory=RouteTable)
    gateway_policies: tuple[L7Policy, ...] = ()
    service_policies: Mapping[str, tuple[L7Policy, ...]] = field(default_factory=dict)
    rate_limit_keys: frozenset[str] = frozenset()  # for RateLimiters.prune
    # keys (``Kind/ns/name``) of objects meant for this waypoint that were refused: the
    # caller keeps their last good version in force
    rejected: frozenset[str] = frozenset()


@dataclass
class _Svc:
    namespace: str
    name: str
    host: str
    ports: dict[str, int]  # port name -> port


def _meta(obj: Mapping[str, Any]) -> dict[str, Any]:
    m = obj.get("metadata")
    return m if isinstance(m, dict) else {}


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _labels(obj: Mapping[str, Any]) -> dict[str, Any]:
    lb = _meta(obj).get("labels")
    return lb if isinstance(lb, dict) else {}


def _split_key(key: str) -> tuple[str, str, str]:
    kind, _, rest = key.partition("/")
    ns, _, name = rest.partition("/")
    return kind, ns, name


def _bound_services(objects: Mapping[str, dict[str, Any]], wns: str, wname: str,
                    cluster_domain: str) -> dict[tuple[str, str], _Svc]:
    gw = objects.get(f"Gateway/{wns}/{wname}")
    if gw is not None and _labels(gw).get(WAYPOINT_FOR, "service") not in ("service", "all"):
        return {}
    out: dict[tuple[str, str], _Svc] = {}
    for key in sorted(objects):
        kind, ns, name = _split_key(key)
        if kind != "Service":
            continue
        svc = objects[key]
        labels = _labels(svc)
        source = labels
        if USE_WAYPOINT not in labels:
            source = _labels(objects.get(f"Namespace//{ns}") or {})
        want = source.get(USE_WAYPOINT)
        if want != wname or source.get(USE_WAYPOINT_NS, ns) != wns:
            continue
        ports: dict[str, int] = {}
        for p in _list(_dict(svc.get("spec")).get("ports")):
            if isinstance(p, dict) and isinstance(p.get("port"), int):
                ports[str(p.get("name", ""))] = p["port"]
        out[(ns, name)] = _Svc(ns, name, f"{name}.{ns}.svc.{cluster_domain}", ports)
    return out


def _granted(objects: Mapping[str, dict[str, Any]], from_kind: str, from_ns: str, to_ns: str,
             to_name: str) -> bool:
    """Whether a ReferenceGrant in ``to_ns`` lets ``from_kind`` in ``from_ns`` use the Service."""
    for key in sorted(objects):
        kind, ns, _ = _split_key(key)
        if kind != "ReferenceGrant" or ns != to_ns:
            continue
        spec = _dict(objects[key].get("spec"))
        froms = _list(spec.get("from"))
        tos = _list(spec.get("to"))
        if not any(isinstance(f, dict) and f.get("group") == _GATEWAY_GROUP
                   and f.get("kind") == from_kind and f.get("namespace") == from_ns
                   for f in froms):
            continue
        if any(isinstance(t, dict) and t.get("group", "") in ("", "core")
               and t.get("kind") == "Service" and t.get("name", to_name) == to_name
               for t in tos):
            return True
    return False


def _resolver(objects: Mapping[str, dict[str, Any]], route_kind: str, cluster_domain: str,
              warnings: list[str]) -> BackendResolver:
    def resolve(from_ns: str, ns: str, name: str, port: int | None, weight: int, group: str,
                kind: str) -> Backend:
        host = f"{name}.{ns}.svc.{cluster_domain}"
        invalid = None
        if kind != "Service" or group not in ("", "core"):
            invalid = f"backendRef kind {group or 'core'}/{kind} is not supported (use Service)"
        elif port is None:
            invalid = f"backendRef to Service {ns}/{name} has no port"
        elif f"Service/{ns}/{name}" not in objects:
            invalid = f"backendRef Service {ns}/{name} does not exist"
        elif ns != from_ns and not _granted(objects, route_kind, from_ns, ns, name):
            invalid = (f"backendRef to Service {ns}/{name} crosses namespaces without a "
                       f"ReferenceGrant in {ns} allowing {route_kind} from {from_ns}")
        if invalid:
            warnings.append(invalid + "; requests sent to it get HTTP 500")
        return Backend(host=host, namespace=ns, port=port or 0, weight=weight, invalid=invalid)

    return resolve


def _pick(policies: list[TrafficPolicy], attr: str, where: str,
          problems: list[str]) -> Fault | RateLimit | None:
    setting = sorted((p for p in policies if getattr(p, attr) is not None),
                     key=lambda p: (p.created, p.key))
    if len(setting) > 1:
        problems.append(f"HTTPTrafficPolicy {', '.join(p.key for p in setting)} all set "
                        f"{attr} for {where}; {setting[0].key} (oldest) wins")
    return getattr(setting[0], attr) if setting else None


def build_config(
    objects: Mapping[str, dict[str, Any]],
    waypoint_namespace: str,
    waypoint_name: str,
    *,
    trust_domain: str = "cluster.local",
    cluster_domain: str = "cluster.local",
) -> tuple[WaypointConfig, list[str]]:
    """The L7 configuration of waypoint ``waypoint_namespace/waypoint_name``, with problems."""
    problems: list[str] = []
    try:
        cfg = _build(objects, waypoint_namespace, waypoint_name, trust_domain, cluster_domain,
                     problems)
        return cfg, list(dict.fromkeys(problems))  # one line per problem, in order
    except Exception as e:  # a bug here must not take the waypoint down: serve no L7 config
        problems.append(f"internal error building the waypoint config ({type(e).__name__}: "
                        f"{e}); serving with no routes and no policies - please report this")
        return WaypointConfig(waypoint_namespace, waypoint_name, trust_domain,
                              cluster_domain), problems


def _why(e: Exception) -> str:
    if isinstance(e, FieldError):
        return str(e)
    return f"cannot be read ({type(e).__name__}: {e})"


_OUR_KINDS = ("HTTPRoute", "GRPCRoute", "AuthorizationPolicy", TRAFFIC_POLICY_KIND)


def _build(all_objects: Mapping[str, dict[str, Any]], wns: str, wname: str, td: str, cd: str,
           problems: list[str]) -> WaypointConfig:
    rejected: set[str] = set()
    objects = {k: v for k, v in all_objects.items() if isinstance(v, dict)}
    for key in sorted(set(all_objects) - set(objects)):
        kind, ns, name = _split_key(key)
        if kind in _OUR_KINDS and ns == wns:
            problems.append(f"{kind} {ns}/{name}: is not an object; skipped")
            rejected.add(key)
    services = _bound_services(objects, wns, wname, cd)
    by_host = {s.host: s for s in services.values()}

    # Traffic policies, indexed by what they target.
    tp_by_target: dict[tuple[str, str, str, str | None], list[TrafficPolicy]] = {}
    for key in sorted(objects):
        kind, ns, name = _split_key(key)
        if kind != TRAFFIC_POLICY_KIND:
            continue
        try:
            tp = parse_traffic_policy(objects[key])
        except Exception as e:
            problems.append(f"{kind} {ns}/{name}: {_why(e)}; skipped")
            rejected.add(key)
            continue
        for t in tp.targets:
            tp_by_target.setdefault((t.kind, t.namespace, t.name, t.section), []).append(tp)
    used_targets: set[tuple[str, str, str, str | None]] = set()

    def traffic(keys: list[tuple[str, str, str, str | None]], where: str,
                ) -> tuple[Fault | None, RateLimit | None]:
        fault: Any = None
        rl: Any = None
        for k in keys:  # most specific first
            pols = tp_by_target.get(k, [])
            if pols:
                used_targets.add(k)
            fault = fault or _pick(pols, "fault", where, problems)
            rl = rl or _pick(pols, "rate_limit", where, problems)
        return fault, rl

    # Routes.
    http: dict[str, list[Entry]] = {}
    grpc: dict[str, list[Entry]] = {}
    for key in sorted(objects):
        kind, ns, name = _split_key(key)
        if kind not in ("HTTPRoute", "GRPCRoute"):
            continue
        obj = dict(objects[key])
        obj.setdefault("kind", kind)
        warns: list[str] = []
        try:
            route = parse_route(obj, _resolver(objects, kind, cd, warns))
        except Exception as e:
            if _mentions_us(objects[key], services, wns, wname):
                problems.append(f"{kind} {ns}/{name}: {_why(e)}; skipped")
                rejected.add(key)
            continue
        attached = _attach(route, services, wns, wname, problems)
        if attached:
            problems.extend(f"{kind} {ns}/{name}: {w}" for w in warns)
        for svc, port in attached:
            rules = []
            for rule, _ in route.rules:
                fault, rl = traffic([
                    (kind, ns, name, rule.section),
                    (kind, ns, name, None),
                    ("Service", svc.namespace, svc.name, None),
                ] if rule.section is not None else [
                    (kind, ns, name, None),
                    ("Service", svc.namespace, svc.name, None),
                ], f"rule {rule.name}")
                rules.append(replace(rule, fault=fault, rate_limit=rl))
            consumer = ns if ns != svc.namespace else None
            entries = grpc if kind == "GRPCRoute" else http
            entries.setdefault(svc.host, []).extend(entries_for(route, rules, port, consumer))

    service_traffic = {}
    for host, svc in by_host.items():
        f, rl = traffic([("Service", svc.namespace, svc.name, None)], f"Service {host}")
        if f is not None or rl is not None:
            service_traffic[host] = (f, rl)
    for k in sorted(set(tp_by_target) - used_targets, key=str):
        if k[0] != "Service" and _route_is_ours(objects, k, services):
            what = f"rule {k[3]!r} of " if k[3] is not None else ""
            problems.append(f"HTTPTrafficPolicy {', '.join(p.key for p in tp_by_target[k])}: "
                            f"targets {what}{k[0]} {k[1]}/{k[2]}, which has no such rule or "
                            "did not attach; it has no effect")

    table = RouteTable(
        http={h: tuple(sorted(es, key=lambda e: e.rank)) for h, es in http.items()},
        grpc={h: tuple(sorted(es, key=lambda e: e.rank)) for h, es in grpc.items()},
        service_traffic=service_traffic,
    )
    rl_keys = {e.rule.name for t in (table.http, table.grpc) for es in t.values() for e in es
               if e.rule.rate_limit is not None}
    rl_keys |= {f"Service/{h}:{p}" for h, (_, rl) in service_traffic.items() if rl is not None
                for p in by_host[h].ports.values()}

    gateway_pols, service_pols = _policies(objects, wns, wname, td, services, problems,
                                           rejected)
    return WaypointConfig(
        namespace=wns,
        name=wname,
        trust_domain=td,
        cluster_domain=cd,
        services=frozenset(by_host),
        routes=table,
        gateway_policies=gateway_pols,
        service_policies=service_pols,
        rate_limit_keys=frozenset(rl_keys),
        rejected=frozenset(rejected),
    )


def _route_is_ours(objects: Mapping[str, dict[str, Any]], k: tuple[str, str, str, str | None],
                   services: dict[tuple[str, str], _Svc]) -> bool:
    obj = objects.get(f"{k[0]}/{k[1]}/{k[2]}")
    return obj is None or _mentions_us(obj, services, "", "")


def _mentions_us(obj: Mapping[str, Any], services: dict[tuple[str, str], _Svc], wns: str,
                 wname: str) -> bool:
    """Whether a (possibly malformed) route names one of our services or our Gateway."""
    try:
        return _names_us(obj, services, wns, wname)
    except Exception:  # unhashable junk in a ref: report it if it is in our namespace
        return str(_meta(obj).get("namespace")) == wns


def _names_us(obj: Mapping[str, Any], services: dict[tuple[str, str], _Svc], wns: str,
              wname: str) -> bool:
    ns = str(_meta(obj).get("namespace") or "default")
    refs = _list(_dict(obj.get("spec")).get("parentRefs"))
    for p in refs:
        if not isinstance(p, dict):
            continue
        pns = p.get("namespace", ns)
        if p.get("kind") == "Service" and (pns, p.get("name")) in services:
            return True
        if p.get("kind", "Gateway") == "Gateway" and (pns, p.get("name")) == (wns, wname):
            return True
    return False


def _attach(route: ParsedRoute, services: dict[tuple[str, str], _Svc], wns: str, wname: str,
            problems: list[str]) -> list[tuple[_Svc, int | None]]:
    out: list[tuple[_Svc, int | None]] = []
    where = f"{route.kind} {route.namespace}/{route.name}"
    for p in route.parents:
        if p.kind == "Gateway" and p.group == _GATEWAY_GROUP and (p.namespace, p.name) == (
            wns, wname
        ):
            problems.append(f"{where}: parentRef names the waypoint Gateway {wns}/{wname}; "
                            "attach routes to the Service (parentRefs kind: Service) instead")
            continue
        if p.kind != "Service" or p.group not in ("", "core"):
            continue
        svc = services.get((p.namespace, p.name))
        if svc is None:
            continue  # not a service of this waypoint
        port = p.port
        if p.section is not None:
            if p.section not in svc.ports:
                problems.append(f"{where}: parentRef sectionName {p.section!r} is not a port "
                                f"name of Service {svc.namespace}/{svc.name}; not attached")
                continue
            port = svc.ports[p.section]
        out.append((svc, port))
    return out


def _policies(objects: Mapping[str, dict[str, Any]], wns: str, wname: str, td: str,
              services: dict[tuple[str, str], _Svc], problems: list[str],
              rejected: set[str],
              ) -> tuple[tuple[L7Policy, ...], dict[str, tuple[L7Policy, ...]]]:
    gateway: list[L7Policy] = []
    per_service: dict[str, list[L7Policy]] = {}
    for key in sorted(objects):
        kind, ns, name = _split_key(key)
        if kind != "AuthorizationPolicy":
            continue
        obj = objects[key]
        spec = obj.get("spec")
        if not isinstance(spec, dict) or (
            spec.get("targetRefs") is None and spec.get("targetRef") is None
        ):
            continue  # selector/namespace policies are ztunnel's
        try:
            mine = _targets_us(spec, ns, wns, wname, services)
        except Exception:  # unhashable junk in a ref: report it if it is in our namespace
            mine = ns == wns
        if not mine:
            continue
        notes: list[str] = []
        try:
            parsed = parse_policy(obj, td, notes)
        except Exception as e:
            problems.append(f"AuthorizationPolicy {ns}/{name}: {_why(e)}; skipped")
            rejected.add(key)
            continue
        finally:
            problems.extend(f"AuthorizationPolicy {ns}/{name}: {n}" for n in notes)
        if parsed is None:
            continue
        policy, targets = parsed
        for t in targets:
            if t.kind == "Gateway" and (ns, t.name) == (wns, wname):
                if policy not in gateway:
                    gateway.append(policy)
            elif t.kind == "Service" and (ns, t.name) in services:
                lst = per_service.setdefault(services[(ns, t.name)].host, [])
                if policy not in lst:
                    lst.append(policy)
    return tuple(gateway), {h: tuple(ps) for h, ps in per_service.items()}


def _targets_us(spec: dict[str, Any], ns: str, wns: str, wname: str,
                services: dict[tuple[str, str], _Svc]) -> bool:
    refs = _list(spec.get("targetRefs"))
    if isinstance(spec.get("targetRef"), dict):
        refs = [*refs, spec["targetRef"]]
    for t in refs:
        if not isinstance(t, dict):
            return ns == wns  # malformed: report it if it is in our namespace
        if t.get("kind") == "Gateway" and (ns, t.get("name")) == (wns, wname):
            return True
        if t.get("kind") == "Service" and (ns, t.get("name")) in services:
            return True
        if t.get("kind") not in ("Gateway", "Service") and ns == wns:
            return True  # unsupported kind in our namespace: worth a problem
    return False
