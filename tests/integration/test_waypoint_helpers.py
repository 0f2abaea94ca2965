"""A loopback world for the waypoint integration tests (no tests here).

The waypoint runs in-process on 127.0.0.1 with a real certificate from a test CA. Behind it,
one fake "node ztunnel" per service account (a real HBONE server with that identity's
certificate) takes the waypoint's CONNECTs to ``<pod IP>:<port>`` and relays them to real
servers on loopback: ``http.server`` (HTTP/1.1), an ``h2`` server (HTTP/2 + gRPC-style
trailers) and a TCP echo. Pod IPs are never dialled: the waypoint's dial function maps them
to the fake ztunnels. Clients are real HBONE clients with a mesh certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import logging
import random
import socket
import threading
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h11

from ambient.ca import CertificateAuthority, WorkloadCertificate
from ambient.certs import LocalCaProvider
from ambient.hbone.aio import (
    HboneStream,
    Incoming,
    open_hbone_connection,
    relay,
    start_hbone_server,
)
from ambient.hbone.protocol import ConnectRequest, build_request_headers
from ambient.identity import SpiffeId
from ambient.tls import client_context, server_context
from controlplane.objects import Update, object_key
from waypoint.main import Waypoint
from waypoint.settings import Settings

TD = "cluster.local"
NS = "shop"
WP_ID = SpiffeId(TD, NS, "waypoint")
CLIENT_ID = SpiffeId(TD, NS, "frontend")
CLIENT_IP = "10.244.0.5"
_CA = CertificateAuthority.generate(TD)
_CERTS: dict[SpiffeId, WorkloadCertificate] = {}


def cert(ident: SpiffeId) -> WorkloadCertificate:
    if ident not in _CERTS:
        _CERTS[ident] = _CA.issue(ident)
    return _CERTS[ident]


# -- manifests ------------------------------------------------------------------------------

PODS = {  # name -> (ip, service account, labels, kind of server)
    "reviews-v1": ("10.244.0.11", "reviews", {"app": "reviews", "version": "v1"}, "h1"),
    "reviews-v2": ("10.244.0.12", "reviews", {"app": "reviews", "version": "v2"}, "h1"),
    "db": ("10.244.0.21", "db", {"app": "db"}, "tcp"),
    "grpc": ("10.244.0.31", "grpc", {"app": "grpc"}, "h2"),
    "frontend": (CLIENT_IP, "frontend", {"app": "frontend", "version": "v1"}, ""),
}
TARGET_PORT = {"h1": 8081, "tcp": 8080, "h2": 9000}
REVIEWS_VIP, DB_VIP, GRPC_VIP = "10.96.0.30", "10.96.0.20", "10.96.0.40"


def _pod(name: str) -> dict[str, Any]:
    ip, sa, labels, _ = PODS[name]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": labels},
            "spec": {"nodeName": "node-a", "serviceAccountName": sa, "containers": [
                {"name": "app"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def _svc(name: str, vip: str, selector: dict[str, str], ports: list[dict[str, Any]],
         waypoint: bool = True) -> dict[str, Any]:
    labels = {"istio.io/use-waypoint": "waypoint"} if waypoint else {}
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": NS, "labels": labels},
            "spec": {"clusterIP": vip, "selector": selector, "ports": ports}}


def _route(name: str, rules: list[dict[str, Any]], parent: str = "reviews",
           kind: str = "HTTPRoute", ts: str = "2024-01-01T00:00:00Z") -> dict[str, Any]:
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": kind,
            "metadata": {"name": name, "namespace": NS, "creationTimestamp": ts},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": parent,
                                     "port": 80}],
                     "rules": rules}}


def _prefix(p: str) -> list[dict[str, Any]]:
    return [{"path": {"type": "PathPrefix", "value": p}}]


def _backend(name: str, weight: int = 1) -> dict[str, Any]:
    return {"name": name, "port": 80, "weight": weight}


def manifests() -> list[dict[str, Any]]:
    http_port = [{"name": "http", "port": 80, "targetPort": 8081}]
    objs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": NS, "labels": {"istio.io/dataplane-mode": "ambient"}}},
        *[{"apiVersion": "v1", "kind": "ServiceAccount",
           "metadata": {"name": sa, "namespace": NS}}
          for sa in sorted({p[1] for p in PODS.values()} | {"waypoint"})],
        *[_pod(n) for n in PODS],
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
         "metadata": {"name": "waypoint", "namespace": NS,
                      "labels": {"istio.io/waypoint-for": "service"}},
         "spec": {"gatewayClassName": "istio-waypoint",
                  "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
         "status": {"addresses": [{"type": "IPAddress", "value": "10.96.0.99"}]}},
        _svc("reviews", REVIEWS_VIP, {"app": "reviews"}, http_port),
        _svc("reviews-v1", "10.96.0.31", {"app": "reviews", "version": "v1"}, http_port, False),
        _svc("reviews-v2", "10.96.0.32", {"app": "reviews", "version": "v2"}, http_port, False),
        _svc("db", DB_VIP, {"app": "db"}, [{"name": "tcp", "port": 5432, "targetPort": 8080}]),
        _svc("grpc", GRPC_VIP, {"app": "grpc"},
             [{"name": "grpc", "port": 80, "targetPort": 9000, "appProtocol": "grpc"}]),
        _route("reviews", [
            {"matches": _prefix("/split"),
             "backendRefs": [_backend("reviews-v1", 90), _backend("reviews-v2", 10)]},
            {"matches": [{"path": {"type": "Exact", "value": "/old"}}],
             "filters": [{"type": "RequestRedirect",
                          "requestRedirect": {"path": {"type": "ReplaceFullPath",
                                                       "replaceFullPath": "/new"},
                                              "statusCode": 301}}]},
            {"matches": _prefix("/api"),
             "filters": [
                 {"type": "URLRewrite", "urlRewrite": {
                     "hostname": "rewritten.example",
                     "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v1api"}}},
                 {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                     "set": [{"name": "x-set", "value": "yes"}], "remove": ["x-drop"]}},
                 {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                     "add": [{"name": "x-resp", "value": "added"}]}}],
             "backendRefs": [_backend("reviews-v1")]},
            {"matches": _prefix("/slow"), "timeouts": {"request": "300ms"},
             "backendRefs": [_backend("reviews-v1")]},
            {"matches": _prefix("/flaky"),
             "retry": {"attempts": 3, "codes": [503], "backoff": "1ms"},
             "backendRefs": [_backend("reviews-v1")]},
            {"matches": _prefix("/"), "backendRefs": [_backend("reviews-v1")]},
        ]),
        _route("reviews-fault", [{"matches": _prefix("/fault"),
                                  "backendRefs": [_backend("reviews-v1")]}],
               ts="2024-01-02T00:00:00Z"),
        _route("reviews-limited", [{"matches": _prefix("/limited"),
                                    "backendRefs": [_backend("reviews-v1")]}],
               ts="2024-01-03T00:00:00Z"),
        {"apiVersion": "ambient.io/v1alpha1", "kind": "HTTPTrafficPolicy",
         "metadata": {"name": "fault", "namespace": NS},
         "spec": {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                                  "name": "reviews-fault"}],
                  "fault": {"abort": {"httpStatus": 418, "percentage": 100}}}},
        {"apiVersion": "ambient.io/v1alpha1", "kind": "HTTPTrafficPolicy",
         "metadata": {"name": "limit", "namespace": NS},
         "spec": {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                                  "name": "reviews-limited"}],
                  "rateLimit": {"requestsPerUnit": 2, "unit": "minute", "burst": 2}}},
        {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
         "metadata": {"name": "deny-admin", "namespace": NS},
         "spec": {"targetRefs": [{"group": "", "kind": "Service", "name": "reviews"}],
                  "action": "DENY", "rules": [{"to": [{"operation": {
                      "paths": ["/admin", "/admin/*"]}}]}]}},
    ]
    return objs


# -- backends -------------------------------------------------------------------------------


class _Hits:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_path: dict[str, int] = {}
        self.release = threading.Event()


def _h1_handler(pod: str, hits: _Hits) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # head and body are separate writes

        def log_message(self, *args: Any) -> None:
            pass

        def _reply(self) -> None:
            n = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(n) if n else b""
            if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
                for _ in range(100_000):
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        break
                    body += self.rfile.read(size)
                    self.rfile.readline()
            path = self.path
            with hits.lock:
                hits.by_path[path] = hits.by_path.get(path, 0) + 1
                count = hits.by_path[path]
            status = 200
            if path.startswith("/status/"):
                status = int(path.split("/")[2])
            if path.startswith("/flaky") and count <= 2:
                status = 503
            if path.startswith("/slow"):
                hits.release.wait(20)
            data = json.dumps({"pod": pod, "method": self.command, "path": path,
                               "headers": {k.lower(): v for k, v in self.headers.items()},
                               "body": body.decode("latin-1")}).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            # /close: "Connection: close"; /hangup: keep-alive answer, then the server closes;
            # /short: the body ends 5 bytes before its Content-Length, and the server closes
            short = 5 if path.startswith("/short") else 0
            self.send_header("content-length", str(len(data) + short))
            self.send_header("x-pod", pod)
            if path.startswith("/close"):
                self.send_header("connection", "close")
            self.end_headers()
            self.wfile.write(data)
            if path.startswith(("/close", "/hangup", "/short")):
                self.close_connection = True

        do_GET = do_POST = do_PUT = do_DELETE = _reply

    return Handler


class _H2Backend:
    """A gRPC-shaped h2c server: echoes the request body, ends with grpc-status trailers."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        w.write(conn.data_to_send())
        bodies: dict[int, bytes] = {}
        paths: dict[int, str] = {}
        try:
            while data := await r.read(65536):
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        hs = dict(ev.headers)
                        paths[ev.stream_id] = hs[b":path"].decode()
                        bodies[ev.stream_id] = b""
                    elif isinstance(ev, h2.events.DataReceived):
                        bodies[ev.stream_id] += ev.data
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.StreamEnded):
                        sid = ev.stream_id
                        status = "5" if paths[sid].endswith("/Fail") else "0"
                        conn.send_headers(sid, [(":status", "200"),
                                                ("content-type", "application/grpc"),
                                                ("x-pod", "grpc")])
                        conn.send_data(sid, bodies[sid] or b"\x00\x00\x00\x00\x00")
                        conn.send_headers(sid, [("grpc-status", status),
                                                ("grpc-message", "from-backend")],
                                          end_stream=True)
                w.write(conn.data_to_send())
                await w.drain()
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        finally:
            w.close()


