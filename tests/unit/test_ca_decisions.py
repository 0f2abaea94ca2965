"""The CA's pure decisions: who may get which identity, TTL clamping, node tokens."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
import pytest

from ambient.identity import SpiffeId
from controlplane.ca_service import (
    Caller,
    Denied,
    LocalTokenAuthenticator,
    Unauthenticated,
    authorize,
    clamp_ttl,
    parse_trusted_accounts,
)

TD = "cluster.local"
WEB = SpiffeId(TD, "default", "web")
DB = SpiffeId(TD, "default", "db")
ZT1 = Caller("istio-system", "ztunnel", node="node-1")
TRUSTED = frozenset({("istio-system", "ztunnel")})
PODS = {"node-1": {WEB}}

OK = None
P = grpc.StatusCode.PERMISSION_DENIED
I = grpc.StatusCode.INVALID_ARGUMENT  # noqa: E741


@pytest.mark.parametrize(("caller", "requested", "impersonated", "outcome"), [
    (Caller("default", "web"), WEB, None, OK),
    (Caller("default", "web"), DB, None, P),
    (ZT1, WEB, str(WEB), OK),
    (ZT1, DB, str(DB), P),  # not on node-1
    (Caller("istio-system", "ztunnel"), WEB, str(WEB), P),  # node unknown
    (Caller("default", "web", node="node-1"), WEB, str(WEB), P),  # not a node proxy
    (ZT1, WEB, str(DB), I),
    (ZT1, WEB, "spiffe://x", I),
    (ZT1, SpiffeId(TD, "istio-system", "ztunnel"), None, OK),  # its own, no impersonation
])
def test_authorize(caller: Caller, requested: SpiffeId, impersonated: str | None,
                   outcome: grpc.StatusCode | None) -> None:
    def decide() -> SpiffeId:
        return authorize(caller, requested, impersonated, trusted_node_accounts=TRUSTED,
                         pods_on_node=lambda n: PODS.get(n, set()))

    if outcome is None:
        assert decide() == requested
    else:
        with pytest.raises(Denied) as info:
            decide()
        assert info.value.code == outcome


@pytest.mark.parametrize(("requested", "want"), [
    (0, timedelta(hours=24)), (-5, timedelta(hours=24)), (3600, timedelta(hours=1)),
    (10**9, timedelta(days=90)),
])
def test_clamp_ttl(requested: int, want: timedelta) -> None:
    assert clamp_ttl(requested, timedelta(hours=24), timedelta(days=90)) == want


def test_trusted_accounts() -> None:
    assert parse_trusted_accounts() == TRUSTED
    assert parse_trusted_accounts("a/b, c/d") == {("a", "b"), ("c", "d")}
    for bad in ("a", "a/", "/b", "a/b/c"):
        with pytest.raises(ValueError, match="namespace/name"):
            parse_trusted_accounts(bad)


def test_local_tokens_round_trip_and_expire() -> None:
    now = [1_000_000.0]
    auth = LocalTokenAuthenticator(b"x" * 32, clock=lambda: now[0])
    token = auth.mint_token("node-1", "istio-system", "ztunnel", ttl=timedelta(minutes=10))
    md = {"authorization": f"Bearer {token}"}
    assert asyncio.run(auth.authenticate(md, None)) == ZT1
    now[0] += 600
    with pytest.raises(Unauthenticated, match="expired"):
        asyncio.run(auth.authenticate(md, None))
    with pytest.raises(ValueError, match="32 bytes"):
        LocalTokenAuthenticator(b"short")
