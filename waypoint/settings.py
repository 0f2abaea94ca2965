"""Waypoint settings, read once from the environment (the names Istio's proxies use).

Who it is: ``WAYPOINT_NAME`` (the Gateway's name), ``POD_NAMESPACE``, ``SERVICE_ACCOUNT``
(default: the waypoint's name, as Istio's waypoint template does), ``TRUST_DOMAIN``,
``CLUSTER_ID``, ``CLUSTER_DOMAIN``, ``NETWORK``.

What it watches: ``LOCAL_MANIFESTS_PATH`` (a file or directory of manifests), else the
Kubernetes API when ``KUBERNETES_SERVICE_HOST`` is set.

Certificates: ``CA_ADDRESS`` (+ ``CA_ROOT_CA``, ``ALT_CA_HOSTNAME``, ``AUTH_TOKEN``), or
``FAKE_CA=true`` with ``CA_DIR`` (sign locally); ``SECRET_TTL``.

Behaviour: ``WAYPOINT_FILTERS`` (comma-separated ``module:Class``), ``LOG_FORMAT``,
``RUST_LOG``, ``TERMINATION_GRACE_PERIOD_SECONDS`` / ``CONNECTION_TERMINATION_DEADLINE``,
``WAYPOINT_IDLE_TIMEOUT``, ``WAYPOINT_HEADER_TIMEOUT``. Ports: HBONE 15008, stats 15020,
readiness 15021, admin 127.0.0.1:15000 (``*_ADDR`` variables override, for tests).

A malformed value raises ``SettingsError`` naming the variable and the expected form.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from ambient.identity import DEFAULT_TRUST_DOMAIN, IdentityError, SpiffeId
from waypoint.filters import parse_filter_list
from ztunnel.config import SettingsError, parse_xds_address, termination_deadline

__all__ = ["Settings", "SettingsError", "from_env"]


@dataclass(frozen=True)
class Settings:
    name: str
    namespace: str
    service_account: str
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    cluster_id: str = "Kubernetes"
    cluster_domain: str = "cluster.local"
    network: str = ""
    manifests_path: str | None = None
    kubernetes: bool = False
    ca_address: str | None = None
    ca_root_ca: str = "./var/run/secrets/istio/root-cert.pem"
    alt_ca_hostname: str | None = None
    auth_token: str | None = None
    fake_ca: bool = False
    ca_dir: str | None = None
    secret_ttl_s: float = 24 * 3600.0
    filters: tuple[str, ...] = ()
    log_format: str = "plain"
    log_level: str = "info"
    hbone_addr: tuple[str, int] = ("0.0.0.0", 15008)
    stats_addr: tuple[str, int] = ("0.0.0.0", 15020)
    readiness_addr: tuple[str, int] = ("0.0.0.0", 15021)
    admin_addr: tuple[str, int] = ("127.0.0.1", 15000)
    termination_deadline_s: float = 5.0
    idle_timeout_s: float = 300.0
    header_timeout_s: float = 10.0

    @property
    def identity(self) -> SpiffeId:
        return SpiffeId(self.trust_domain, self.namespace, self.service_account)


def _addr(env: Mapping[str, str], name: str, default: tuple[str, int]) -> tuple[str, int]:
    raw = env.get(name)
    if not raw:
        return default
    host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise SettingsError(f"{name}={raw!r}: expected host:port, e.g. 0.0.0.0:15020")
    return host.strip("[]") or default[0], int(port)


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if not raw:
        return default
    text = raw.strip()
    scale = 1.0
    for suffix, mult in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(suffix):
            text, scale = text[: -len(suffix)], mult
            break
    try:
        value = float(text) * scale
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected seconds, or a duration like 30s") from None
    if not value > 0:
        raise SettingsError(f"{name}={raw!r}: must be positive")
    return value


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    name = env.get("WAYPOINT_NAME", "").strip()
    if not name:
        raise SettingsError("WAYPOINT_NAME is not set: it must name this waypoint's Gateway "
                            "(metadata.name of the gatewayClassName: istio-waypoint Gateway)")
    namespace = env.get("POD_NAMESPACE", "").strip() or "default"
    sa = env.get("SERVICE_ACCOUNT", "").strip() or name
    td = env.get("TRUST_DOMAIN", "").strip() or DEFAULT_TRUST_DOMAIN
    try:
        SpiffeId(td, namespace, sa)
    except IdentityError as e:
        raise SettingsError(f"cannot form the waypoint's identity: {e}") from e
    ca_address = env.get("CA_ADDRESS") or None
    if ca_address:
        parse_xds_address(ca_address)  # validates; raises SettingsError
    fake_ca = env.get("FAKE_CA", "").strip().lower() in ("1", "true", "yes")
    ca_dir = env.get("CA_DIR") or None
    if fake_ca and not ca_dir:
        raise SettingsError("FAKE_CA=true needs CA_DIR (a directory with the mesh CA's "
                            "root-cert.pem and ca-key.pem)")
    log_format = env.get("LOG_FORMAT", "plain").strip() or "plain"
    if log_format not in ("plain", "json"):
        raise SettingsError(f"LOG_FORMAT={log_format!r}: expected plain or json")
    filters = tuple(parse_filter_list(env.get("WAYPOINT_FILTERS", "")))
    return Settings(
        name=name, namespace=namespace, service_account=sa, trust_domain=td,
        cluster_id=env.get("CLUSTER_ID") or env.get("ISTIO_META_CLUSTER_ID") or "Kubernetes",
        cluster_domain=env.get("CLUSTER_DOMAIN") or "cluster.local",
        network=env.get("NETWORK", ""),
        manifests_path=env.get("LOCAL_MANIFESTS_PATH") or None,
        kubernetes=bool(env.get("KUBERNETES_SERVICE_HOST")),
        ca_address=ca_address,
        ca_root_ca=env.get("CA_ROOT_CA") or "./var/run/secrets/istio/root-cert.pem",
        alt_ca_hostname=env.get("ALT_CA_HOSTNAME") or None,
        auth_token=env.get("AUTH_TOKEN") or None,
        fake_ca=fake_ca, ca_dir=ca_dir if fake_ca or not ca_address else None,
        secret_ttl_s=_seconds(env, "SECRET_TTL", 24 * 3600.0),
        filters=filters, log_format=log_format, log_level=env.get("RUST_LOG", "info"),
        hbone_addr=_addr(env, "WAYPOINT_HBONE_ADDR", ("0.0.0.0", 15008)),
        stats_addr=_addr(env, "STATS_ADDR", ("0.0.0.0", 15020)),
        readiness_addr=_addr(env, "READINESS_ADDR", ("0.0.0.0", 15021)),
        admin_addr=_addr(env, "ADMIN_ADDR", ("127.0.0.1", 15000)),
        termination_deadline_s=termination_deadline(env),
        idle_timeout_s=_seconds(env, "WAYPOINT_IDLE_TIMEOUT", 300.0),
        header_timeout_s=_seconds(env, "WAYPOINT_HEADER_TIMEOUT", 10.0),
    )