async def _echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        if w.can_write_eof():
            w.write_eof()
    except OSError:
        pass
    finally:
        w.close()


# -- the world ------------------------------------------------------------------------------


@dataclass
class World:
    wp: Waypoint
    hits: dict[str, _Hits]
    connects: list[tuple[str, SpiffeId]] = field(default_factory=list)
    access: list[logging.LogRecord] = field(default_factory=list)

    @property
    def hbone_port(self) -> int:
        assert self.wp.hbone_addr is not None
        return self.wp.hbone_addr[1]

    async def tunnel(self, authority: str, *, src: str = f"{CLIENT_IP}:40000",
                     ident: SpiffeId = CLIENT_ID) -> HboneStream:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", self.hbone_port))
        conn = await open_hbone_connection(sock, client_context(cert(ident)), trust_domain=TD,
                                           expected={WP_ID})
        return await conn.open_stream(
            authority, build_request_headers(authority, forwarded_for=src)[2:])


class _Capture(logging.Handler):
    def __init__(self, out: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        self.out.append(record)


@contextlib.asynccontextmanager
async def world(*, filters: Iterable[Any] = (), objects: list[dict[str, Any]] | None = None,
                seed: int = 7) -> AsyncIterator[World]:
    """Start backends, fake ztunnels and the waypoint; tear everything down after."""
    closers: list[Any] = []
    threads: list[http.server.ThreadingHTTPServer] = []
    hits: dict[str, _Hits] = {}
    backend_port: dict[str, int] = {}  # "podIP:targetPort" -> loopback port
    for name, (ip, _sa, _labels, kind) in PODS.items():
        if kind == "h1":
            hits[name] = _Hits()
            srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _h1_handler(name, hits[name]))
            srv.daemon_threads = True
            threading.Thread(target=srv.serve_forever, daemon=True).start()
            threads.append(srv)
            backend_port[f"{ip}:{TARGET_PORT[kind]}"] = srv.server_address[1]
        elif kind == "h2":
            h2b = _H2Backend()
            backend_port[f"{ip}:{TARGET_PORT[kind]}"] = await h2b.start()
            closers.append(h2b.server)
        elif kind == "tcp":
            es = await asyncio.start_server(_echo, "127.0.0.1", 0)
            backend_port[f"{ip}:{TARGET_PORT[kind]}"] = es.sockets[0].getsockname()[1]
            closers.append(es)
    w_connects: list[tuple[str, SpiffeId]] = []

    async def ztunnel_handler(req: ConnectRequest, peer: SpiffeId, incoming: Incoming) -> None:
        w_connects.append((req.authority, peer))
        port = backend_port.get(req.authority)
        if port is None:
            incoming.reject(503)
            return
        r, wr = await asyncio.open_connection("127.0.0.1", port)
        await relay(incoming.accept(), r, wr)

    zt_port: dict[str, int] = {}  # pod IP -> fake ztunnel port
    for _name, (ip, sa, _labels, kind) in PODS.items():
        if not kind:
            continue
        zs = await start_hbone_server(ztunnel_handler, server_context(cert(SpiffeId(TD, NS, sa))),
                                      trust_domain=TD, host="127.0.0.1")
        zt_port[ip] = zs.sockets[0].getsockname()[1]
        closers.append(zs)

    async def dial(dst: tuple[Any, int]) -> socket.socket:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", zt_port[str(dst[0])]))
        except BaseException:
            sock.close()
            raise
        return sock

    settings = Settings(name="waypoint", namespace=NS, service_account="waypoint",
                        hbone_addr=("127.0.0.1", 0), stats_addr=("127.0.0.1", 0),
                        readiness_addr=("127.0.0.1", 0), admin_addr=("127.0.0.1", 0),
                        termination_deadline_s=1.0, header_timeout_s=2.0)
    wp = Waypoint(settings, LocalCaProvider(_CA), filters=list(filters), dial=dial,
                  rng=random.Random(seed))
    w = World(wp, hits, w_connects)
    cap = _Capture(w.access)
    access_log = logging.getLogger("access")
    access_log.addHandler(cap)
    old_level = access_log.level
    access_log.setLevel(logging.INFO)
    objs = manifests() if objects is None else objects
    never = asyncio.Event()
    await wp.start(source=never.wait())
    wp.apply(Update(upserts={object_key(o): o for o in objs}, resync=True))
    try:
        await wp.readiness.wait()
        yield w
    finally:
        access_log.removeHandler(cap)
        access_log.setLevel(old_level)
        for h in hits.values():
            h.release.set()
        await wp.stop(deadline=0.2)
        for c in closers:
            c.close()
        for srv in threads:
            srv.shutdown()
            srv.server_close()


