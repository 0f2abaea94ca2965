"""The CA's CreateCertificate over a real grpc.aio server on loopback.

Authentication (local HMAC node tokens and Kubernetes TokenReview against the in-process API
server), CSR validation, the node-scoped impersonation rule, TTL clamping, and publication of
the ``istio-ca-root-cert`` ConfigMap.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.protobuf import struct_pb2
from k8s_apiserver import FakeApiServer

from ambient.api.istio.v1.auth import ca_pb2, ca_pb2_grpc
from ambient.ca import CertificateAuthority, generate_key, make_csr
from ambient.identity import SpiffeId
from controlplane.ca_service import (
    ROOT_CONFIGMAP,
    Authenticator,
    CertificateService,
    LocalTokenAuthenticator,
    TokenReviewAuthenticator,
    publish_root_configmaps,
)

TD = "cluster.local"
WEB = SpiffeId(TD, "default", "web")
DB = SpiffeId(TD, "default", "db")
PODS = {"node-1": {WEB}, "node-2": {DB}}
SECRET = b"s" * 32
CA = CertificateAuthority.generate(TD)


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def csr_for(*uris: str, key: Any = None) -> str:
    key = key or generate_key()
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if uris:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(u) for u in uris]), critical=True)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def request(csr: str, impersonate: str | None = None, ttl: int = 3600) -> Any:
    req = ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=ttl)
    if impersonate is not None:
        meta = struct_pb2.Struct()
        meta["ImpersonatedIdentity"] = impersonate
        req.metadata.CopyFrom(meta)
    return req


async def call(auth: Authenticator, req: Any, token: str | None,
               **service_kw: Any) -> tuple[grpc.StatusCode, str, list[str]]:
    """Start a CA server, send one request, return (code, details, chain)."""
    server = grpc.aio.server()
    CertificateService(CA, auth, lambda node: PODS.get(node, set()),
                       **service_kw).add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = ca_pb2_grpc.IstioCertificateServiceStub(ch)
            md = [("clusterid", "Kubernetes")]
            if token is not None:
                md.append(("authorization", f"Bearer {token}"))
            try:
                resp = await stub.CreateCertificate(req, metadata=md, timeout=20)
            except grpc.aio.AioRpcError as exc:
                return exc.code(), exc.details() or "", []
            return grpc.StatusCode.OK, "", list(resp.cert_chain)
    finally:
        await server.stop(None)


def leaf_of(chain: list[str]) -> x509.Certificate:
    return x509.load_pem_x509_certificate(chain[0].encode())


def uri_of(chain: list[str]) -> list[str]:
    san = leaf_of(chain).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


LOCAL = LocalTokenAuthenticator(SECRET)
ZTUNNEL_NODE1 = LOCAL.mint_token("node-1", "istio-system", "ztunnel")
WEB_TOKEN = LOCAL.mint_token("node-1", "default", "web")


def test_a_caller_gets_its_own_identity() -> None:
    code, _, chain = run(call(LOCAL, request(csr_for(str(WEB))), WEB_TOKEN))
    assert code == grpc.StatusCode.OK
    assert uri_of(chain) == [str(WEB)]
    assert chain[-1].encode() == CA.roots_pem  # leaf first, root last
    leaf_of(chain).verify_directly_issued_by(x509.load_pem_x509_certificate(CA.roots_pem))


def test_ztunnel_may_impersonate_a_pod_on_its_node() -> None:
    code, _, chain = run(call(LOCAL, request(csr_for(str(WEB)), str(WEB)), ZTUNNEL_NODE1))
    assert code == grpc.StatusCode.OK and uri_of(chain) == [str(WEB)]


@pytest.mark.parametrize(
    ("csr_id", "impersonate", "token", "code", "message"),
    [
        (DB, DB, ZTUNNEL_NODE1, grpc.StatusCode.PERMISSION_DENIED,
         f"ztunnel on node node-1 asked for {DB} but no pod with that identity runs on node-1"),
        (WEB, WEB, WEB_TOKEN, grpc.StatusCode.PERMISSION_DENIED, "not a trusted node proxy"),
        (DB, None, WEB_TOKEN, grpc.StatusCode.PERMISSION_DENIED, "only gets its own identity"),
        (WEB, DB, ZTUNNEL_NODE1, grpc.StatusCode.INVALID_ARGUMENT, "differs from the CSR"),
        (WEB, "spiffe://cluster.local/bad", ZTUNNEL_NODE1, grpc.StatusCode.INVALID_ARGUMENT,
         "not a SPIFFE ID"),
    ],
    ids=["other-node", "untrusted-caller", "other-identity", "mismatch", "bad-impersonation"],
)
def test_identity_refusals(csr_id: SpiffeId, impersonate: SpiffeId | str | None, token: str,
                           code: grpc.StatusCode, message: str) -> None:
    imp = None if impersonate is None else str(impersonate)
    got, details, chain = run(call(LOCAL, request(csr_for(str(csr_id)), imp), token))
    assert (got, chain) == (code, [])
    assert message in details


_OTHER = LocalTokenAuthenticator(b"o" * 32)
_EXPIRED = LocalTokenAuthenticator(SECRET, clock=lambda: 1_000_000.0).mint_token(
    "node-1", "istio-system", "ztunnel", ttl=timedelta(hours=1))


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (None, "no bearer token"),
        ("garbage", "not an ambient-node-v1"),
        (_OTHER.mint_token("node-1", "istio-system", "ztunnel"), "signature does not match"),
        (_EXPIRED, "expired"),
        (ZTUNNEL_NODE1[:-4] + "AAAA", "signature does not match"),
    ],
    ids=["missing", "garbage", "forged", "expired", "tampered"],
)
def test_bad_tokens_are_unauthenticated(token: str | None, message: str) -> None:
    code, details, _ = run(call(LOCAL, request(csr_for(str(WEB)), str(WEB)), token))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert message in details


@pytest.mark.parametrize(
    ("csr", "message"),
    [
        (csr_for("spiffe://other.domain/ns/default/sa/web"), "trust domain"),
        (csr_for(str(WEB), str(DB)), "exactly one SAN"),
        (csr_for(), "no subjectAltName"),
        (csr_for("https://example.com/x"), "not a workload SPIFFE ID"),
        ("-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n-----END CERTIFICATE REQUEST-----\n",
         "not a PEM PKCS#10"),
        ("not pem at all", "not a PEM PKCS#10"),
        (csr_for(str(WEB), key=ec.generate_private_key(ec.SECP384R1())), "only ECDSA P-256"),
        (csr_for(str(WEB), key=rsa.generate_private_key(65537, 1024)), "1024-bit RSA"),
    ],
    ids=["foreign-td", "two-sans", "no-san", "not-spiffe", "bad-der", "not-pem", "p384",
         "rsa1024"],
)
def test_bad_csrs_are_invalid_argument(csr: str, message: str) -> None:
    code, details, _ = run(call(LOCAL, request(csr, str(WEB)), ZTUNNEL_NODE1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details


def test_rsa_2048_is_accepted_and_the_ttl_is_clamped() -> None:
    key = rsa.generate_private_key(65537, 2048)
    req = request(csr_for(str(WEB), key=key), str(WEB), ttl=10 * 365 * 86400)
    code, _, chain = run(call(LOCAL, req, ZTUNNEL_NODE1, max_ttl=timedelta(hours=2)))
    assert code == grpc.StatusCode.OK
    leaf = leaf_of(chain)
    assert leaf.not_valid_after_utc <= datetime.now(UTC) + timedelta(hours=2)
    assert leaf.not_valid_after_utc > datetime.now(UTC) + timedelta(hours=1)


def test_zero_ttl_gets_the_default() -> None:
    code, _, chain = run(call(LOCAL, request(csr_for(str(WEB)), str(WEB), ttl=0), ZTUNNEL_NODE1,
                              default_ttl=timedelta(hours=3)))
    assert code == grpc.StatusCode.OK
    life = leaf_of(chain).not_valid_after_utc - leaf_of(chain).not_valid_before_utc
    assert timedelta(hours=3) <= life <= timedelta(hours=3, minutes=2)


def test_custom_trusted_node_accounts() -> None:
    code, details, _ = run(call(LOCAL, request(csr_for(str(WEB)), str(WEB)), ZTUNNEL_NODE1,
                                trusted_node_accounts=frozenset({("kube-system", "proxy")})))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "CA_TRUSTED_NODE_ACCOUNTS=kube-system/proxy" in details


# -- Kubernetes TokenReview -------------------------------------------------------------


@pytest.fixture
def apiserver() -> Any:
    with FakeApiServer() as srv:
        srv.add_token("zt-node-1", "system:serviceaccount:istio-system:ztunnel", extra={
            "authentication.kubernetes.io/pod-name": ["ztunnel-abcde"],
            "authentication.kubernetes.io/node-name": ["node-1"]})
        srv.add_token("zt-pod-only", "system:serviceaccount:istio-system:ztunnel", extra={
            "authentication.kubernetes.io/pod-name": ["ztunnel-fghij"]})
        srv.add_token("wrong-aud", "system:serviceaccount:istio-system:ztunnel",
                      audiences=["https://kubernetes.default.svc"])
        srv.add_token("a-user", "alice@example.com")
        yield srv


def test_token_review_allows_ztunnel_on_its_node(apiserver: FakeApiServer) -> None:
    auth = TokenReviewAuthenticator(apiserver.api_client())
    code, _, chain = run(call(auth, request(csr_for(str(WEB)), str(WEB)), "zt-node-1"))
    assert code == grpc.StatusCode.OK and uri_of(chain) == [str(WEB)]
    code, details, _ = run(call(auth, request(csr_for(str(DB)), str(DB)), "zt-node-1"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "node-1" in details
    reviews = [r for r in apiserver.requests if r.path.endswith("/tokenreviews")]
    assert len(reviews) == 2


def test_token_review_finds_the_node_through_the_pod(apiserver: FakeApiServer) -> None:
    nodes = {("istio-system", "ztunnel-fghij"): "node-2"}
    auth = TokenReviewAuthenticator(apiserver.api_client(),
                                    node_of_pod=lambda ns, pod: nodes.get((ns, pod)))
    code, _, chain = run(call(auth, request(csr_for(str(DB)), str(DB)), "zt-pod-only"))
    assert code == grpc.StatusCode.OK and uri_of(chain) == [str(DB)]


@pytest.mark.parametrize(
    ("token", "code", "message"),
    [
        ("unknown", grpc.StatusCode.UNAUTHENTICATED, "token not recognized"),
        ("wrong-aud", grpc.StatusCode.UNAUTHENTICATED, "audiences"),
        ("a-user", grpc.StatusCode.UNAUTHENTICATED, "not a service account"),
        ("zt-pod-only", grpc.StatusCode.PERMISSION_DENIED, "names no node"),
    ],
)
def test_token_review_refusals(apiserver: FakeApiServer, token: str, code: grpc.StatusCode,
                               message: str) -> None:
    auth = TokenReviewAuthenticator(apiserver.api_client())
    got, details, _ = run(call(auth, request(csr_for(str(WEB)), str(WEB)), token))
    assert got == code and message in details


def test_token_review_with_the_api_down_is_unavailable() -> None:
    with FakeApiServer() as srv:
        client = srv.api_client()
    auth = TokenReviewAuthenticator(client)  # the server is gone: connection refused
    client.configuration.retries = 0
    code, details, _ = run(call(auth, request(csr_for(str(WEB)), str(WEB)), "zt-node-1"))
    assert code == grpc.StatusCode.UNAVAILABLE and "tokenreviews" in details


# -- root publication -------------------------------------------------------------------


def test_root_configmaps_are_created_then_kept_then_fixed(apiserver: FakeApiServer) -> None:
    client = apiserver.api_client()
    assert publish_root_configmaps(client, ["default", "istio-system"], CA.roots_pem) == [
        "default", "istio-system"]
    cm = apiserver.get("ConfigMap", ROOT_CONFIGMAP, "default")
    assert cm is not None and cm["data"] == {"root-cert.pem": CA.roots_pem.decode()}
    assert publish_root_configmaps(client, ["default", "istio-system"], CA.roots_pem) == []
    other = CertificateAuthority.generate(TD)
    assert publish_root_configmaps(client, ["default"], other.roots_pem) == ["default"]
    cm = apiserver.get("ConfigMap", ROOT_CONFIGMAP, "default")
    assert cm is not None and cm["data"]["root-cert.pem"] == other.roots_pem.decode()
    assert cm["metadata"]["labels"] == {"istio.io/config": "true"}


def test_make_csr_from_ambient_ca_is_accepted() -> None:
    code, _, chain = run(call(LOCAL, request(make_csr(WEB, generate_key()).decode(), str(WEB)),
                              ZTUNNEL_NODE1))
    assert code == grpc.StatusCode.OK
