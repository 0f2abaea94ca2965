"""ztunnel's delta xDS client: control-plane configuration into the MeshStore.

Behaviour (istio/ztunnel's ``xds::client``, contract G and c.8):

- One ADS stream to ``XDS_ADDRESS`` (``https://host:port`` or ``host:port``: TLS verified
  against ``XDS_ROOT_CA`` -- a file, ``SYSTEM``, or inline PEM -- with ``ALT_XDS_HOSTNAME``
  replacing the host for the name check; ``http://host:port``: plaintext).  gRPC metadata:
  ``authorization: Bearer <token>`` when ``AUTH_TOKEN`` is set (a file, re-read at every
  connect so a rotated projected token is picked up, else the token itself), ``clusterid``,
  and every ``XDS_HEADER_*``.
- The node id is
  ``ztunnel~<INSTANCE_IP>~<POD_NAME>.<POD_NAMESPACE>~<POD_NAMESPACE>.svc.cluster.local`` with
  metadata ``NAME``, ``NAMESPACE``, ``INSTANCE_IPS``, ``NODE_NAME``, ``ISTIO_META_*`` and
  the parsed JSON of ``ISTIO_METAJSON_*``.
- Both type URLs are subscribed with the legacy wildcard (an empty first subscription, as
  ztunnel sends).  On every (re)connect the first request of a type carries
  ``initial_resource_versions``: the versions it holds, so the server resends only changes.
- Each response is applied to the store as one batch.  A resource that does not decode or
  convert (``ambient.model.from_proto``) is rejected on its own: the others in the response
  still apply (ztunnel's rule), the rejected one keeps its last good version, and the whole
  response is NACKed with ``error_detail.message = "name: reason; name: reason"``.  A
  rejected name is not recorded as held, so a reconnect makes the server send it again.
- On disconnect the store keeps the last good state; reconnects back off from 10 ms to 15 s,
  doubling, jittered, and reset after a stream that delivered a response.
- Readiness ("state manager") is done once every type has had an ACKed response (ztunnel
  marks a type only on ACK, so a response with a rejected resource keeps the proxy unready
  until a later clean response of that type).
- The stream is spoken with ``ambient.grpclite`` (HTTP/2 + TLS 1.2/1.3, ALPN h2, keepalive
  pings every 30 s, a 200 MiB message limit), not grpcio, whose C core would cost the node
  proxy ~10 MB of memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format, struct_pb2
from google.protobuf.message import DecodeError

from ambient.api.envoy.config.core.v3 import base_pb2
from ambient.api.envoy.service.discovery.v3 import discovery_pb2
from ambient.api.google.rpc import status_pb2
from ambient.api.istio.security import authorization_pb2
from ambient.api.istio.workload import workload_pb2
from ambient.certs import load_roots, read_token, token_is_path
from ambient.grpclite import Channel, GrpcError, StatusCode, client_tls_context
from ambient.model import ModelError, Policy, Service, Workload, from_proto
from ambient.store import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, MeshStore
from ztunnel.config import Settings, parse_xds_address

__all__ = [
    "INITIAL_BACKOFF",
    "MAX_BACKOFF",
    "TYPE_URLS",
    "Rejected",
    "XdsClient",
    "XdsClientState",
    "XdsConfig",
    "build_node",
]

log = logging.getLogger("ztunnel.xds")

INITIAL_BACKOFF = 0.010
MAX_BACKOFF = 15.0
TYPE_URLS = (ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL)
_DECODERS: dict[str, Any] = {
    ADDRESS_TYPE_URL: workload_pb2.Address,
    AUTHORIZATION_TYPE_URL: authorization_pb2.Authorization,
}
_MAX_MESSAGE = 200 * 1024 * 1024  # ztunnel's decoding limit
ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"

Request = discovery_pb2.DeltaDiscoveryRequest
Response = discovery_pb2.DeltaDiscoveryResponse


@dataclass(frozen=True)
class Rejected:
    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


def build_node(settings: Settings, env: Mapping[str, str] | None = None) -> base_pb2.Node:
    """The ``Node`` ztunnel sends: Istio's id format plus the proxy metadata."""
    env = os.environ if env is None else env
    ip, pod, ns = settings.instance_ip, settings.pod_name, settings.pod_namespace
    meta: dict[str, Any] = {
        "NAME": pod, "NAMESPACE": ns, "INSTANCE_IPS": ip, "NODE_NAME": settings.node_name,
    }
    for key, value in sorted(env.items()):
        if key.startswith("ISTIO_META_") and len(key) > len("ISTIO_META_"):
            meta[key[len("ISTIO_META_"):]] = value
    for key, value in sorted(env.items()):
        if key.startswith("ISTIO_METAJSON_") and len(key) > len("ISTIO_METAJSON_"):
            try:
                meta[key[len("ISTIO_METAJSON_"):]] = json.loads(value)
            except ValueError as e:
                log.error("ignoring %s: not valid JSON (%s)", key, e)
    metadata = struct_pb2.Struct()
    json_format.ParseDict(meta, metadata)
    return base_pb2.Node(id=f"ztunnel~{ip}~{pod}.{ns}~{ns}.svc.cluster.local", metadata=metadata)