# -- HTTP clients over a tunnel -------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    trailers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)


class H1:
    """An h11 client over one tunnel (keep-alive: several requests in sequence)."""

    def __init__(self, stream: HboneStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def request(self, method: str, path: str, headers: Iterable[tuple[str, str]] = (),
                      body: bytes = b"", host: str = "reviews.shop.svc.cluster.local") -> Reply:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        hs = [("host", host), *headers]
        if body or method in ("POST", "PUT"):
            hs.append(("content-length", str(len(body))))
        await self.stream.write(self.conn.send(h11.Request(method=method, target=path,
                                                           headers=hs)))
        if body:
            await self.stream.write(self.conn.send(h11.Data(data=body)))
        eom = self.conn.send(h11.EndOfMessage())
        if eom:
            await self.stream.write(eom)
        status, rh, out = 0, {}, b""
        for _ in range(10_000):
            ev = self.conn.next_event()
            if ev is h11.NEED_DATA:
                self.conn.receive_data(await asyncio.wait_for(self.stream.read(), 20))
                continue
            if isinstance(ev, h11.Response):
                status = ev.status_code
                rh = {k.decode().lower(): v.decode() for k, v in ev.headers}
            elif isinstance(ev, h11.Data):
                out += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                return Reply(status, rh, out)
            elif isinstance(ev, h11.ConnectionClosed):
                break
        raise AssertionError(f"no complete response (status {status})")


async def h2_requests(stream: HboneStream, reqs: list[tuple[str, str, list[tuple[str, str]],
                                                           bytes]],
                      authority: str = "reviews.shop.svc.cluster.local") -> list[Reply]:
    """Send ``(method, path, headers, body)`` requests concurrently on one h2c connection."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                header_encoding="utf-8"))
    conn.initiate_connection()
    sids = []
    pending: dict[int, bytes] = {}
    for method, path, headers, body in reqs:
        sid = conn.get_next_available_stream_id()
        sids.append(sid)
        conn.send_headers(sid, [(":method", method), (":scheme", "http"),
                                (":authority", authority), (":path", path), *headers],
                          end_stream=not body)
        if body:
            pending[sid] = body

    def pump() -> None:  # send what flow control allows
        for sid, rest in list(pending.items()):
            n = min(len(rest), conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            while n > 0:
                conn.send_data(sid, rest[:n])
                rest = rest[n:]
                n = min(len(rest), conn.local_flow_control_window(sid),
                        conn.max_outbound_frame_size)
            pending[sid] = rest
            if not rest:
                conn.end_stream(sid)
                del pending[sid]

    pump()
    await stream.write(conn.data_to_send())
    replies: dict[int, Reply] = {sid: Reply(0, {}, b"") for sid in sids}
    ended: set[int] = set()
    for _ in range(10_000):
        if ended >= set(sids):
            break
        data = await asyncio.wait_for(stream.read(), 20)
        if not data:
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                hs = dict(ev.headers)
                replies[ev.stream_id].status = int(hs.pop(":status"))
                replies[ev.stream_id].headers = hs
            elif isinstance(ev, h2.events.DataReceived):
                replies[ev.stream_id].body += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.TrailersReceived):
                replies[ev.stream_id].trailers = dict(ev.headers)
            elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                ended.add(ev.stream_id)
        pump()
        out = conn.data_to_send()
        if out:
            await stream.write(out)
    return [replies[s] for s in sids]


async def http_get(port: int, path: str) -> tuple[int, str]:
    """GET from one of the waypoint's plain HTTP ports (admin, stats, readiness)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
    await w.drain()
    data = await asyncio.wait_for(r.read(), 20)
    w.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def parse_h1_responses(data: bytes) -> list[Reply]:
    """Split a byte string of HTTP/1.1 responses (Content-Length or chunked framing)."""
    out = []
    for _ in range(1000):
        if not data:
            break
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        hs = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        if "content-length" in hs:
            n = int(hs["content-length"])
            body, data = data[:n], data[n:]
        else:
            body = b""
            while True:
                size, _, data = data.partition(b"\r\n")
                n = int(size, 16)
                body, data = body + data[:n], data[n + 2:]
                if n == 0:
                    break
        out.append(Reply(int(lines[0].split()[1]), hs, body))
    return out
