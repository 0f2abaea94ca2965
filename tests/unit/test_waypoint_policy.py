"""Faults, rate limits, retries and the HTTPTrafficPolicy resource (time and chance injected)."""

from __future__ import annotations

import random
from typing import Any

import pytest
from waypoint_l7_helpers import backend, cfg_of, httproute, mkreq, traffic_policy

from ambient.config._common import FieldError
from waypoint.l7 import (
    Fault,
    RateLimit,
    RateLimiters,
    RetryBudget,
    RouteAction,
    TokenBucket,
    admit,
    apply_fault,
    backoff_delay,
    parse_duration,
    route,
)


@pytest.mark.parametrize(
    "text,seconds",
    [("0s", 0.0), ("10s", 10.0), ("500ms", 0.5), ("1m30s", 90.0), ("1h", 3600.0),
     ("1h2m3s4ms", 3723.004), ("99999ms", 99.999)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text, "x") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "1.5s", "-1s", "1d", "1s1s1s1s1s", "s", 10, None])
def test_parse_duration_rejects(text: Any) -> None:
    with pytest.raises(FieldError, match="not a duration"):
        parse_duration(text, "x")


@pytest.mark.parametrize(
    "fault,r1,r2,want",
    [
        (None, 0.0, 0.0, (0.0, None)),
        (Fault(delay_s=2.0, delay_percent=10), 0.05, 0.0, (2.0, None)),
        (Fault(delay_s=2.0, delay_percent=10), 0.1, 0.0, (0.0, None)),
        (Fault(delay_s=2.0, delay_percent=0), 0.0, 0.0, (0.0, None)),
        (Fault(delay_s=2.0), 0.999, 0.0, (2.0, None)),  # 100% by default
        (Fault(abort_status=503, abort_percent=5), 0.0, 0.04, (0.0, 503)),
        (Fault(abort_status=503, abort_percent=5), 0.0, 0.05, (0.0, None)),
        (Fault(delay_s=1.0, abort_status=500), 0.0, 0.0, (1.0, 500)),  # both
    ],
)
def test_apply_fault(fault: Fault | None, r1: float, r2: float,
                     want: tuple[float, int | None]) -> None:
    assert apply_fault(fault, r1, r2) == want


def test_fault_percentage_statistics() -> None:
    rng = random.Random(7)
    f = Fault(delay_s=1.0, delay_percent=10, abort_status=503, abort_percent=30)
    n = 10000
    delays = aborts = 0
    for _ in range(n):
        d, a = apply_fault(f, rng.random(), rng.random())
        delays += d > 0
        aborts += a is not None
    assert 0.08 < delays / n < 0.12 and 0.27 < aborts / n < 0.33


def test_token_bucket_with_injected_time() -> None:
    b = TokenBucket(rate_per_s=2.0, burst=3)
    assert [b.take(100.0) for _ in range(4)] == [True, True, True, False]  # starts full
    assert not b.take(100.4)  # 0.8 token
    assert b.take(100.5)  # 1.0 token
    assert not b.take(100.5)
    assert [b.take(200.0) for _ in range(4)] == [True, True, True, False]  # capped at burst
    assert not b.take(150.0)  # clock went backwards: no refill, no crash
    assert b.take(200.5)


def test_token_bucket_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0, 1)
    with pytest.raises(ValueError):
        TokenBucket(1, 0)


def test_rate_limiters_one_bucket_per_key_reset_on_change() -> None:
    lim = RateLimiters()
    spec = RateLimit(requests_per_unit=1, unit_s=60.0, burst=1)
    assert lim.take("a", spec, 0.0) and not lim.take("a", spec, 1.0)
    assert lim.take("b", spec, 1.0)  # another rule has its own bucket
    bigger = RateLimit(requests_per_unit=2, unit_s=60.0, burst=2)
    assert lim.take("a", bigger, 1.0)  # new spec, new full bucket
    lim.prune({"a"})
    assert len(lim) == 1


