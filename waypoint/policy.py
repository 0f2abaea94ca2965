"""Traffic policy for the waypoint: faults, local rate limits, retries - specs and pure mechanics.

Role: the parts of request handling that involve chance or time.  Everything here is pure or
holds only in-memory state with time and randomness *passed in*, so it can be table-tested:

- ``Fault`` + ``apply_fault(fault, r1, r2)``: delay and abort injection with percentages.
- ``RateLimit`` (spec) and ``TokenBucket(rate_per_s, burst).take(now)``; ``RateLimiters``
  keeps one bucket per route rule (per waypoint replica) and resets it when the spec changes.
- ``RetrySpec`` (from an HTTPRoute rule's ``retry``), ``backoff_delay`` (full jitter) and
  ``RetryBudget`` (at most a share of active requests may be retries).
- ``parse_duration`` for Gateway API durations (``"1h2m3s"``, ``"500ms"``).
- ``parse_traffic_policy``: our ``ambient.io/v1alpha1 HTTPTrafficPolicy`` resource (see
  ``waypoint/README.md``), validated strictly: an unknown field is an error.

Invariants: no I/O, no clocks, no global RNG; parsers raise only ``FieldError`` (with a
message naming the field); the mechanics never raise on in-range inputs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ambient.config._common import FieldError, as_list, as_map, as_str, check_keys, short

__all__ = [
    "Fault",
    "RateLimit",
    "RateLimiters",
    "RetryBudget",
    "RetrySpec",
    "TargetRef",
    "TokenBucket",
    "TrafficPolicy",
    "apply_fault",
    "backoff_delay",
    "parse_duration",
    "parse_traffic_policy",
]

TRAFFIC_POLICY_API = "ambient.io/v1alpha1"
TRAFFIC_POLICY_KIND = "HTTPTrafficPolicy"
GATEWAY_GROUP = "gateway.networking.k8s.io"

_DURATION = re.compile(r"^(?:[0-9]{1,5}(?:h|ms|m|s)){1,4}$")
_DURATION_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(value: Any, where: str) -> float:
    """A Gateway API duration (``"10s"``, ``"1m30s"``, ``"250ms"``) in seconds."""
    if not isinstance(value, str) or not _DURATION.match(value):
        raise FieldError(
            f"{where} {short(value)} is not a duration (write it like \"10s\", \"1m30s\", "
            "\"250ms\")"
        )
    return sum(int(n) * _UNIT_S[u] for n, u in _DURATION_PART.findall(value))


def _percentage(value: Any, where: str) -> float:
    if value is None:
        return 100.0
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise FieldError(f"{where} {short(value)} is not a number")
    if not 0 <= value <= 100:
        raise FieldError(f"{where} {value} is not between 0 and 100")
    return float(value)


# ---------------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class Fault:
    """Delay ``delay_s`` for ``delay_percent``% of requests; abort ``abort_percent``% with
    ``abort_status``.  Either part may be absent (``None``)."""

    delay_s: float | None = None
    delay_percent: float = 100.0
    abort_status: int | None = None
    abort_percent: float = 100.0


def apply_fault(fault: Fault | None, r1: float, r2: float) -> tuple[float, int | None]:
    """``(delay seconds, abort status or None)`` for one request; ``r1``/``r2`` in [0, 1).

    ``r1`` draws the delay, ``r2`` the abort (independent: a request may be both delayed and
    aborted, as in Envoy, which delays first).  A percentage ``p`` hits when ``r * 100 < p``,
    so 0% never hits and 100% always does.
    """
    if fault is None:
        return 0.0, None
    delay = 0.0
    if fault.delay_s is not None and r1 * 100.0 < fault.delay_percent:
        delay = fault.delay_s
    abort = None
    if fault.abort_status is not None and r2 * 100.0 < fault.abort_percent:
        abort = fault.abort_status
    return delay, abort


def parse_fault(raw: Any, where: str) -> Fault:
    raw = as_map(raw, where)
    check_keys(raw, {"delay", "abort"}, where)
    if not raw:
        raise FieldError(f"{where}: set delay, abort or both")
    f = Fault()
    if "delay" in raw:
        w = f"{where}.delay"
        d = as_map(raw["delay"], w)
        check_keys(d, {"fixedDelay", "percentage"}, w)
        if "fixedDelay" not in d:
            raise FieldError(f"{w}.fixedDelay is required")
        f = Fault(
            delay_s=parse_duration(d["fixedDelay"], f"{w}.fixedDelay"),
            delay_percent=_percentage(d.get("percentage"), f"{w}.percentage"),
        )
    if "abort" in raw:
        w = f"{where}.abort"
        a = as_map(raw["abort"], w)
        check_keys(a, {"httpStatus", "percentage"}, w)
        status = a.get("httpStatus")
        if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
            raise FieldError(f"{w}.httpStatus {short(status)} is not an HTTP status (200..599)")
        f = Fault(
            delay_s=f.delay_s,
            delay_percent=f.delay_percent,
            abort_status=status,
            abort_percent=_percentage(a.get("percentage"), f"{w}.percentage"),
        )
    return f


# ----------------------------------------------------------------------------- rate limits


@dataclass(frozen=True)
class RateLimit:
    """``requests_per_unit`` per ``unit_s`` seconds, bursts up to ``burst`` (per replica, per
    route rule)."""

    requests_per_unit: int
    unit_s: float
    burst: int

    @property
    def rate_per_s(self) -> float:
        return self.requests_per_unit / self.unit_s


_UNITS = {"second": 1.0, "minute": 60.0, "hour": 3600.0}


def parse_rate_limit(raw: Any, where: str) -> RateLimit:
    raw = as_map(raw, where)
    check_keys(raw, {"requestsPerUnit", "unit", "burst"}, where)
    n = raw.get("requestsPerUnit")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise FieldError(f"{where}.requestsPerUnit {short(n)} is not a positive integer")
    unit = raw.get("unit", "second")
    if unit not in _UNITS:
        raise FieldError(f"{where}.unit {short(unit)} is not one of second|minute|hour")
    burst = raw.get("burst", n)
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise FieldError(f"{where}.burst {short(burst)} is not a positive integer")
    return RateLimit(requests_per_unit=n, unit_s=_UNITS[unit], burst=burst)


class TokenBucket:
    """A token bucket: starts full (``burst`` tokens), refills at ``rate_per_s``.

    ``take(now)`` spends one token if there is one.  ``now`` is any monotonic clock in
    seconds; a clock that goes backwards refills nothing (never a negative refill).
    """

    def __init__(self, rate_per_s: float, burst: int | float) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError(f"token bucket: rate {rate_per_s} must be > 0, burst {burst} >= 1")
        self.rate_per_s = float(rate_per_s)
        self.burst = float(burst)
        self.tokens = float(burst)
        self._last: float | None = None

    def take(self, now: float) -> bool:
        if self._last is not None and now > self._last:
            self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate_per_s)
        if self._last is None or now > self._last:
            self._last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class RateLimiters:
    """One ``TokenBucket`` per key (a route rule), made on first use from its ``RateLimit``.

    A key whose spec changed gets a fresh, full bucket.  ``prune(keys)`` drops buckets of rules
    that no longer exist (call it after a config change)."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[RateLimit, TokenBucket]] = {}

    def take(self, key: str, spec: RateLimit, now: float) -> bool:
        entry = self._buckets.get(key)
        if entry is None or entry[0] != spec:
            entry = (spec, TokenBucket(spec.rate_per_s, spec.burst))
            self._buckets[key] = entry
        return entry[1].take(now)

    def prune(self, keep: set[str]) -> None:
        for k in [k for k in self._buckets if k not in keep]:
            del self._buckets[k]

    def __len__(self) -> int:
        return len(self._buckets)


