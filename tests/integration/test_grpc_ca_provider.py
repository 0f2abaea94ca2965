"""CertificateManager(GrpcCaProvider) against the real CA server over gRPC on loopback.

Fetch with token and impersonation, chain verification, rotation at half-life, and a CA that
is down during rotation (the old certificate is kept, retries back off, then it rotates).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from ambient.api.istio.v1.auth import ca_pb2, ca_pb2_grpc
from ambient.ca import CertificateAuthority
from ambient.certs import CertificateError, CertificateManager, GrpcCaProvider, verify_chain
from ambient.identity import SpiffeId
from controlplane.ca_service import (
    Caller,
    CertificateService,
    LocalTokenAuthenticator,
    write_token_file,
)

TD = "cluster.local"
WEB = SpiffeId(TD, "default", "web")
DB = SpiffeId(TD, "default", "db")
PODS = {"node-1": {WEB}, "node-2": {DB}}
CA = CertificateAuthority.generate(TD)
AUTH = LocalTokenAuthenticator(b"k" * 32)


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 90))


class Recording:
    """Wraps an authenticator and remembers the metadata of each call."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []

    async def authenticate(self, metadata: Mapping[str, str],
                           peer_identity: SpiffeId | None) -> Caller:
        self.seen.append(dict(metadata))
        return await AUTH.authenticate(metadata, peer_identity)


async def start_ca(port: int = 0, auth: Any = AUTH,
                   tls: tuple[bytes, bytes] | None = None) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    CertificateService(CA, auth, lambda n: PODS.get(n, set())).add_to_server(server)
    if tls is None:
        port = server.add_insecure_port(f"127.0.0.1:{port}")
    else:
        creds = grpc.ssl_server_credentials([(tls[1], tls[0])])
        port = server.add_secure_port(f"127.0.0.1:{port}", creds)
    await server.start()
    return server, port


def token_file(tmp_path: Path, node: str = "node-1") -> str:
    path = tmp_path / "istio-token"
    write_token_file(path, AUTH.mint_token(node, "istio-system", "ztunnel"))
    return str(path)


def test_fetch_sends_token_cluster_and_impersonation(tmp_path: Path) -> None:
    async def main() -> None:
        rec = Recording()
        server, port = await start_ca(auth=rec)
        provider = GrpcCaProvider(f"127.0.0.1:{port}", None, token_file(tmp_path), "c1",
                                  headers={"X-Extra": "yes"})
        try:
            async with CertificateManager(provider) as mgr:
                cert = await mgr.get(WEB)
            assert cert.identity == WEB and cert.roots_pem == CA.roots_pem
            verify_chain(cert)
            md = rec.seen[0]
            assert md["clusterid"] == "c1" and md["x-extra"] == "yes"
            assert md["authorization"].startswith("Bearer ambient-node-v1.")
        finally:
            await provider.close()
            await server.stop(None)

    run(main())


def test_token_is_reread_on_every_call(tmp_path: Path) -> None:
    async def main() -> None:
        server, port = await start_ca()
        path = token_file(tmp_path, "node-1")
        provider = GrpcCaProvider(f"127.0.0.1:{port}", None, path)
        try:
            assert (await provider.fetch(WEB)).identity == WEB
            with pytest.raises(CertificateError, match="PERMISSION_DENIED.*node-1"):
                await provider.fetch(DB)
            token_file(tmp_path, "node-2")  # the projected token was rotated/replaced
            assert (await provider.fetch(DB)).identity == DB
            Path(path).unlink()
            with pytest.raises(CertificateError, match="AUTH_TOKEN"):
                await provider.fetch(DB)
        finally:
            await provider.close()
            await server.stop(None)

    run(main())