@pytest.mark.parametrize(
    "attempt,r,want",
    [(0, 0.5, 0.05), (1, 0.5, 0.1), (3, 0.5, 0.4), (10, 0.5, 0.5), (10, 0.999, 0.999),
     (0, 0.0, 0.0), (2, 1.5, 0.4), (-1, 0.5, 0.0), (10_000, 0.5, 0.5)],
)
def test_backoff_full_jitter(attempt: int, r: float, want: float) -> None:
    assert backoff_delay(attempt, 0.1, 1.0, r) == pytest.approx(want)


def test_retry_budget() -> None:
    b = RetryBudget(percent=20.0, min_concurrency=3)
    assert b.allows(0, 2) and not b.allows(0, 3)  # the floor
    assert b.allows(100, 19) and not b.allows(100, 20)  # 20% of active requests
    for _ in range(10):
        b.begin_request()
    assert [b.try_begin_retry() for _ in range(4)] == [True, True, True, False]
    b.end_retry()
    assert b.try_begin_retry()
    for _ in range(20):
        b.end_request()
        b.end_retry()
    assert (b.active_requests, b.active_retries) == (0, 0)


# ------------------------------------------------------------------- HTTPTrafficPolicy


def two_rule_route() -> tuple[str, dict[str, Any]]:
    return httproute("app", "r", [
        {"name": "slow", "matches": [{"path": {"type": "PathPrefix", "value": "/slow"}}],
         "backendRefs": [backend()]},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}], "backendRefs": [backend()]},
    ])


def test_traffic_policy_attaches_to_rule_route_and_service() -> None:
    cfg, problems = cfg_of(
        two_rule_route(),
        traffic_policy("app", "rule", {
            "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                            "name": "r", "sectionName": "slow"}],
            "fault": {"delay": {"fixedDelay": "2s", "percentage": 10}}}),
        traffic_policy("app", "route", {
            "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                            "name": "r"}],
            "fault": {"abort": {"httpStatus": 503, "percentage": 5}},
            "rateLimit": {"requestsPerUnit": 100, "unit": "second", "burst": 20}}),
        traffic_policy("app", "svc", {
            "targetRefs": [{"group": "", "kind": "Service", "name": "api"}],
            "rateLimit": {"requestsPerUnit": 6, "unit": "minute"}}),
    )
    assert problems == []
    slow = route(cfg, mkreq("/slow"))
    assert isinstance(slow, RouteAction)
    assert slow.fault == Fault(delay_s=2.0, delay_percent=10.0)  # rule beats route
    assert slow.rate_limit == RateLimit(100, 1.0, 20)  # not set on the rule: from the route
    other = route(cfg, mkreq("/x"))
    assert isinstance(other, RouteAction)
    assert other.fault == Fault(abort_status=503, abort_percent=5.0)
    assert slow.rate_limit_key != other.rate_limit_key  # one bucket per rule
    api = route(cfg, mkreq("/", svc="api"))  # default route of a Service with a policy
    assert isinstance(api, RouteAction) and api.rate_limit == RateLimit(6, 60.0, 6)
    assert api.rate_limit_key in cfg.rate_limit_keys
    assert {slow.rate_limit_key, other.rate_limit_key} <= cfg.rate_limit_keys


