"""``ambientctl ztunnel-config``: a ztunnel config dump as istioctl-style tables, JSON or YAML.

Pure: every function takes the dump (the JSON of ``GET :15000/config_dump``, or of
``/connections`` for connections) and returns text. Columns follow ``istioctl
ztunnel-config`` so operators read the same shapes:

- workloads: ``NAMESPACE POD NAME ADDRESS NODE WAYPOINT PROTOCOL``
- services: ``NAMESPACE SERVICE NAME SERVICE VIP WAYPOINT ENDPOINTS`` (healthy/total)
- policies: ``NAMESPACE POLICY NAME ACTION SCOPE``
- certificates: ``CERTIFICATE NAME TYPE STATUS VALID CERT SERIAL NUMBER NOT AFTER NOT BEFORE``
  (one row per certificate of each chain; the last of a chain is ``CA``, then ``ROOT`` rows)
- connections (ours): ``WORKLOAD DIRECTION LOCAL REMOTE REMOTE TARGET PROTOCOL``

Filters (``namespace``, ``address``, ``node``) only narrow rows. Missing values print ``None``
like istioctl's; a dump from an upstream ztunnel (extra fields) formats the same.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import yaml

__all__ = [
    "SECTIONS",
    "Filters",
    "certificates_table",
    "connections_table",
    "policies_table",
    "render",
    "render_table",
    "services_table",
    "workloads_table",
]

SECTIONS = ("workloads", "services", "policies", "certificates", "connections")


@dataclass(frozen=True)
class Filters:
    namespace: str | None = None
    address: str | None = None
    node: str | None = None


def render_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns separated by at least two spaces (like ``tabwriter``)."""
    rows = [list(map(str, r)) for r in rows]
    widths = [len(h) for h in header]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r, strict=True)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [list(header), *rows]]
    return "\n".join(lines) + "\n"


def _waypoint(obj: Mapping[str, Any]) -> str:
    wp = obj.get("waypoint")
    if not isinstance(wp, Mapping):
        return "None"
    dest = str(wp.get("destination", ""))
    # "ns/hostname" -> the waypoint's name (first DNS label); "network/IP" -> the IP.
    host = dest.rpartition("/")[2]
    return host.split(".")[0] if host and not host[0].isdigit() else (host or "None")


def _ip(addr: str) -> str:
    return addr.rpartition("/")[2]  # "network/IP" or "IP"


def _pod_name(w: Mapping[str, Any]) -> str:
    return str(w.get("name") or "None")


def workloads_table(dump: Mapping[str, Any], f: Filters = Filters()) -> str:
    rows = []
    for w in dump.get("workloads") or []:
        ips = [_ip(str(a)) for a in w.get("workloadIps") or w.get("addresses") or []]
        if f.namespace and w.get("namespace") != f.namespace:
            continue
        if f.address and f.address not in ips:
            continue
        if f.node and w.get("node") != f.node:
            continue
        rows.append((w.get("namespace") or "None", _pod_name(w), ",".join(ips) or "None",
                     w.get("node") or "None", _waypoint(w), w.get("protocol") or "TCP"))
    rows.sort()
    return render_table(("NAMESPACE", "POD NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL"),
                        rows)


def _endpoint_counts(svc: Mapping[str, Any], health: Mapping[str, str]) -> str:
    eps = svc.get("endpoints") or {}
    uids = [str(e.get("workloadUid", k)) if isinstance(e, Mapping) else str(k)
            for k, e in eps.items()]
    healthy = sum(1 for u in uids if health.get(u, "Healthy") == "Healthy")
    return f"{healthy}/{len(uids)}"


def services_table(dump: Mapping[str, Any], f: Filters = Filters()) -> str:
    health = {str(w.get("uid")): str(w.get("status", "Healthy"))
              for w in dump.get("workloads") or []}
    rows = []
    for s in dump.get("services") or []:
        vips = [_ip(str(v)) for v in s.get("vips") or []]
        if f.namespace and s.get("namespace") != f.namespace:
            continue
        if f.address and f.address not in vips:
            continue
        rows.append((s.get("namespace") or "None", s.get("name") or s.get("hostname") or "None",
                     ",".join(vips) or "None", _waypoint(s), _endpoint_counts(s, health)))
    rows.sort()
    return render_table(("NAMESPACE", "SERVICE NAME", "SERVICE VIP", "WAYPOINT", "ENDPOINTS"),
                        rows)


