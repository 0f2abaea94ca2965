"""The delta ADS server: a sans-I/O state machine per stream, and its thin grpc.aio edge.

Protocol (Envoy's incremental xDS, as istiod serves it to ztunnel; contract G and c.2):

- One bidirectional stream ``DeltaAggregatedResources`` carries every type URL we serve:
  ``istio.workload.Address`` and ``istio.security.Authorization``.  Any other type URL is
  logged and ignored (istiod does the same: no generator, no response).
- The first request on a stream must carry ``node``; its id must have Istio's shape
  ``<type>~<ip>~<pod>.<namespace>~<namespace>.svc.<domain>``, else the stream ends with
  INVALID_ARGUMENT.
- The first request of a type subscribes.  ``"*"`` is the wildcard; an empty subscribe list
  on the first request is the legacy wildcard (what ztunnel sends).  ``"*"`` in the
  unsubscribe list leaves wildcard mode (ztunnel's on-demand "subscribe to nothing").
- ``initial_resource_versions`` (first request of a type only) tells what the client already
  has; the first response then holds only resources whose version differs, plus
  ``removed_resources`` for names it has that no longer exist.  The first request of a type
  always gets a response, even an empty one: the client counts it as "synced".
- An explicitly subscribed name that does not exist is reported in ``removed_resources``
  (istiod's way, which ztunnel's on-demand lookups wait on; Envoy's spec alternative, a
  ``Resource`` with a name and no body, would fail to decode in ztunnel and be NACKed).
- A request naming a ``response_nonce`` we sent is an ACK, or a NACK when ``error_detail`` is
  set.  A NACK is logged with the node, the type URL, the rejected names (parsed from the
  client's ``"name: reason; ..."`` message when it gives them) and the reason; the rejected
  version is *not* re-sent: the next push of those names happens when their content changes
  (or the client reconnects without claiming them, as ztunnel does).
- The versions a response carries count as the client's from the moment it is sent (the
  stream is ordered, and a NACK must not cause a resend loop); ACKs only advance the nonce.
- On a cache change, only the changed names the client subscribes to are examined, and only
  those whose version differs from what the client has are sent.

Authentication happens once per stream, before anything is read: plaintext connections are
anonymous (istiod's 15010), TLS connections go through the configured :data:`Authenticator`
(client certificate identity, or a bearer-token check supplied by the Kubernetes/CA parts).
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import itertools
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from ambient.api import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL
from ambient.api.envoy.config.core.v3 import base_pb2
from ambient.api.envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from ambient.identity import IdentityError, SpiffeId
from controlplane.cache import Entry, SnapshotCache

__all__ = [
    "ADDRESS_TYPE_URL",
    "AUTHORIZATION_TYPE_URL",
    "SUPPORTED_TYPES",
    "WILDCARD",
    "AdsServicer",
    "AuthenticationError",
    "Authenticator",
    "Caller",
    "DeltaStream",
    "NodeId",
    "XdsError",
    "allow_all",
    "client_certificate",
    "compute_delta",
    "first_success",
    "from_object_authenticator",
    "parse_rejected_names",
    "peer_identity",
]

log = logging.getLogger("controlplane.xds")

WILDCARD = "*"
SUPPORTED_TYPES = frozenset({ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL})
PROXY_TYPES = frozenset({"ztunnel", "sidecar", "router"})
_MAX_IN_FLIGHT = 64  # nonces remembered per type; a client that never ACKs cannot grow us
# Explicit subscriptions held per type and stream. ztunnel subscribes by wildcard (or on demand,
# a few names); without a bound, a client could grow the control plane request by request.
MAX_SUBSCRIBED_NAMES = 100_000
_NODE_SHAPE = "ztunnel~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local"

Response = discovery_pb2.DeltaDiscoveryResponse
Request = discovery_pb2.DeltaDiscoveryRequest


class XdsError(Exception):
    """The stream must end with ``code``; ``message`` tells the operator what to fix."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# -- node identity --------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeId:
    """A parsed Istio node id: ``<type>~<ip>~<pod>.<namespace>~<domain>``."""

    proxy_type: str
    ip: str
    pod_name: str
    namespace: str
    domain: str

    @classmethod
    def parse(cls, raw: str) -> NodeId:
        """Parse ``raw``; ValueError says what is wrong and which settings produce it."""
        hint = (f"expected {_NODE_SHAPE!r}; check POD_NAME, POD_NAMESPACE and INSTANCE_IP "
                "on the proxy")
        parts = raw.split("~")
        if len(parts) != 4:
            raise ValueError(f"malformed node id {raw!r}: {len(parts)} '~'-separated parts, "
                             f"{hint}")
        ptype, ip, ident, domain = parts
        if ptype not in PROXY_TYPES:
            raise ValueError(f"malformed node id {raw!r}: unknown proxy type {ptype!r} "
                             f"(one of {', '.join(sorted(PROXY_TYPES))}); {hint}")
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise ValueError(f"malformed node id {raw!r}: {ip!r} is not an IP address; "
                             f"{hint}") from None
        pod, dot, ns = ident.rpartition(".")
        if not dot or not pod or not ns:
            raise ValueError(f"malformed node id {raw!r}: {ident!r} is not <pod>.<namespace>; "
                             f"{hint}")
        if not domain:
            raise ValueError(f"malformed node id {raw!r}: empty DNS domain; {hint}")
        return cls(ptype, ip, pod, ns, domain)

    def __str__(self) -> str:
        return f"{self.proxy_type}~{self.ip}~{self.pod_name}.{self.namespace}~{self.domain}"