def test_admit_rate_limits_and_faults() -> None:
    cfg, _ = cfg_of(
        two_rule_route(),
        traffic_policy("app", "rl", {
            "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                            "name": "r", "sectionName": "slow"}],
            "rateLimit": {"requestsPerUnit": 1, "unit": "second", "burst": 2},
            "fault": {"delay": {"fixedDelay": "1s"}, "abort": {"httpStatus": 418,
                                                               "percentage": 50}}}),
    )
    a = route(cfg, mkreq("/slow"))
    assert isinstance(a, RouteAction)
    lim = RateLimiters()
    first = admit(a, lim, 10.0, 0.0, 0.9)
    assert (first.delay_s, first.response, first.response_flags) == (1.0, None, ("DI",))
    second = admit(a, lim, 10.0, 0.0, 0.1)
    assert second.response is not None and second.response.status == 418
    assert second.response_flags == ("DI", "FI")
    third = admit(a, lim, 10.0, 0.0, 0.9)
    assert third.response is not None and third.response.status == 429
    assert third.response.response_flag == "RL" and third.delay_s == 0.0
    assert admit(a, lim, 11.0, 0.0, 0.9).response is None  # refilled
    plain = route(cfg, mkreq("/x"))
    assert isinstance(plain, RouteAction)
    assert admit(plain, lim, 11.0, 0.0, 0.0).response is None


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ({"targetRefs": [{"kind": "Service", "name": "web"}]}, "neither fault nor rateLimit"),
        ({"targetRefs": [], "fault": {"abort": {"httpStatus": 503}}}, "targetRefs is empty"),
        ({"targetRefs": [{"kind": "Pod", "name": "x"}], "fault": {"abort": {"httpStatus": 503}}},
         "kind"),
        ({"targetRefs": [{"kind": "Service", "name": "web"}], "fault": {"abort": {}}},
         "httpStatus"),
        ({"targetRefs": [{"kind": "Service", "name": "web"}],
          "fault": {"abort": {"httpStatus": 503, "percentage": 120}}}, "between 0 and 100"),
        ({"targetRefs": [{"kind": "Service", "name": "web"}],
          "fault": {"delay": {"fixedDelay": "2"}}}, "not a duration"),
        ({"targetRefs": [{"kind": "Service", "name": "web"}],
          "fault": {"delay": {"fixedDelay": "2s", "jitter": 1}}}, "unknown field"),
        ({"targetRefs": [{"kind": "Service", "name": "web"}],
          "rateLimit": {"requestsPerUnit": 0}}, "requestsPerUnit"),
        ({"targetRefs": [{"kind": "Service", "name": "web"}],
          "rateLimit": {"requestsPerUnit": 5, "unit": "day"}}, "unit"),
        ({"targetRefs": [{"kind": "Service", "name": "web"}],
          "rateLimit": {"requestsPerUnit": 5}, "retries": {}}, "unknown field"),
        ({"targetRefs": [{"kind": "Service", "name": "web", "namespace": "other"}],
          "rateLimit": {"requestsPerUnit": 5}}, "own namespace"),
    ],
)
def test_bad_traffic_policies(spec: dict[str, Any], fragment: str) -> None:
    good = traffic_policy("app", "good", {"targetRefs": [{"kind": "Service", "name": "web"}],
                                          "rateLimit": {"requestsPerUnit": 5}})
    cfg, problems = cfg_of(traffic_policy("app", "bad", spec), good)
    assert len(problems) == 1 and problems[0].startswith("HTTPTrafficPolicy app/bad: ")
    assert fragment in problems[0]
    a = route(cfg, mkreq("/"))
    assert isinstance(a, RouteAction) and a.rate_limit == RateLimit(5, 1.0, 5)


def test_traffic_policy_conflicts_and_dangling_targets_are_reported() -> None:
    cfg, problems = cfg_of(
        two_rule_route(),
        traffic_policy("app", "b", {"targetRefs": [{"kind": "Service", "name": "web"}],
                                    "rateLimit": {"requestsPerUnit": 2}}),
        traffic_policy("app", "a", {"targetRefs": [{"kind": "Service", "name": "web"}],
                                    "rateLimit": {"requestsPerUnit": 1}}),
        traffic_policy("app", "typo", {
            "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                            "name": "r", "sectionName": "slwo"}],
            "rateLimit": {"requestsPerUnit": 1}}),
    )
    assert any("app/a, app/b all set rate_limit" in p and "app/a (oldest) wins" in p
               for p in problems)
    assert any("app/typo" in p and "'slwo'" in p and "no effect" in p for p in problems)
    a = route(cfg, mkreq("/x"))
    assert isinstance(a, RouteAction) and a.rate_limit == RateLimit(1, 1.0, 1)
