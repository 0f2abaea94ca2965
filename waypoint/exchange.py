"""One HTTP request through the waypoint: decide (``waypoint.l7``), then forward and answer.

Role: ``Exchange.handle(tunnel, request)`` is what the HTTP/1.1 and HTTP/2 servers call for
every request. Order: authorization (403 ``RBAC: access denied``), the operator's request
filters (``waypoint.filters``; a filter that raises fails only this request with 500), routing
(404 no route, redirects), admission (local rate limit 429, fault delay and abort), backend and
endpoint choice, then the upstream exchange over HBONE with timeouts and retries; response
header modifiers on the way back. Every decision comes from ``waypoint.l7``; this module only
carries them out.

Retries (our choice, documented): a request is retried only when its body is *replayable*:
already complete when routing finished, or declared (Content-Length) at most
``RETRY_BUFFER`` bytes, which we then buffer. Streaming or larger bodies are forwarded without
buffering and never retried, except after a connection failure that happened before any body
byte was read. Retries obey the route's ``attempts`` and ``codes``, full-jitter backoff and the
process-wide ``RetryBudget``. ``timeouts.request`` bounds the time to the response head over all
tries; ``timeouts.backendRequest`` bounds each try.

Invariants: ``handle`` never raises (errors become local replies); each request produces one
``RequestRecord.finish`` (metrics + access log), when the downstream codec has written the
response; every upstream lease is released exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ambient.identity import SpiffeId
from ambient.model import Service, Workload
from ambient.store import Endpoint
from waypoint import l7
from waypoint.filters import MutableHeaders, run_request_filters, run_response_filters
from waypoint.message import Body, BodyError, HttpRequest, HttpResponse, get_header
from waypoint.state import Snapshot
from waypoint.telemetry import RequestRecord, WaypointMetrics
from waypoint.upstream import Lease, UpstreamError, Upstreams, endpoint_addr

__all__ = ["RETRY_BUFFER", "Exchange", "Tunnel", "grpc_status_for", "local_reply"]

log = logging.getLogger("waypoint.exchange")

RETRY_BUFFER = 64 * 1024

# Envoy's local-reply mapping of HTTP status to gRPC status for gRPC clients.
_GRPC_FOR_HTTP = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}


def grpc_status_for(http_status: int) -> int:
    return _GRPC_FOR_HTTP.get(http_status, 2)


def local_reply(status: int, text: str, *, grpc: bool,
                headers: Sequence[tuple[str, str]] = ()) -> HttpResponse:
    """A reply made by the waypoint; gRPC clients get HTTP 200 trailers-only with a status."""
    if grpc and status != 200:
        return HttpResponse(200, [("content-type", "application/grpc"),
                                  ("grpc-status", str(grpc_status_for(status))),
                                  ("grpc-message", text), *headers], Body.empty())
    return HttpResponse.local(status, text, headers)


@dataclass
class Tunnel:
    """What one inbound HBONE tunnel tells about its requests."""

    snapshot: Snapshot
    peer_identity: SpiffeId
    src_addr: tuple[str, int]  # the original client (from ``forwarded`` or the peer address)
    src_workload: Workload | None
    service: Service | None  # the addressed service (None: a workload was addressed)
    workload: Workload | None  # the addressed workload, when addressed directly
    dst_ip: str
    port: int
    protocol: str  # "http" | "http2" | "grpc"


class Exchange:
    """The request pipeline; one per waypoint process."""

    def __init__(
        self,
        upstreams: Upstreams,
        metrics: WaypointMetrics | None,
        *,
        filters: Sequence[Any] = (),
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        cluster_domain: str = "cluster.local",
    ) -> None:
        self.upstreams = upstreams
        self.metrics = metrics
        self.filters = list(filters)
        self.rng = rng or random.Random()
        self.clock = clock
        self.cluster_domain = cluster_domain
        self.limiters = l7.RateLimiters()
        self.budget = l7.RetryBudget()
        self.active = 0

    # -- entry point --------------------------------------------------------------------------

    async def handle(self, tunnel: Tunnel, req: HttpRequest) -> HttpResponse:
        grpc = (req.header("content-type") or "").startswith("application/grpc")
        rec = RequestRecord(
            self.metrics, tunnel.src_addr, tunnel.src_workload, str(tunnel.peer_identity),
            req.method, req.authority, req.target, req.protocol, grpc, service=tunnel.service,
        )
        self.active += 1
        self.budget.begin_request()
        lease: Lease | None = None
        try:
            resp, lease = await self._handle(tunnel, req, rec, grpc)
        except Exception as e:  # a bug must fail the request, not the connection
            log.exception("request %s %s failed inside the waypoint", req.method, req.target)
            rec.details = "internal_error"
            resp, lease = local_reply(500, f"waypoint internal error: {e}", grpc=grpc), None
        finally:
            self.active -= 1
            self.budget.end_request()
        self._arm_finish(req, resp, rec, lease)
        return resp

    def _arm_finish(self, req: HttpRequest, resp: HttpResponse, rec: RequestRecord,
                    lease: Lease | None) -> None:
        def done(sent: int, error: BaseException | None) -> None:
            ok = error is None and resp.body.ended
            if lease is not None:
                lease.release(ok)
            if error is not None:
                rec.flag("DC")
            grpc_status = None
            if rec.grpc:
                grpc_status = get_header(resp.body.trailers, "grpc-status") or resp.header(
                    "grpc-status")
            rec.finish(resp.status, request_bytes=req.body.received, response_bytes=sent,
                       grpc_status=grpc_status, error=error)

        resp.on_done = done

    # -- the pipeline -------------------------------------------------------------------------

    async def _handle(self, tunnel: Tunnel, req: HttpRequest, rec: RequestRecord, grpc: bool
                      ) -> tuple[HttpResponse, Lease | None]:
        cfg = tunnel.snapshot.l7
        lreq = self._l7_request(tunnel, req, grpc)
        decision = l7.authorize(cfg, lreq)
        if not decision.allowed:
            rec.details = f"rbac_access_denied_matched_policy[{decision.policy or 'none'}]"
            log.debug("denied %s %s: %s", req.method, req.target, decision.reason)
            return local_reply(l7.DENY_STATUS, l7.DENY_BODY.decode(), grpc=grpc), None
        if self.filters:
            filtered = await self._run_filters(lreq, req, rec, grpc)
            if filtered is not None:
                return filtered, None
            lreq = self._l7_request(tunnel, req, grpc)  # filters may have changed headers
        action = l7.route(cfg, lreq)
        if isinstance(action, l7.NoRoute):
            rec.flag(action.response_flag)
            rec.details = "route_not_found"
            return local_reply(action.status, "route not found", grpc=grpc), None
        if isinstance(action, l7.DirectResponse):
            return self._direct(action, rec, grpc), None
        rec.route = action.route_name
        adm = l7.admit(action, self.limiters, self.clock(), self.rng.random(), self.rng.random())
        for f in adm.response_flags:
            rec.flag(f)
        if adm.delay_s > 0:
            await asyncio.sleep(adm.delay_s)
        if adm.response is not None:
            return self._direct(adm.response, rec, grpc), None
        backend = l7.pick_backend(action.backends, self.rng.random())
        if backend.invalid:
            rec.details = "invalid_backend"
            return local_reply(500, f"backend unusable: {backend.invalid}", grpc=grpc), None
        svc, endpoints = self._endpoints(tunnel, backend)
        if svc is not None:
            rec.service = svc
        if not endpoints:
            rec.flag("UH")
            rec.details = "no_healthy_upstream"
            return local_reply(503, "no healthy upstream", grpc=grpc), None
        upstream_req = self._rewrite(req, action)
        # Istio's rule: the port's protocol picks the upstream protocol (http: HTTP/1.1;
        # http2, grpc: HTTP/2), and gRPC always goes over HTTP/2.
        http2 = grpc or tunnel.protocol in ("http2", "grpc")
        resp, lease = await self._forward(upstream_req, action, endpoints, http2, rec, grpc)
        if action.response_headers is not None:
            resp.headers = action.response_headers.apply(resp.headers)
        self._response_filters(lreq, resp)
        return resp, lease

    def _l7_request(self, tunnel: Tunnel, req: HttpRequest, grpc: bool) -> l7.Request:
        svc = tunnel.service
        return l7.Request(
            method=req.method, scheme=req.scheme or "http", authority=req.authority,
            path=l7.normalize_path(req.path), query=req.query, headers=tuple(req.headers),
            protocol=req.protocol, grpc=grpc,
            src=l7.Source(tunnel.src_addr[0], str(tunnel.peer_identity),
                          tunnel.peer_identity.namespace),
            dst=l7.Destination(svc.hostname if svc else "", svc.namespace if svc else "",
                               tunnel.port, tunnel.dst_ip),
        )

    async def _run_filters(self, lreq: l7.Request, req: HttpRequest, rec: RequestRecord,
                           grpc: bool) -> HttpResponse | None:
        headers = MutableHeaders(req.headers)  # edits land in req.headers
        result = run_request_filters(self.filters, lreq, headers)
        if result.is_continue:
            return None
        status = result.respond_status or 500
        rec.details = f"filter_{result.filter_name or 'response'}"
        return local_reply(status, result.body.decode("utf-8", "replace"), grpc=grpc,
                           headers=result.headers)

    def _response_filters(self, lreq: l7.Request, resp: HttpResponse) -> None:
        if not self.filters:
            return
        resp.headers = list(resp.headers)
        run_response_filters(self.filters, lreq, resp.status, MutableHeaders(resp.headers))

    def _direct(self, d: l7.DirectResponse, rec: RequestRecord, grpc: bool) -> HttpResponse:
        if d.response_flag and d.response_flag != "-":
            rec.flag(d.response_flag)
        if d.route_name:
            rec.route = d.route_name
        rec.details = d.reason or "direct_response"
        if grpc and d.status >= 400:
            return local_reply(d.status, d.body.decode("utf-8", "replace"), grpc=True)
        hs = list(d.headers)
        if d.body and not any(k == "content-type" for k, _ in hs):
            hs.append(("content-type", "text/plain"))
        hs.append(("content-length", str(len(d.body))))
        return HttpResponse(d.status, hs, Body.of(d.body))

    def _endpoints(self, tunnel: Tunnel, backend: l7.Backend
                   ) -> tuple[Service | None, list[Endpoint]]:
        mesh = tunnel.snapshot.mesh
        if not backend.host:  # the addressed workload itself
            wl = tunnel.workload
            return None, [Endpoint(wl, backend.port or tunnel.port)] if wl is not None else []
        svc = mesh.service_by_key(f"{backend.namespace}/{backend.host}")
        if svc is None:
            return None, []
        return svc, list(mesh.endpoints(svc, backend.port))

    def _rewrite(self, req: HttpRequest, a: l7.RouteAction) -> HttpRequest:
        target = req.target
        if a.rewrite_path is not None:
            target = a.rewrite_path + (f"?{req.query}" if req.query else "")
        headers = list(req.headers)
        if a.request_headers is not None:
            headers = a.request_headers.apply(headers)
        authority = a.rewrite_authority or req.authority
        return HttpRequest(req.method, req.scheme, authority, target, headers, req.body,
                           req.protocol)

    # -- upstream with retries and timeouts ----------------------------------------------

    async def _forward(
        self, req: HttpRequest, a: l7.RouteAction, endpoints: list[Endpoint], http2: bool,
        rec: RequestRecord, grpc: bool,
    ) -> tuple[HttpResponse, Lease | None]:
        retry = a.retry
        replay: bytes | None = None
        if retry is not None and retry.attempts > 0:
            replay = await self._replayable(req.body, a.timeout_s)
        tries = 1 + (retry.attempts if retry is not None else 0)
        try:
            if a.timeout_s is None:  # no timer to arm (asyncio.timeout costs even with None)
                return await self._attempts(req, a, endpoints, http2, rec, grpc, tries, replay)
            async with asyncio.timeout(a.timeout_s):
                return await self._attempts(req, a, endpoints, http2, rec, grpc, tries, replay)
        except TimeoutError:
            rec.flag("UT")
            rec.details = "upstream_response_timeout"
            return local_reply(504, "upstream request timeout", grpc=grpc), None

    async def _replayable(self, body: Body, timeout: float | None) -> bytes | None:
        if not (body.ended or (body.length is not None and body.length <= RETRY_BUFFER)):
            return None
        if body.read_bytes:
            return None
        try:
            async with asyncio.timeout(timeout):
                return await body.read_all(RETRY_BUFFER)
        except (BodyError, TimeoutError):
            return None

    async def _attempts(
        self, req: HttpRequest, a: l7.RouteAction, endpoints: list[Endpoint], http2: bool,
        rec: RequestRecord, grpc: bool, tries: int, replay: bytes | None,
    ) -> tuple[HttpResponse, Lease | None]:
        retry = a.retry
        last_error: UpstreamError | None = None
        for attempt in range(tries):
            if attempt > 0:
                if not self.budget.try_begin_retry():
                    rec.flag("URX")
                    break
                try:
                    delay = l7.backoff_delay(attempt - 1, retry.backoff_s if retry else 0.025,
                                             retry.max_backoff_s if retry else 0.25,
                                             self.rng.random())
                    await asyncio.sleep(delay)
                finally:
                    self.budget.end_retry()
            ep = self.upstreams.pick(endpoints)
            if ep is None:
                rec.flag("UH")
                return local_reply(503, "no healthy upstream", grpc=grpc), None
            rec.dst_workload = ep.workload
            rec.upstream = endpoint_addr(ep)
            rec.attempts = attempt + 1
            body = Body.of(replay, req.body.trailers) if replay is not None else req.body
            ureq = HttpRequest(req.method, req.scheme, req.authority, req.target, req.headers,
                               body, req.protocol)
            try:
                if a.backend_timeout_s is None:
                    resp, lease = await self.upstreams.send(ep, ureq, http2=http2)
                else:
                    async with asyncio.timeout(a.backend_timeout_s):
                        resp, lease = await self.upstreams.send(ep, ureq, http2=http2)
            except TimeoutError:  # this try's own timeout (the overall one cancels instead)
                rec.flag("UT")
                last_error = UpstreamError("UT", "per-try timeout")
                if replay is None or attempt + 1 >= tries:
                    rec.details = "upstream_per_try_timeout"
                    return local_reply(504, "upstream request timeout", grpc=grpc), None
                continue
            except UpstreamError as e:
                last_error = e
                log.info("upstream %s failed (attempt %d): %s", rec.upstream, attempt + 1, e)
                can_retry = replay is not None or (e.flag == "UF" and req.body.read_bytes == 0)
                if can_retry and attempt + 1 < tries:
                    continue
                break
            codes = retry.codes if retry is not None else ()
            if resp.status in codes and attempt + 1 < tries and replay is not None:
                await _discard(resp, lease)
                continue
            return resp, lease
        err = last_error
        flag = err.flag if err is not None else "UF"
        rec.flag(flag)
        if tries > 1 and "URX" not in rec.flags:
            rec.flag("URX")
        rec.details = "upstream_reset_before_response_started" if flag == "UC" else \
            "upstream_connect_failure"
        text = "upstream connect error or disconnect/reset before headers"
        if err is not None:
            text += f": {err}"
        return local_reply(503, text, grpc=grpc), None


async def _discard(resp: HttpResponse, lease: Lease) -> None:
    ok = await resp.body.drain(RETRY_BUFFER)
    lease.release(ok)