@dataclass(frozen=True)
class XdsConfig:
    """Where and how to connect; built once from the settings."""

    target: str  # host:port
    plaintext: bool
    node: base_pb2.Node
    root_ca: str = "SYSTEM"
    alt_hostname: str | None = None
    auth_token: str | None = None
    cluster_id: str = "Kubernetes"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_settings(cls, s: Settings, env: Mapping[str, str] | None = None) -> XdsConfig:
        if not s.xds_address:
            raise ValueError("XDS_ADDRESS is not set")
        target, plaintext = parse_xds_address(s.xds_address)
        return cls(target, plaintext, build_node(s, env), s.xds_root_ca, s.alt_xds_hostname,
                   s.auth_token, s.cluster_id, s.xds_headers)

    def metadata(self) -> list[tuple[str, str]]:
        """gRPC metadata for a new stream (reads the token file now)."""
        md = [("clusterid", self.cluster_id)]
        if self.auth_token:
            token = (read_token(self.auth_token) if token_is_path(self.auth_token)
                     else self.auth_token)
            md.append(("authorization", f"Bearer {token}"))
        md.extend(self.headers)
        return md

    def root_certificates(self) -> bytes | None:
        """PEM roots for TLS (None: the system store)."""
        return load_roots(self.root_ca, "XDS_ROOT_CA")

    def channel(self) -> Channel:
        """A channel for one stream attempt (the roots are re-read for every attempt).

        Keepalive pings every 30 s while the stream is open (ztunnel's and the former grpcio
        channel's setting); a dead control plane is noticed within 50 s."""
        tls = None if self.plaintext else client_tls_context(self.root_certificates())
        return Channel(self.target, tls=tls, server_hostname=self.alt_hostname,
                       max_receive=_MAX_MESSAGE, keepalive=30.0, idle_timeout=None)


@dataclass
class XdsClientState:
    """The sans-I/O half: builds requests, applies responses to the store, decides ACK/NACK."""

    store: MeshStore
    node: base_pb2.Node
    types: tuple[str, ...] = TYPE_URLS
    on_synced: Callable[[], None] | None = None
    # type URL -> name -> version we hold (echoed in initial_resource_versions).
    known: dict[str, dict[str, str]] = field(default_factory=dict)
    # type URL -> xDS name -> store key (they match for istiod; kept so removals never miss).
    keys: dict[str, dict[str, str]] = field(default_factory=dict)
    acked_types: set[str] = field(default_factory=set)
    synced: bool = False
    responses: int = 0
    nacks: int = 0

    def initial_requests(self) -> list[Request]:
        out = []
        for type_url in self.types:
            req = Request(type_url=type_url, node=self.node)
            for name, version in sorted(self.known.get(type_url, {}).items()):
                req.initial_resource_versions[name] = version
            out.append(req)
        return out

    def handle_response(self, resp: Response) -> tuple[Request, list[Rejected]]:
        """Apply one response; return the ACK/NACK to send and what was rejected."""
        self.responses += 1
        type_url = resp.type_url
        decoder = _DECODERS.get(type_url)
        rejects: list[Rejected] = []
        if decoder is None or type_url not in self.types:
            log.error("control plane sent type %r, which this proxy did not ask for", type_url)
            return Request(type_url=type_url, response_nonce=resp.nonce), []
        keys = self.keys.setdefault(type_url, {})
        known = self.known.setdefault(type_url, {})
        upserts: list[tuple[str, str, Workload | Service | Policy]] = []
        for r in resp.resources:
            try:
                obj = _decode(decoder, type_url, r)
            except (DecodeError, ModelError, ValueError, TypeError) as e:
                rejects.append(Rejected(r.name, str(e) or type(e).__name__))
                continue
            upserts.append((r.name, r.version, obj))
        removals = [(type_url, keys.get(n, n)) for n in resp.removed_resources]
        by_key = {obj.key: name for name, _, obj in upserts}
        store_rejects = self.store.apply([obj for _, _, obj in upserts], removals)
        rejected_names = {r.name for r in rejects}
        for sr in store_rejects:
            name = by_key.get(sr.key, sr.key)
            rejected_names.add(name)
            rejects.append(Rejected(name, sr.message))
        for name in resp.removed_resources:
            known.pop(name, None)
            keys.pop(name, None)
        for name, version, obj in upserts:
            if name not in rejected_names:
                known[name] = version
                keys[name] = obj.key
        ack = Request(type_url=type_url, response_nonce=resp.nonce)
        if rejects:
            self.nacks += 1
            message = "; ".join(str(r) for r in rejects)
            ack.error_detail.CopyFrom(status_pb2.Status(message=message))
            log.error("rejected %d of %d %s resources from the control plane (the last good "
                      "version of each stays in force; sending NACK %s): %s", len(rejects),
                      len(resp.resources), type_url, resp.nonce, message)
        else:
            self._acked(type_url)
        return ack, rejects

    def _acked(self, type_url: str) -> None:
        self.acked_types.add(type_url)
        if not self.synced and self.acked_types >= set(self.types):
            self.synced = True
            log.info("initial xDS configuration received for %s", ", ".join(self.types))
            if self.on_synced is not None:
                self.on_synced()


