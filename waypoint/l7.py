"""The waypoint's L7 decision layer: the one module the proxy imports.

Role: pure decisions over a ``WaypointConfig`` snapshot, with time and randomness passed in.
The proxy (``proxy.py``) handles each request like this::

    cfg, problems = build_config(objects, ns, name)        # on every config change
    limiters.prune(cfg.rate_limit_keys)

    req = Request(...)                                      # per request
    d = authorize(cfg, req)              # not d.allowed -> 403 DENY_BODY ("RBAC: access denied")
    r = run_request_filters(filters, req, headers)          # filters.py: may answer itself
    a = route(cfg, req)                  # NoRoute -> 404; DirectResponse -> answer it
    adm = admit(a, limiters, now, r1, r2)  # rate limit (429) and fault (delay, abort)
    b = pick_backend(a.backends, r3)     # b.invalid -> 500; else forward, with
                                         # a.request_headers / rewrite_* / timeouts / retry
                                         # (backoff_delay, RetryBudget), then
                                         # a.response_headers on the way back

Invariants: nothing here does I/O, reads a clock or a global RNG; ``route``, ``authorize``
and ``admit`` never raise on any ``Request``.  The implementation lives in ``routes.py``
(HTTPRoute/GRPCRoute; parsing in ``route_parse.py``), ``authz.py`` (AuthorizationPolicy),
``policy.py`` (faults, rate limits, retries, ``HTTPTrafficPolicy``) and ``l7config.py``
(``build_config``); import from here so those can move.
"""

from __future__ import annotations

from dataclasses import dataclass

from waypoint.authz import DENY_BODY, DENY_STATUS, L7Decision, L7Policy, authorize_with
from waypoint.l7config import WaypointConfig, build_config
from waypoint.l7request import Destination, Request, Source, strip_port
from waypoint.policy import (
    Fault,
    RateLimit,
    RateLimiters,
    RetryBudget,
    RetrySpec,
    TokenBucket,
    apply_fault,
    backoff_delay,
    parse_duration,
)
from waypoint.routes import (
    Backend,
    DirectResponse,
    HeaderModifier,
    NoRoute,
    RouteAction,
    pick_backend,
    route_in,
)

__all__ = [
    "DENY_BODY",
    "DENY_STATUS",
    "Admission",
    "Backend",
    "Destination",
    "DirectResponse",
    "Fault",
    "HeaderModifier",
    "L7Decision",
    "L7Policy",
    "NoRoute",
    "RateLimit",
    "RateLimiters",
    "Request",
    "RetryBudget",
    "RetrySpec",
    "RouteAction",
    "Source",
    "TokenBucket",
    "WaypointConfig",
    "admit",
    "apply_fault",
    "authorize",
    "backoff_delay",
    "build_config",
    "normalize_path",
    "parse_duration",
    "pick_backend",
    "route",
    "strip_port",
]

RATE_LIMITED_BODY = b"local_rate_limited"
FAULT_ABORT_BODY = b"fault filter abort"


def route(cfg: WaypointConfig, req: Request) -> RouteAction | DirectResponse | NoRoute:
    """Where ``req`` goes: HTTPRoute/GRPCRoute semantics (see ``routes.py``)."""
    try:
        return route_in(cfg.routes, req)
    except Exception as e:  # defensive: a decision bug answers 500, never kills the proxy
        return DirectResponse(status=500, reason=f"routing error {type(e).__name__}: {e}")


def authorize(cfg: WaypointConfig, req: Request) -> L7Decision:
    """Whether ``req`` may pass: the Gateway's policies plus those of the addressed Service."""
    policies = cfg.gateway_policies + cfg.service_policies.get(req.dst.service_host, ())
    try:
        return authorize_with(policies, req)
    except Exception as e:  # defensive: fail closed
        return L7Decision(False, f"authorization error {type(e).__name__}: {e}")


@dataclass(frozen=True)
class Admission:
    """What traffic policy does to a routed request before it is forwarded: wait
    ``delay_s`` first, then answer ``response`` instead of forwarding if it is set."""

    delay_s: float = 0.0
    response: DirectResponse | None = None
    response_flags: tuple[str, ...] = ()  # "DI" delayed, "FI" aborted, "RL" rate limited


def admit(action: RouteAction, limiters: RateLimiters, now: float, r_delay: float,
          r_abort: float) -> Admission:
    """Apply ``action``'s local rate limit (429 when its bucket is empty) and fault."""
    if action.rate_limit is not None and not limiters.take(
        action.rate_limit_key or action.route_name, action.rate_limit, now
    ):
        return Admission(response=DirectResponse(
            status=429, body=RATE_LIMITED_BODY, headers=(("content-type", "text/plain"),),
            route_name=action.route_name, response_flag="RL",
            reason=f"local rate limit of {action.rate_limit_key or action.route_name}",
        ), response_flags=("RL",))
    delay, abort = apply_fault(action.fault, r_delay, r_abort)
    flags = ("DI",) if delay > 0 else ()
    if abort is None:
        return Admission(delay_s=delay, response_flags=flags)
    return Admission(delay_s=delay, response=DirectResponse(
        status=abort, body=FAULT_ABORT_BODY, headers=(("content-type", "text/plain"),),
        route_name=action.route_name, response_flag="FI", reason="fault injection abort",
    ), response_flags=(*flags, "FI"))


def normalize_path(path: str) -> str:
    """RFC 3986 dot-segment removal (Istio's default ``BASE`` normalization).

    The proxy should build ``Request.path`` with this so ``/a/../admin`` cannot slip past a
    policy on ``/admin``.  Percent-encoding and repeated slashes are left alone."""
    if not path.startswith("/"):
        path = "/" + path
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
        elif seg == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)
