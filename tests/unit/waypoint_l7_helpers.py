"""Builders for the waypoint L7 unit tests: requests and Kubernetes object dicts."""

from __future__ import annotations

from typing import Any

from waypoint.l7 import Destination, Request, Source, build_config

WP_NS, WP = "app", "wp"


def mkreq(
    path: str = "/",
    *,
    method: str = "GET",
    query: str = "",
    headers: tuple[tuple[str, str], ...] = (),
    svc: str = "web",
    ns: str = "app",
    port: int = 80,
    authority: str | None = None,
    scheme: str = "http",
    src_ip: str = "10.0.0.5",
    principal: str | None = "cluster.local/ns/client/sa/sleep",
    src_ns: str | None = "client",
    grpc: bool = False,
) -> Request:
    host = f"{svc}.{ns}.svc.cluster.local" if svc else ""
    return Request(
        method=method,
        scheme=scheme,
        authority=authority if authority is not None else (host or "10.1.0.9") + f":{port}",
        path=path,
        query=query,
        headers=headers,
        protocol="HTTP/2" if grpc else "HTTP/1.1",
        grpc=grpc,
        src=Source(ip=src_ip, principal=principal, namespace=src_ns),
        dst=Destination(service_host=host, service_namespace=ns if svc else "", port=port,
                        address="10.96.0.10"),
    )


def namespace(name: str, labels: dict[str, str] | None = None) -> tuple[str, dict[str, Any]]:
    return f"Namespace//{name}", {"apiVersion": "v1", "kind": "Namespace",
                                   "metadata": {"name": name, "labels": labels or {}}}


def service(ns: str, name: str, ports: dict[str, int] | None = None,
            labels: dict[str, str] | None = None) -> tuple[str, dict[str, Any]]:
    ports = ports if ports is not None else {"http": 80}
    return f"Service/{ns}/{name}", {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "spec": {"ports": [{"name": n, "port": p} for n, p in ports.items()]},
    }


def parent(name: str = "web", port: int | None = None, **kw: Any) -> dict[str, Any]:
    p: dict[str, Any] = {"group": "", "kind": "Service", "name": name, **kw}
    if port is not None:
        p["port"] = port
    return p


def backend(name: str = "web", port: int | None = 80, weight: int | None = None,
            **kw: Any) -> dict[str, Any]:
    b: dict[str, Any] = {"name": name, **kw}
    if port is not None:
        b["port"] = port
    if weight is not None:
        b["weight"] = weight
    return b


def httproute(ns: str, name: str, rules: list[dict[str, Any]],
              parents: list[dict[str, Any]] | None = None, *, kind: str = "HTTPRoute",
              created: str | None = None) -> tuple[str, dict[str, Any]]:
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if created:
        meta["creationTimestamp"] = created
    return f"{kind}/{ns}/{name}", {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": kind, "metadata": meta,
        "spec": {"parentRefs": parents if parents is not None else [parent()], "rules": rules},
    }


def authz(ns: str, name: str, spec: dict[str, Any],
          annotations: dict[str, str] | None = None) -> tuple[str, dict[str, Any]]:
    return f"AuthorizationPolicy/{ns}/{name}", {
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns, "annotations": annotations or {}},
        "spec": spec,
    }


def traffic_policy(ns: str, name: str, spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return f"HTTPTrafficPolicy/{ns}/{name}", {
        "apiVersion": "ambient.io/v1alpha1", "kind": "HTTPTrafficPolicy",
        "metadata": {"name": name, "namespace": ns}, "spec": spec,
    }


def base_objects() -> dict[str, dict[str, Any]]:
    """Namespace ``app`` uses waypoint ``app/wp``; Services web, web-v2 (port 80, 8080)."""
    return dict([
        namespace("app", {"istio.io/use-waypoint": WP}),
        namespace("client"),
        service("app", "web", {"http": 80, "admin": 8080}),
        service("app", "web-v2"),
        service("app", "api"),
    ])


def cfg_of(*objs: tuple[str, dict[str, Any]], base: bool = True):  # type: ignore[no-untyped-def]
    objects = base_objects() if base else {}
    objects.update(dict(objs))
    return build_config(objects, WP_NS, WP)