def _decode(decoder: Any, type_url: str, r: Any) -> Workload | Service | Policy:
    if r.resource.type_url != type_url:
        raise ValueError(f"resource of type {r.resource.type_url!r} in a {type_url} response")
    return from_proto(decoder.FromString(r.resource.value))


def _jitter(delay: float, rng: Callable[[], float]) -> float:
    return delay * (0.5 + rng() / 2)


class XdsClient:
    """The asyncio edge: keeps one ADS stream up and feeds :class:`XdsClientState`."""

    def __init__(
        self,
        config: XdsConfig,
        store: MeshStore,
        *,
        on_synced: Callable[[], None] | None = None,
        types: Iterable[str] = TYPE_URLS,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.state = XdsClientState(store, config.node, tuple(types), on_synced)
        self.rng = rng
        self.connected = False
        self.streams = 0  # streams that delivered at least one response
        self.last_error: str | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, store: MeshStore, *, on_synced: Callable[[], None] | None = None
    ) -> XdsClient:
        return cls(XdsConfig.from_settings(settings), store, on_synced=on_synced)

    async def run(self) -> None:
        """Connect, stream, and reconnect forever (cancel the task to stop)."""
        backoff = INITIAL_BACKOFF
        while True:
            delivered = False
            try:
                delivered = await self._stream_once()
                self.last_error = "stream ended by the control plane"
                log.warning("xDS stream to %s ended; reconnecting", self.config.target)
            except GrpcError as e:
                delivered = self.connected
                self.last_error = f"{e.code.name}: {e.details}"
                log.warning("xDS stream to %s failed: %s%s", self.config.target,
                            self.last_error, _hint(e))
            except OSError as e:
                self.last_error = str(e)
                log.error("cannot connect to the control plane at %s: %s",
                          self.config.target, e)
            except Exception as e:  # never let one bad response or bug end config delivery
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("xDS stream to %s failed unexpectedly", self.config.target)
            finally:
                self.connected = False
            backoff = INITIAL_BACKOFF if delivered else min(MAX_BACKOFF, backoff * 2)
            await asyncio.sleep(_jitter(backoff, self.rng))

    async def _stream_once(self) -> bool:
        metadata = self.config.metadata()
        async with self.config.channel() as channel:
            call = await channel.stream(ADS_METHOD, metadata=metadata)
            async with call:  # leaving (error, cancellation) resets the stream
                for req in self.state.initial_requests():
                    await call.write(req.SerializeToString())
                delivered = False
                while True:
                    raw = await call.read()
                    if raw is None:
                        return delivered
                    try:
                        resp = Response.FromString(raw)
                    except DecodeError as e:
                        raise GrpcError(StatusCode.INTERNAL, "a response from the control plane "
                                        f"is not a DeltaDiscoveryResponse: {e}") from e
                    if not delivered:
                        delivered = self.connected = True
                        self.streams += 1
                        self.last_error = None
                        log.info("xDS stream to %s established", self.config.target)
                    ack, _ = self.state.handle_response(resp)
                    await call.write(ack.SerializeToString())


def _hint(e: GrpcError) -> str:
    code = e.code
    if code is StatusCode.UNAVAILABLE:
        return (" (is the control plane running and XDS_ADDRESS right? for TLS, does its "
                "certificate match ALT_XDS_HOSTNAME or the host, and chain to XDS_ROOT_CA?)")
    if code is StatusCode.UNAUTHENTICATED:
        return " (check AUTH_TOKEN, or the client certificate the control plane expects)"
    if code is StatusCode.INVALID_ARGUMENT:
        return " (check POD_NAME, POD_NAMESPACE and INSTANCE_IP, which form the node id)"
    return ""