# -- authentication -------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """Who opened a stream. ``identity`` is a SPIFFE URI, or empty when anonymous."""

    identity: str = ""
    method: str = "anonymous"  # "anonymous" | "x509" | "token"
    cluster_id: str = ""

    @property
    def anonymous(self) -> bool:
        return not self.identity


class AuthenticationError(Exception):
    """The caller could not be authenticated; the message says why (sent as UNAUTHENTICATED)."""


Authenticator = Callable[[Mapping[str, str], SpiffeId | None], Caller | Awaitable[Caller]]
"""``authenticate(metadata, peer_identity) -> Caller`` (or awaitable); raises
:class:`AuthenticationError`.  ``metadata`` has lower-case keys; ``peer_identity`` is the
SPIFFE ID of a verified client certificate, or None."""


def allow_all(metadata: Mapping[str, str], peer: SpiffeId | None) -> Caller:
    """Local mode: everybody is welcome (their certificate identity is kept if they had one)."""
    return Caller(peer.uri, "x509") if peer is not None else Caller()


def client_certificate(metadata: Mapping[str, str], peer: SpiffeId | None) -> Caller:
    """mTLS: the caller is the SPIFFE ID of its verified client certificate."""
    if peer is None:
        raise AuthenticationError(
            "no client certificate with a SPIFFE ID was presented; connect with a mesh "
            "certificate, or send 'authorization: Bearer <token>' to a server that accepts tokens"
        )
    return Caller(peer.uri, "x509", metadata.get("clusterid", ""))


def first_success(*authenticators: Authenticator) -> Callable[..., Awaitable[Caller]]:
    """Try each authenticator in order (istiod's chain); fail with every reason if none works."""

    async def authenticate(metadata: Mapping[str, str], peer: SpiffeId | None) -> Caller:
        reasons = []
        for auth in authenticators:
            try:
                result = auth(metadata, peer)
                return await result if inspect.isawaitable(result) else result
            except AuthenticationError as e:
                reasons.append(str(e))
        raise AuthenticationError("; ".join(reasons) or "no authenticator configured")

    return authenticate


class CallerSource(Protocol):
    """An object authenticator (``controlplane.ca_service``'s TokenReview / local token ones)."""

    def authenticate(self, metadata: Mapping[str, str], peer: SpiffeId | None) -> Awaitable[Any]:
        ...