def policies_table(dump: Mapping[str, Any], f: Filters = Filters()) -> str:
    rows = []
    for p in dump.get("policies") or []:
        if f.namespace and p.get("namespace") != f.namespace:
            continue
        action = str(p.get("action", ""))
        if p.get("dryRun"):
            action += " (dry-run)"
        rows.append((p.get("namespace") or "None", p.get("name") or "None", action,
                     p.get("scope") or "None"))
    rows.sort()
    return render_table(("NAMESPACE", "POLICY NAME", "ACTION", "SCOPE"), rows)


def _parse_time(s: Any) -> datetime | None:
    if not isinstance(s, str) or not s:
        return None
    try:
        t = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _serial_hex(s: Any) -> str:
    text = str(s or "")
    if text.isdigit():
        return format(int(text), "x")
    return text or "None"


def certificates_table(dump: Mapping[str, Any], f: Filters = Filters(), *,
                       now: datetime | None = None) -> str:
    """``now`` decides VALID CERT (default: the current time)."""
    now = now or datetime.now(UTC)
    rows = []
    for c in dump.get("certificates") or []:
        ident = str(c.get("identity", ""))
        if f.namespace and f"/ns/{f.namespace}/" not in ident:
            continue
        state = str(c.get("state", ""))
        status = "Available" if state == "Available" else (state.split(":")[0] or "None")
        chain = list(c.get("certChain") or [])
        certs = [(x, "Leaf" if i == 0 else "CA") for i, x in enumerate(chain)]
        certs += [(x, "ROOT") for x in c.get("rootCerts") or []]
        if not certs:
            rows.append((ident, "None", status, "false", "None", "None", "None"))
        for cert, kind in certs:
            nb, na = _parse_time(cert.get("validFrom")), _parse_time(cert.get("expirationTime"))
            valid = nb is not None and na is not None and nb <= now <= na
            rows.append((ident, kind, status, str(valid).lower(),
                         _serial_hex(cert.get("serialNumber")),
                         cert.get("expirationTime") or "None", cert.get("validFrom") or "None"))
    return render_table(("CERTIFICATE NAME", "TYPE", "STATUS", "VALID CERT", "SERIAL NUMBER",
                         "NOT AFTER", "NOT BEFORE"), rows)


def connections_table(conns: Sequence[Mapping[str, Any]], f: Filters = Filters()) -> str:
    rows = []
    for c in conns:
        inbound = c.get("direction") == "inbound"
        local, remote = (c.get("dst"), c.get("src")) if inbound else (c.get("src"), c.get("dst"))
        wl = c.get("dstWorkload") if inbound else c.get("srcWorkload")
        if f.address and f.address not in (str(local).rpartition(":")[0],
                                           str(remote).rpartition(":")[0]):
            continue
        proto = "HBONE" if c.get("securityPolicy") == "mutual_tls" else "TCP"
        rows.append((wl or "None", c.get("direction") or "None", local or "None",
                     remote or "None", c.get("hboneTarget") or "None", proto))
    return render_table(("WORKLOAD", "DIRECTION", "LOCAL", "REMOTE", "REMOTE TARGET",
                         "PROTOCOL"), rows)


_TABLES: dict[str, Callable[..., str]] = {
    "workloads": workloads_table,
    "services": services_table,
    "policies": policies_table,
    "certificates": certificates_table,
}


def render(section: str, dump: Mapping[str, Any], output: str = "table",
           f: Filters = Filters(), *, connections: Sequence[Mapping[str, Any]] = (),
           now: datetime | None = None) -> str:
    """One section (or ``all``) of ``dump`` in ``output`` (table|json|yaml)."""
    if section not in (*SECTIONS, "all"):
        raise ValueError(f"unknown section {section!r}; choose one of {', '.join(SECTIONS)}, all")
    if output in ("json", "yaml"):
        if section == "all":
            data: Any = dict(dump)
            if connections:
                data["connections"] = list(connections)
        elif section == "connections":
            data = list(connections)
        else:
            data = dump.get(section) or []
        if output == "json":
            return json.dumps(data, indent=2) + "\n"
        return str(yaml.safe_dump(data, sort_keys=False))
    if output != "table":
        raise ValueError(f"unknown output {output!r}; choose table, json or yaml")
    if section == "connections":
        return connections_table(connections, f)
    if section != "all":
        fn = _TABLES[section]
        return fn(dump, f, now=now) if section == "certificates" else fn(dump, f)
    parts = []
    for name in SECTIONS:
        if name == "connections":
            body = connections_table(connections, f)
        elif name == "certificates":
            body = certificates_table(dump, f, now=now)
        else:
            body = _TABLES[name](dump, f)
        parts.append(f"{name.upper()}\n{body}")
    return "\n".join(parts)