# --------------------------------------------------------------------------------- retries


@dataclass(frozen=True)
class RetrySpec:
    """Retry up to ``attempts`` times (after the first try) when the backend answers one of
    ``codes`` or the connection to it fails; wait ``backoff_delay(n, backoff_s, 10*backoff_s,
    r)`` before retry ``n``."""

    attempts: int
    codes: tuple[int, ...]
    backoff_s: float

    @property
    def max_backoff_s(self) -> float:
        return 10.0 * self.backoff_s


DEFAULT_RETRY_ATTEMPTS = 2  # Istio's default for mesh routes when retries are asked for
DEFAULT_RETRY_CODES = (503,)
DEFAULT_BACKOFF_S = 0.025  # Envoy's default base interval


def parse_retry(raw: Any, where: str) -> RetrySpec:
    """Gateway API ``HTTPRouteRule.retry`` (``attempts``, ``codes``, ``backoff``)."""
    raw = as_map(raw, where)
    check_keys(raw, {"attempts", "codes", "backoff"}, where)
    attempts = raw.get("attempts", DEFAULT_RETRY_ATTEMPTS)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or not 0 <= attempts <= 100:
        raise FieldError(f"{where}.attempts {short(attempts)} is not an integer 0..100")
    codes: list[int] = []
    for i, c in enumerate(as_list(raw.get("codes"), f"{where}.codes")):
        if isinstance(c, bool) or not isinstance(c, int) or not 400 <= c <= 599:
            raise FieldError(f"{where}.codes[{i}] {short(c)} is not an HTTP error status 400..599")
        codes.append(c)
    backoff = DEFAULT_BACKOFF_S
    if "backoff" in raw:
        backoff = parse_duration(raw["backoff"], f"{where}.backoff")
    return RetrySpec(
        attempts=attempts, codes=tuple(codes) or DEFAULT_RETRY_CODES, backoff_s=backoff
    )


def backoff_delay(attempt: int, base: float, max: float, r: float) -> float:
    """Full-jitter backoff before retry ``attempt`` (0 for the first retry): a uniform draw
    (``r`` in [0, 1)) from ``[0, min(max, base * 2**attempt))``."""
    if attempt < 0 or base <= 0:
        return 0.0
    ceiling = min(max, base * (2.0 ** min(attempt, 62)))
    return ceiling * _clamp01(r)