def from_object_authenticator(auth: CallerSource, trust_domain: str) -> Authenticator:
    """Adapt an authenticator object whose caller has ``namespace``/``service_account``.

    Any refusal it raises becomes an :class:`AuthenticationError` with its message.
    """

    async def authenticate(metadata: Mapping[str, str], peer: SpiffeId | None) -> Caller:
        try:
            who = await auth.authenticate(metadata, peer)
        except Exception as e:  # the object's own refusal types; the message is for operators
            raise AuthenticationError(str(e) or type(e).__name__) from e
        identity = SpiffeId(trust_domain, who.namespace, who.service_account)
        return Caller(identity.uri, "token", metadata.get("clusterid", ""))

    return authenticate


def peer_identity(auth_context: Mapping[str, Iterable[bytes]]) -> SpiffeId | None:
    """The SPIFFE ID of a verified client certificate, from a gRPC auth context."""
    for key in ("peer_spiffe_id", "x509_subject_alternative_name"):
        for raw in auth_context.get(key, ()):
            value = raw.decode("utf-8", "replace")
            if value.startswith("spiffe://"):
                try:
                    return SpiffeId.parse(value)
                except IdentityError:
                    continue
    return None


# -- the pure delta ---------------------------------------------------------------------------


def compute_delta(
    resources: Mapping[str, Entry],
    known: Mapping[str, str],
    names: Iterable[str],
    subscribed: Callable[[str], bool],
    *,
    report_missing: bool = False,
) -> tuple[list[str], list[str]]:
    """Which of ``names`` to send and which to report removed, sorted.

    A subscribed name is sent when the cache has it at a version other than ``known``'s; it
    is reported removed when the cache lacks it but the client has it (or, with
    ``report_missing``, when the client asked for it explicitly: "does not exist").
    """
    send, removed = [], []
    for name in sorted(set(names)):
        if name == WILDCARD or not subscribed(name):
            continue
        entry = resources.get(name)
        if entry is not None:
            if known.get(name) != entry.version:
                send.append(name)
        elif name in known or report_missing:
            removed.append(name)
    return send, removed


def parse_rejected_names(message: str, candidates: Iterable[str]) -> list[str]:
    """Names a NACK message blames, from ztunnel's ``"name: reason; name: reason"`` form."""
    cands = set(candidates)
    out = []
    for part in message.split("; "):
        name, sep, _ = part.partition(": ")
        if sep and name in cands and name not in out:
            out.append(name)
    return out


@dataclass
class _TypeState:
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    known: dict[str, str] = field(default_factory=dict)  # name -> version the client has
    in_flight: dict[str, tuple[str, ...]] = field(default_factory=dict)  # nonce -> names
    acked_nonce: str = ""
    acks: int = 0
    nacks: int = 0

    def subscribed(self, name: str) -> bool:
        return self.wildcard or name in self.names


