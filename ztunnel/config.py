"""ztunnel settings, read from the environment variables Istio's ztunnel uses.

Only variables that apply to this implementation are read (contract c.8); each is parsed
once at start-up into an immutable :class:`Settings`.  A malformed value is an error that
names the variable and the expected form, never a silent default.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from ambient.bpfmap import PIN_DIR
from ambient.hbone.aio import HANDSHAKE_TIMEOUT
from ambient.hbone.protocol import HboneSettings
from ambient.identity import DEFAULT_TRUST_DOMAIN


class SettingsError(ValueError):
    """An environment variable holds a value ztunnel cannot use."""


DEFAULT_XDS_ROOT_CA = "./var/run/secrets/istio/root-cert.pem"
_HEADER_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


def parse_xds_address(raw: str) -> tuple[str, bool]:
    """``XDS_ADDRESS`` -> (``host:port`` target, plaintext?).  ``http://`` means plaintext;
    ``https://`` or no scheme means TLS.  SettingsError names the accepted forms."""
    scheme, sep, rest = raw.partition("://")
    if not sep:
        scheme, rest = "https", raw
    host, colon, port = rest.rstrip("/").rpartition(":")
    if scheme not in ("http", "https") or not colon or not host or not (
        port.isascii() and port.isdigit() and 0 < int(port) < 65536
    ):
        raise SettingsError(f"XDS_ADDRESS={raw!r}: expected https://host:port, http://host:port "
                            "(plaintext) or host:port, for example https://istiod.istio-system"
                            ".svc:15012")
    return f"{host}:{port}", scheme == "http"


def _prefixed(env: Mapping[str, str], prefix: str) -> dict[str, str]:
    return {k[len(prefix):]: v for k, v in sorted(env.items()) if k.startswith(prefix)}


def _xds_headers(
    env: Mapping[str, str], prefix: str = "XDS_HEADER_"
) -> tuple[tuple[str, str], ...]:
    out = []
    for key, value in _prefixed(env, prefix).items():
        name = key.lower()
        if not name or not set(name) <= _HEADER_CHARS or name.startswith("grpc-"):
            raise SettingsError(f"{prefix}{key}: {name!r} is not a usable gRPC metadata key "
                                "(letters, digits, '-', '_', '.'; not grpc-*)")
        if not value.isascii() or not value.isprintable():
            raise SettingsError(f"{prefix}{key}: the value must be printable ASCII")
        out.append((name, value))
    return tuple(out)


@dataclass(frozen=True)
class Settings:
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    cluster_id: str = "Kubernetes"
    cluster_domain: str = "cluster.local"
    network: str = ""
    node_name: str = ""
    pod_name: str = "ztunnel"
    pod_namespace: str = "istio-system"
    # Configuration sources (exactly one must be set in this release).
    local_xds_path: str | None = None
    local_xds: str | None = None
    local_manifests_path: str | None = None
    # xDS client (XDS_ADDRESS; ztunnel/xds_client.py); mutually exclusive with local sources.
    xds_address: str | None = None
    xds_root_ca: str = DEFAULT_XDS_ROOT_CA  # a file, "SYSTEM", or inline PEM
    alt_xds_hostname: str | None = None
    auth_token: str | None = None  # a token file (re-read at each connect), or the token
    xds_headers: tuple[tuple[str, str], ...] = ()
    instance_ip: str = "1.1.1.1"  # ztunnel's placeholder when INSTANCE_IP is unset
    # Certificates: FAKE_CA / local mode signs with a CA directory on disk.
    fake_ca: bool = False
    ca_dir: str | None = None
    # Mesh CA client (CA_ADDRESS; ambient.certs.GrpcCaProvider), used unless FAKE_CA/CA_DIR.
    # CA_ROOT_CA is a file, SYSTEM or inline PEM; AUTH_TOKEN is shared with the xDS client.
    ca_address: str | None = None
    ca_root_ca: str = DEFAULT_XDS_ROOT_CA
    alt_ca_hostname: str | None = None
    ca_headers: tuple[tuple[str, str], ...] = ()
    secret_ttl_s: float = 24 * 3600
    # In-pod mode.
    # ZDS socket (INPOD_UDS) served by the CNI node agent; pods then arrive over ZDS.  Unset
    # here means "no agent"; Istio's ztunnel defaults it to /var/run/ztunnel/ztunnel.sock.
    inpod_uds: str | None = None
    # (ours) where the eBPF capture backend pins the original-destination map.
    bpf_pin_dir: str = PIN_DIR
    packet_mark: int = 1337
    inpod_port_reuse: bool = True
    enable_orig_src: bool = True
    # (ours) a connection between two pods this ztunnel serves skips HBONE: same checks and
    # results, bytes relayed locally (ztunnel/samenode.py); KERNEL_SPLICE lets the kernel move
    # them (the node agent's eBPF sockmap, pinned in BPF_PIN_DIR): ~27x less ztunnel CPU per
    # byte but ~0.6x the single-stream throughput on 6.18 (perf/README.md), so opt-in.
    same_node_shortcut: bool = True
    kernel_splice: bool = False
    # Ports (own netns).
    admin_addr: tuple[str, int] = ("127.0.0.1", 15000)
    stats_addr: tuple[str, int] = ("0.0.0.0", 15020)
    readiness_addr: tuple[str, int] = ("0.0.0.0", 15021)
    # Transport tuning.
    hbone: HboneSettings = field(default_factory=HboneSettings)
    pool_max_streams: int = 100
    pool_unused_release_s: float = 300.0
    connect_timeout_s: float = 10.0
    # Bounds on slow or silent HBONE peers on 15008 (ambient.hbone.aio): TLS + HTTP/2 preface
    # from the accept; a stream idle either way (0 = never) is reset, an unused connection
    # closed.  1h is Envoy's TCP proxy idle timeout, which sidecar users already live with.
    hbone_handshake_timeout_s: float = HANDSHAKE_TIMEOUT
    hbone_idle_timeout_s: float = 3600.0
    # (ours) every this many seconds freed heap pages go back to the kernel (glibc
    # malloc_trim); 0 = never.  See ztunnel/main.py trim_memory.
    memory_trim_interval_s: float = 10.0
    # Lifecycle and logging.
    termination_deadline_s: float = 5.0
    log_level: str = "info"
    log_format: str = "plain"
    root_namespace: str = "istio-system"


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r}: expected true or false")