class _Rogue(ca_pb2_grpc.IstioCertificateServiceServicer):
    """Answers with a chain that must be refused."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    async def CreateCertificate(self, request: Any, context: Any) -> Any:  # noqa: N802
        if self.mode == "foreign-root":
            chain = CA.sign_csr(request.csr.encode(), WEB)
            chain[-1] = CertificateAuthority.generate(TD).roots_pem.decode()
        elif self.mode == "wrong-identity":
            chain = CA.sign_csr(request.csr.encode(), DB)
        else:
            chain = CA.sign_csr(request.csr.encode(), WEB)[:1]
        return ca_pb2.IstioCertificateResponse(cert_chain=chain)


@pytest.mark.parametrize(("mode", "message"), [
    ("foreign-root", "does not lead to any"),
    ("wrong-identity", "but spiffe://cluster.local/ns/default/sa/web was requested"),
    ("no-root", "expected the leaf first and the root last"),
])
def test_bad_chains_are_refused(mode: str, message: str) -> None:
    async def main() -> None:
        server = grpc.aio.server()
        ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(_Rogue(mode), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        provider = GrpcCaProvider(f"127.0.0.1:{port}", None, None)
        try:
            with pytest.raises(CertificateError, match=message):
                await provider.fetch(WEB)
        finally:
            await provider.close()
            await server.stop(None)

    run(main())


def test_rotation_at_half_life_and_ca_down_during_rotation(tmp_path: Path) -> None:
    async def main() -> None:
        now = [datetime.now(UTC)]
        server, port = await start_ca()
        provider = GrpcCaProvider(f"127.0.0.1:{port}", None, token_file(tmp_path),
                                  ttl=timedelta(hours=2), timeout=timedelta(seconds=5))
        mgr = CertificateManager(provider, clock=lambda: now[0],
                                 min_backoff=timedelta(seconds=1))
        try:
            first = await mgr.get(WEB)
            assert mgr.next_due() == first.refresh_at()
            # Half-life reached: rotated, a new serial.
            now[0] = first.refresh_at() + timedelta(seconds=1)
            await mgr.refresh_due()
            second = await mgr.get(WEB)
            assert second.serial_number != first.serial_number
            # The CA goes away just before the next rotation.
            await server.stop(None)
            due = mgr.next_due()
            assert due is not None and due > now[0]
            now[0] = due + timedelta(seconds=1)
            await mgr.refresh_due()
            assert (await mgr.get(WEB)).serial_number == second.serial_number  # kept
            assert mgr.next_due() == now[0] + timedelta(seconds=1)
            assert mgr.dump()[0]["state"] == "Available"
            now[0] += timedelta(seconds=2)
            await mgr.refresh_due()
            assert mgr.next_due() == now[0] + timedelta(seconds=2)  # backoff doubled
            assert (await mgr.get(WEB)).serial_number == second.serial_number
            # The CA comes back on the same address: the next attempt rotates.
            server, _ = await start_ca(port)
            for _ in range(40):  # the channel may still be reconnecting for a few attempts
                due = mgr.next_due()
                assert due is not None
                now[0] = max(now[0], due) + timedelta(milliseconds=1)
                await mgr.refresh_due()
                if (await mgr.get(WEB)).serial_number != second.serial_number:
                    break
                await asyncio.sleep(0.1)
            third = await mgr.get(WEB)
            assert third.serial_number != second.serial_number
            due = mgr.next_due()  # the next refresh is half a lifetime away, not a backoff
            assert due is not None and due - now[0] > timedelta(minutes=10)
        finally:
            await mgr.stop()
            await provider.close()
            await server.stop(None)

    run(main())


def test_prefetch_fetches_in_the_background(tmp_path: Path) -> None:
    async def main() -> None:
        server, port = await start_ca()
        provider = GrpcCaProvider(f"127.0.0.1:{port}", None, token_file(tmp_path))
        mgr = CertificateManager(provider)
        try:
            mgr.prefetch(WEB)
            for _ in range(500):
                if mgr.dump()[0]["state"] == "Available":
                    break
                await asyncio.sleep(0.01)
            assert mgr.dump()[0]["state"] == "Available"
            assert mgr.dump()[0]["identity"] == str(WEB)
        finally:
            await mgr.stop()
            await provider.close()
            await server.stop(None)

    run(main())


def _tls_server_cert(hostname: str) -> tuple[bytes, bytes, bytes]:
    """(root pem, server cert pem, server key pem) for a CA server named ``hostname``."""
    from cryptography.hazmat.primitives.asymmetric import ec

    now = datetime.now(UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test root")])
    root = (x509.CertificateBuilder().subject_name(root_name).issuer_name(root_name)
            .public_key(root_key.public_key()).serial_number(1)
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(root_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
            .issuer_name(root_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            .sign(root_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return (root.public_bytes(pem), cert.public_bytes(pem),
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def test_tls_to_the_ca_with_alt_hostname(tmp_path: Path) -> None:
    async def main() -> None:
        root, cert, key = _tls_server_cert("istiod.istio-system.svc")
        server, port = await start_ca(tls=(cert, key))
        good = GrpcCaProvider(f"127.0.0.1:{port}", root, token_file(tmp_path),
                              alt_hostname="istiod.istio-system.svc")
        wrong_root = GrpcCaProvider(f"127.0.0.1:{port}", _tls_server_cert("x")[0],
                                    token_file(tmp_path), alt_hostname="istiod.istio-system.svc",
                                    timeout=timedelta(seconds=3))
        try:
            assert (await good.fetch(WEB)).identity == WEB
            with pytest.raises(CertificateError, match="UNAVAILABLE"):
                await wrong_root.fetch(WEB)
        finally:
            await good.close()
            await wrong_root.close()
            await server.stop(None)

    run(main())


def test_ztunnel_settings_build_a_working_grpc_provider(tmp_path: Path) -> None:
    from ztunnel.config import from_env
    from ztunnel.main import cert_provider

    async def main() -> None:
        server, port = await start_ca()
        env = {"CA_ADDRESS": f"http://127.0.0.1:{port}", "AUTH_TOKEN": token_file(tmp_path),
               "CLUSTER_ID": "c9", "SECRET_TTL": "1h", "CA_HEADER_X_TEAM": "mesh"}
        provider = cert_provider(from_env(env), None)
        assert isinstance(provider, GrpcCaProvider)
        try:
            cert = await provider.fetch(WEB)
            assert cert.identity == WEB
            assert timedelta(minutes=59) <= cert.not_after - cert.not_before <= timedelta(
                minutes=62)
        finally:
            await provider.close()
            await server.stop(None)
        with pytest.raises(OSError, match="CA_ROOT_CA"):
            cert_provider(from_env({"CA_ADDRESS": "https://istiod:15012",
                                    "CA_ROOT_CA": str(tmp_path / "missing.pem")}), None)

    run(main())