class DeltaStream:
    """One client's delta xDS stream: requests and cache changes in, responses out.

    Pure apart from reading ``cache`` and logging; the caller does the I/O.  ``nonce`` makes
    nonces (default: a random stream prefix and a counter).
    """

    def __init__(
        self,
        cache: SnapshotCache,
        *,
        caller: Caller | None = None,
        control_plane_id: str = "ambient",
        types: frozenset[str] = SUPPORTED_TYPES,
        nonce: Callable[[], str] | None = None,
    ) -> None:
        self.cache = cache
        self.caller = caller or Caller()
        self.control_plane_id = control_plane_id
        self.supported = types
        self.node: NodeId | None = None
        self.node_proto: base_pb2.Node | None = None
        self.types: dict[str, _TypeState] = {}
        self.responses_sent = 0
        self.resources_sent = 0
        if nonce is None:
            prefix = secrets.token_hex(4)
            counter = itertools.count(1)
            nonce = lambda: f"{prefix}-{next(counter)}"  # noqa: E731
        self._nonce = nonce
        self._ignored: set[str] = set()

    @property
    def node_label(self) -> str:
        return str(self.node) if self.node is not None else "(no node yet)"

    # -- inputs ----------------------------------------------------------------------------
    def handle_request(self, req: Request) -> list[Response]:
        """One request from the client; returns the responses to send (maybe none)."""
        if self.node is None:
            if not req.HasField("node") or not req.node.id:
                raise XdsError(grpc.StatusCode.INVALID_ARGUMENT,
                               "the first DeltaDiscoveryRequest on a stream must carry node.id "
                               f"({_NODE_SHAPE!r})")
            try:
                self.node = NodeId.parse(req.node.id)
            except ValueError as e:
                raise XdsError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
            self.node_proto = req.node
            log.info("xDS stream from %s (%s)", self.node,
                     self.caller.identity or self.caller.method)
        type_url = req.type_url
        if type_url not in self.supported:
            if type_url not in self._ignored:
                self._ignored.add(type_url)
                log.warning("%s asked for type %r, which this control plane does not serve "
                            "(served: %s); ignoring it", self.node_label, type_url,
                            ", ".join(sorted(self.supported)))
            return []
        st = self.types.get(type_url)
        first = st is None
        if st is None:
            st = self.types[type_url] = _TypeState(known=dict(req.initial_resource_versions))
        if req.response_nonce:
            self._ack_or_nack(type_url, st, req)
        subs = list(req.resource_names_subscribe)
        unsubs = list(req.resource_names_unsubscribe)
        if first and not subs and not unsubs:
            subs = [WILDCARD]  # the legacy wildcard: an empty first subscription
        was_wildcard = st.wildcard
        new_names: set[str] = set()
        for name in subs:
            if name == WILDCARD:
                st.wildcard = True
            elif name not in st.names:
                st.names.add(name)
                new_names.add(name)
        for name in unsubs:
            if name == WILDCARD:
                st.wildcard = False
            else:
                st.names.discard(name)
                new_names.discard(name)
        if len(st.names) > MAX_SUBSCRIBED_NAMES:
            raise XdsError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"{self.node_label} subscribes to {len(st.names)} {type_url} names, "
                           f"more than the {MAX_SUBSCRIBED_NAMES} this control plane holds per "
                           "stream; subscribe with the wildcard instead")
        if was_wildcard and not st.wildcard:
            # The client drops what it no longer subscribes to; forget it too.
            st.known = {n: v for n, v in st.known.items() if n in st.names}
        for name in unsubs:
            if name != WILDCARD:
                st.known.pop(name, None)
        resources = self.cache.resources(type_url)
        if first or (st.wildcard and not was_wildcard):
            scope = (set(resources) | set(st.known) | new_names) if st.wildcard else set(st.names)
            send, removed = compute_delta(resources, st.known, scope, st.subscribed,
                                          report_missing=not st.wildcard)
            if st.wildcard:  # explicitly named, non-existent names: say so
                removed = sorted(set(removed) | {n for n in new_names if n not in resources})
            if first or send or removed:
                return [self._respond(type_url, st, send, removed)]
            return []
        if new_names:
            send, removed = compute_delta(resources, st.known, new_names, st.subscribed,
                                          report_missing=True)
            if send or removed:
                return [self._respond(type_url, st, send, removed)]
        return []

    def on_change(self, type_url: str, names: Iterable[str]) -> list[Response]:
        """The cache changed ``names`` of ``type_url``; returns the push, if any."""
        st = self.types.get(type_url)
        if st is None:
            return []
        send, removed = compute_delta(self.cache.resources(type_url), st.known, names,
                                      st.subscribed)
        if not send and not removed:
            return []
        return [self._respond(type_url, st, send, removed)]

    # -- internals ---------------------------------------------------------------------------
    def _ack_or_nack(self, type_url: str, st: _TypeState, req: Request) -> None:
        nonce = req.response_nonce
        names = st.in_flight.pop(nonce, None)
        if names is None:
            log.debug("%s: %s response nonce %r is not one we are waiting for (stale); "
                      "ignoring its ACK/NACK", self.node_label, type_url, nonce)
            return
        if req.HasField("error_detail"):
            st.nacks += 1
            reason = req.error_detail.message or f"code {req.error_detail.code}"
            rejected = parse_rejected_names(reason, names)
            log.warning(
                "xDS NACK from %s for %s (nonce %s): rejected %s: %s. The proxy keeps its last "
                "good version; fix the source object and the next change is pushed.",
                self.node_label, type_url, nonce,
                ", ".join(rejected) if rejected else "(names not given)", reason,
            )
        else:
            st.acks += 1
            st.acked_nonce = nonce

    def _respond(
        self, type_url: str, st: _TypeState, send: list[str], removed: list[str]
    ) -> Response:
        nonce = self._nonce()
        resources = self.cache.resources(type_url)
        resp = Response(
            type_url=type_url,
            nonce=nonce,
            system_version_info=str(self.cache.system_version),
            control_plane=base_pb2.ControlPlane(identifier=self.control_plane_id),
        )
        for name in send:
            entry = resources[name]
            r = resp.resources.add(name=name, version=entry.version)
            r.resource.type_url = type_url
            r.resource.value = entry.data
            st.known[name] = entry.version
        for name in removed:
            st.known.pop(name, None)
        resp.removed_resources.extend(removed)
        st.in_flight[nonce] = tuple(send) + tuple(removed)
        while len(st.in_flight) > _MAX_IN_FLIGHT:
            st.in_flight.pop(next(iter(st.in_flight)))
        self.responses_sent += 1
        self.resources_sent += len(send)
        return resp