def _number(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = _parse_duration(raw)
    except ValueError:
        raise SettingsError(
            f"{name}={raw!r}: expected a number of seconds or a duration like 30s, 5m, 1h"
        ) from None
    if not math.isfinite(value):
        raise SettingsError(f"{name}={raw!r}: must be a finite number of seconds")
    if value < minimum:
        raise SettingsError(f"{name}={raw!r}: must be at least {minimum}")
    return value


def _parse_duration(raw: str) -> float:
    raw = raw.strip()
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for suffix in ("ms", "s", "m", "h"):
        if raw.endswith(suffix) and raw[: -len(suffix)].replace(".", "", 1).isdigit():
            return float(raw[: -len(suffix)]) * units[suffix]
    return float(raw)


def _int(
    env: Mapping[str, str], name: str, default: int, *, minimum: int = 0,
    maximum: int | None = None,
) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw, 0)
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected an integer") from None
    if value < minimum:
        raise SettingsError(f"{name}={raw!r}: must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise SettingsError(f"{name}={raw!r}: must be at most {maximum}")
    return value


def _addr(env: Mapping[str, str], name: str, default: tuple[str, int]) -> tuple[str, int]:
    raw = env.get(name)
    if not raw:
        return default
    host, sep, port = raw.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise SettingsError(f"{name}={raw!r}: expected host:port, for example 127.0.0.1:15000")
    return (host.strip("[]") or default[0], int(port))


def termination_deadline(env: Mapping[str, str]) -> float:
    """CONNECTION_TERMINATION_DEADLINE, else TERMINATION_GRACE_PERIOD_SECONDS minus a margin."""
    if env.get("CONNECTION_TERMINATION_DEADLINE"):
        return _number(env, "CONNECTION_TERMINATION_DEADLINE", 5.0)
    if env.get("TERMINATION_GRACE_PERIOD_SECONDS"):
        grace = _number(env, "TERMINATION_GRACE_PERIOD_SECONDS", 30.0)
        return max(0.0, grace - (1.0 if grace <= 10 else 5.0))
    return 5.0


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from ``env`` (default ``os.environ``)."""
    env = os.environ if env is None else env
    local_xds_path = env.get("LOCAL_XDS_PATH") or None
    local_xds = env.get("LOCAL_XDS") or None
    manifests = env.get("LOCAL_MANIFESTS_PATH") or None
    sources = [n for n, v in (("LOCAL_XDS_PATH", local_xds_path), ("LOCAL_XDS", local_xds),
                              ("LOCAL_MANIFESTS_PATH", manifests)) if v]
    if len(sources) > 1:
        raise SettingsError(f"{' and '.join(sources)} are mutually exclusive: set only one")
    xds_address = env.get("XDS_ADDRESS") or None
    if sources and xds_address:
        raise SettingsError(
            f"XDS_ADDRESS and {sources[0]} are mutually exclusive: configuration comes either "
            "from the control plane or from a local file; set only one"
        )
    if xds_address:
        parse_xds_address(xds_address)
    fake_ca = _bool(env, "FAKE_CA", False)
    ca_dir = env.get("CA_DIR") or None
    ca_address = env.get("CA_ADDRESS") or None
    if ca_address:
        try:
            parse_xds_address(ca_address)
        except SettingsError:
            raise SettingsError(f"CA_ADDRESS={ca_address!r}: expected https://host:port, "
                                "http://host:port (plaintext) or host:port, for example "
                                "https://istiod.istio-system.svc:15012") from None
    if fake_ca and not ca_dir:
        raise SettingsError("FAKE_CA=true needs CA_DIR=<directory with ca-cert.pem, ca-key.pem>")
    inpod_uds = env.get("INPOD_UDS") or None
    level = env.get("RUST_LOG") or env.get("LOG_LEVEL") or "info"
    fmt = (env.get("LOG_FORMAT") or "plain").lower()
    if fmt not in ("plain", "json"):
        raise SettingsError(f"LOG_FORMAT={fmt!r}: expected plain or json")
    return Settings(
        trust_domain=env.get("TRUST_DOMAIN") or DEFAULT_TRUST_DOMAIN,
        cluster_id=env.get("CLUSTER_ID") or env.get("ISTIO_META_CLUSTER_ID") or "Kubernetes",
        cluster_domain=env.get("CLUSTER_DOMAIN") or "cluster.local",
        network=env.get("NETWORK", ""),
        node_name=env.get("NODE_NAME", ""),
        pod_name=env.get("POD_NAME", "ztunnel"),
        pod_namespace=env.get("POD_NAMESPACE", "istio-system"),
        local_xds_path=local_xds_path,
        local_xds=local_xds,
        local_manifests_path=manifests,
        xds_address=xds_address,
        xds_root_ca=env.get("XDS_ROOT_CA") or DEFAULT_XDS_ROOT_CA,
        alt_xds_hostname=env.get("ALT_XDS_HOSTNAME") or None,
        auth_token=env.get("AUTH_TOKEN") or None,
        xds_headers=_xds_headers(env),
        instance_ip=env.get("INSTANCE_IP") or "1.1.1.1",
        fake_ca=fake_ca or bool(ca_dir),
        ca_dir=ca_dir,
        ca_address=ca_address,
        ca_root_ca=env.get("CA_ROOT_CA") or DEFAULT_XDS_ROOT_CA,
        alt_ca_hostname=env.get("ALT_CA_HOSTNAME") or None,
        ca_headers=_xds_headers(env, "CA_HEADER_"),
        secret_ttl_s=_number(env, "SECRET_TTL", 24 * 3600, minimum=1),
        inpod_uds=inpod_uds,
        bpf_pin_dir=env.get("BPF_PIN_DIR") or PIN_DIR,
        packet_mark=_int(env, "PACKET_MARK", 1337, minimum=1),
        inpod_port_reuse=_bool(env, "INPOD_PORT_REUSE", True),
        enable_orig_src=_bool(env, "ENABLE_ORIG_SRC", True),
        same_node_shortcut=_bool(env, "SAME_NODE_SHORTCUT", True),
        kernel_splice=_bool(env, "KERNEL_SPLICE", False),
        admin_addr=_addr(env, "ADMIN_ADDR", ("127.0.0.1", 15000)),
        stats_addr=_addr(env, "STATS_ADDR", ("0.0.0.0", 15020)),
        readiness_addr=_addr(env, "READINESS_ADDR", ("0.0.0.0", 15021)),
        hbone=HboneSettings(
            stream_window=_int(env, "HTTP2_STREAM_WINDOW_SIZE", 4 << 20, minimum=65_535),
            connection_window=_int(env, "HTTP2_CONNECTION_WINDOW_SIZE", 16 << 20, minimum=65_535),
            max_frame_size=_int(  # HTTP/2 allows 2^14 .. 2^24-1
                env, "HTTP2_FRAME_SIZE", 1 << 20, minimum=16_384, maximum=(1 << 24) - 1
            ),
        ),
        pool_max_streams=_int(env, "POOL_MAX_STREAMS_PER_CONNECTION", 100, minimum=1),
        pool_unused_release_s=_number(env, "POOL_UNUSED_RELEASE_TIMEOUT", 300.0),
        hbone_handshake_timeout_s=_number(env, "HBONE_HANDSHAKE_TIMEOUT", HANDSHAKE_TIMEOUT,
                                          minimum=0.001),
        hbone_idle_timeout_s=_number(env, "HBONE_IDLE_TIMEOUT", 3600.0),
        memory_trim_interval_s=_number(env, "MEMORY_TRIM_INTERVAL", 10.0),
        termination_deadline_s=termination_deadline(env),
        log_level=level,
        log_format=fmt,
        root_namespace=env.get("ROOT_NAMESPACE") or "istio-system",
    )