def _clamp01(r: float) -> float:
    """Clamp a random draw into [0, 1] (NaN -> 0)."""
    if not r > 0:
        return 0.0
    return r if r < 1.0 else 1.0


class RetryBudget:
    """Envoy-style retry budget: retries in flight may be at most ``percent``% of active
    requests, but at least ``min_concurrency`` retries are always allowed.

    The proxy calls ``begin_request``/``end_request`` around each request and
    ``try_begin_retry``/``end_retry`` around each retry."""

    def __init__(self, percent: float = 20.0, min_concurrency: int = 3) -> None:
        self.percent = percent
        self.min_concurrency = min_concurrency
        self.active_requests = 0
        self.active_retries = 0

    def allows(self, active_requests: int, active_retries: int) -> bool:
        limit = max(self.min_concurrency, int(active_requests * self.percent / 100.0))
        return active_retries < limit

    def begin_request(self) -> None:
        self.active_requests += 1

    def end_request(self) -> None:
        self.active_requests = max(0, self.active_requests - 1)

    def try_begin_retry(self) -> bool:
        if not self.allows(self.active_requests, self.active_retries):
            return False
        self.active_retries += 1
        return True

    def end_retry(self) -> None:
        self.active_retries = max(0, self.active_retries - 1)


# ------------------------------------------------------------------- HTTPTrafficPolicy


@dataclass(frozen=True)
class TargetRef:
    """A policy target: ``kind`` HTTPRoute (optionally one rule by ``section``) or Service."""

    kind: str
    namespace: str
    name: str
    section: str | None = None


@dataclass(frozen=True)
class TrafficPolicy:
    key: str  # "ns/name"
    targets: tuple[TargetRef, ...]
    fault: Fault | None
    rate_limit: RateLimit | None
    created: str  # metadata.creationTimestamp (for precedence), "" if absent


_TP_TOP = {"apiVersion", "kind", "metadata", "spec", "status"}
_TARGET_KINDS = {"HTTPRoute": GATEWAY_GROUP, "GRPCRoute": GATEWAY_GROUP, "Service": ""}


def parse_target_ref(raw: Any, where: str, ns: str, kinds: dict[str, str]) -> TargetRef:
    raw = as_map(raw, where)
    check_keys(raw, {"group", "kind", "name", "sectionName", "namespace"}, where)
    kind = as_str(raw.get("kind"), f"{where}.kind")
    if kind not in kinds:
        raise FieldError(f"{where}.kind {short(kind)} is not one of {'|'.join(sorted(kinds))}")
    group = raw.get("group", kinds[kind])
    if group not in (kinds[kind], "core" if kinds[kind] == "" else kinds[kind]):
        raise FieldError(f"{where}.group {short(group)} does not go with kind {kind}")
    name = as_str(raw.get("name"), f"{where}.name")
    if raw.get("namespace", ns) != ns:
        raise FieldError(f"{where}.namespace: a policy can only target objects in its own "
                         f"namespace {ns}")
    section = raw.get("sectionName")
    if section is not None:
        section = as_str(section, f"{where}.sectionName")
        if kind == "Service":
            raise FieldError(f"{where}.sectionName is only supported for HTTPRoute targets")
    return TargetRef(kind=kind, namespace=ns, name=name, section=section)


def parse_traffic_policy(obj: dict[str, Any]) -> TrafficPolicy:
    """An ``HTTPTrafficPolicy`` object -> ``TrafficPolicy`` (``FieldError`` if invalid)."""
    check_keys(obj, _TP_TOP)
    if obj.get("apiVersion") != TRAFFIC_POLICY_API:
        raise FieldError(f"apiVersion {short(obj.get('apiVersion'))} is not {TRAFFIC_POLICY_API}")
    meta = as_map(obj.get("metadata"), "metadata")
    ns = str(meta.get("namespace") or "default")
    spec = as_map(obj.get("spec"), "spec")
    check_keys(spec, {"targetRefs", "fault", "rateLimit"}, "spec")
    targets = tuple(
        parse_target_ref(t, f"spec.targetRefs[{i}]", ns, _TARGET_KINDS)
        for i, t in enumerate(as_list(spec.get("targetRefs"), "spec.targetRefs"))
    )
    if not targets:
        raise FieldError("spec.targetRefs is empty: name an HTTPRoute (optionally a rule by "
                         "sectionName) or a Service")
    fault = parse_fault(spec["fault"], "spec.fault") if "fault" in spec else None
    rl = parse_rate_limit(spec["rateLimit"], "spec.rateLimit") if "rateLimit" in spec else None
    if fault is None and rl is None:
        raise FieldError("spec sets neither fault nor rateLimit: the policy would do nothing")
    return TrafficPolicy(
        key=f"{ns}/{meta.get('name')}",
        targets=targets,
        fault=fault,
        rate_limit=rl,
        created=str(meta.get("creationTimestamp") or ""),
    )