# -- the grpc.aio edge ---------------------------------------------------------------------------


_EOF = object()


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """``AggregatedDiscoveryService.DeltaAggregatedResources`` over a :class:`SnapshotCache`.

    ``authenticator`` checks TLS connections; plaintext ones are anonymous when
    ``allow_plaintext`` (istiod's 15010), refused otherwise.  ``streams`` holds the live
    streams' state machines (read-only, for admin and tests).
    """

    def __init__(
        self,
        cache: SnapshotCache,
        authenticator: Authenticator = client_certificate,
        *,
        allow_plaintext: bool = True,
        control_plane_id: str = "ambient",
    ) -> None:
        self.cache = cache
        self.authenticator = authenticator
        self.allow_plaintext = allow_plaintext
        self.control_plane_id = control_plane_id
        self.streams: dict[int, DeltaStream] = {}
        self.streams_total = 0
        self._ids = itertools.count(1)

    async def authenticate(self, context: Any) -> Caller:
        auth_ctx = context.auth_context() or {}
        secure = b"ssl" in auth_ctx.get("transport_security_type", ())
        metadata = {str(k).lower(): str(v) for k, v in (context.invocation_metadata() or ())}
        if not secure:
            if self.allow_plaintext:
                return Caller(cluster_id=metadata.get("clusterid", ""))
            raise AuthenticationError("plaintext xDS is disabled on this server; connect "
                                      "with TLS (port 15012)")
        result = self.authenticator(metadata, peer_identity(auth_ctx))
        return await result if inspect.isawaitable(result) else result

    async def DeltaAggregatedResources(  # noqa: N802 (the gRPC method name)
        self, request_iterator: AsyncIterator[Request], context: Any
    ) -> AsyncIterator[Response]:
        try:
            caller = await self.authenticate(context)
        except AuthenticationError as e:
            log.warning("xDS stream from %s refused: %s", context.peer(), e)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
            return
        stream = DeltaStream(self.cache, caller=caller, control_plane_id=self.control_plane_id)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        sid = next(self._ids)

        def changed(type_url: str, names: frozenset[str]) -> None:
            queue.put_nowait((type_url, names))

        async def read() -> None:
            try:
                async for req in request_iterator:
                    queue.put_nowait(req)
            except Exception as e:  # the client went away mid-read
                log.debug("xDS stream %d: read ended: %s", sid, e)
            finally:
                queue.put_nowait(_EOF)

        unwatch = self.cache.watch(changed)
        reader = asyncio.create_task(read())
        self.streams[sid] = stream
        self.streams_total += 1
        try:
            while True:
                item = await queue.get()
                if item is _EOF:
                    return
                try:
                    if isinstance(item, tuple):
                        out = stream.on_change(*item)
                    else:
                        out = stream.handle_request(item)
                except XdsError as e:
                    log.warning("xDS stream from %s ended: %s", context.peer(), e.message)
                    await context.abort(e.code, e.message)
                    return
                for resp in out:
                    yield resp
        finally:
            unwatch()
            reader.cancel()
            self.streams.pop(sid, None)
            log.info("xDS stream from %s closed", stream.node_label)
