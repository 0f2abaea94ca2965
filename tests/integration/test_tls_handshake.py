"""Real mTLS handshakes on loopback (HBONE parameters) and certificate rotation.

Every refusal has its own test asserting the ``PeerVerificationError.reason`` seen by the side
that detects it.  Nothing here mocks ``ssl``; the only fakes are the clock and a CA provider
that can be told to fail.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
import threading
from collections.abc import Awaitable, Collection
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from ambient import tls
from ambient.ca import CaError, CertificateAuthority, WorkloadCertificate, generate_key
from ambient.certs import CertificateError, CertificateManager, LocalCaProvider
from ambient.identity import SpiffeId
from ambient.tls import PeerVerificationError

TD = "cluster.local"
ALICE = SpiffeId(TD, "default", "alice")
BOB = SpiffeId(TD, "default", "bob")
GUARD = 20.0  # safety net against hangs only; nothing asserts how long anything takes

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def guarded() -> T:
        return await asyncio.wait_for(coro, GUARD)

    return asyncio.run(guarded())


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate(TD)


Outcome = SpiffeId | PeerVerificationError


@dataclasses.dataclass
class Result:
    server: Outcome | None = None
    client: Outcome | None = None
    sni: list[str | None] = dataclasses.field(default_factory=list)
    client_info: dict[str, Any] = dataclasses.field(default_factory=dict)


async def handshake(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    *,
    expected: Collection[SpiffeId] | None = None,
    trust_domain: str = TD,
) -> Result:
    """One connection: server verifies the client, client verifies the server, both report."""
    res = Result()
    server_ctx.sni_callback = lambda _obj, name, _ctx: res.sni.append(name)  # type: ignore[assignment]
    server_done = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await writer.start_tls(server_ctx)
            res.server = tls.verify_peer(writer.get_extra_info("ssl_object"),
                                         trust_domain=trust_domain)
            writer.write(b"ok")
            await writer.drain()
            await reader.read(1)  # wait for the client to close
        except Exception as exc:
            if res.server is None:
                res.server = tls.classify_handshake_error(exc)
        finally:
            writer.close()
            server_done.set()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        writer = None
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx, server_hostname=""
            )
            sslobj = writer.get_extra_info("ssl_object")
            res.client_info = {
                "alpn": sslobj.selected_alpn_protocol(),
                "version": sslobj.version(),
                "cipher": sslobj.cipher()[0],
                "resumed": sslobj.session_reused,
            }
            peer = tls.verify_peer(sslobj, trust_domain=trust_domain, expected=expected)
            # TLS 1.3: the server judges our certificate after our handshake completed, so a
            # rejection only shows up on the first read.
            data = await reader.readexactly(2)
            assert data == b"ok"
            res.client = peer
        except Exception as exc:
            res.client = tls.classify_handshake_error(exc)
        finally:
            if writer is not None:
                writer.close()
        await server_done.wait()
    finally:
        server.close()
        await server.wait_closed()
    return res


def pair(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate, **kw: Any
) -> Result:
    return run(handshake(tls.server_context(server_cert), tls.client_context(client_cert), **kw))


def reason(outcome: Outcome | None) -> str:
    assert isinstance(outcome, PeerVerificationError), f"expected a refusal, got {outcome}"
    assert outcome.message  # operators get a sentence, not just a token
    return outcome.reason


# -- success --------------------------------------------------------------------------------


def test_success_both_directions(ca: CertificateAuthority) -> None:
    res = pair(ca.issue(BOB), ca.issue(ALICE), expected={BOB})
    assert res.server == ALICE  # the server learns the client's identity
    assert res.client == BOB  # the client checked the server's identity


def test_hbone_parameters_alpn_tls13_no_sni(ca: CertificateAuthority) -> None:
    res = pair(ca.issue(BOB), ca.issue(ALICE), expected={BOB})
    assert res.client == BOB
    assert res.client_info["alpn"] == "h2"
    assert res.client_info["version"] == "TLSv1.3"
    assert res.client_info["cipher"] in {"TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"}
    assert res.client_info["resumed"] is False
    assert res.sni == [None]  # the callback ran, and saw no server name


def _operator_ca(
    name: str, issuer: tuple[x509.Certificate, Any] | None = None
) -> tuple[x509.Certificate, Any]:
    """An operator-made CA certificate and key (as if from `istioctl`/cert-manager)."""
    key = generate_key()
    now = datetime.now(UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    usage = x509.KeyUsage(
        digital_signature=False, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
        encipher_only=False, decipher_only=False,
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .sign(issuer[1] if issuer else key, hashes.SHA256())
    )
    return cert, key


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def test_intermediate_ca_chain_handshake() -> None:
    root = _operator_ca("root")
    inter = _operator_ca("intermediate", root)
    root_ca = CertificateAuthority.from_pem(_pem(root[0]), _key_pem(root[1]))
    int_ca = CertificateAuthority.from_pem(
        _pem(inter[0]), _key_pem(inter[1]), _pem(inter[0]) + _pem(root[0]), _pem(root[0])
    )
    server_cert = int_ca.issue(BOB)
    assert len(server_cert.chain_pem) == 2  # leaf + intermediate are sent to the peer
    res = pair(server_cert, root_ca.issue(ALICE), expected={BOB})
    assert (res.server, res.client) == (ALICE, BOB)


# -- refusals -------------------------------------------------------------------------------


def _trusting_both(cert: WorkloadCertificate, extra_roots: bytes) -> WorkloadCertificate:
    return dataclasses.replace(cert, roots_pem=cert.roots_pem + extra_roots)


def test_expired_server_certificate(ca: CertificateAuthority) -> None:
    old = ca.issue(BOB, timedelta(hours=1), now=datetime.now(UTC) - timedelta(days=1))
    res = pair(old, ca.issue(ALICE), expected={BOB})
    assert reason(res.client) == "expired"
    # (asyncio aborts a failed handshake without flushing the alert, so the server here only
    # sees a reset; see test_alert_expired_server_cert for the alert over blocking sockets)


def test_expired_client_certificate(ca: CertificateAuthority) -> None:
    old = ca.issue(ALICE, timedelta(hours=1), now=datetime.now(UTC) - timedelta(days=1))
    res = pair(ca.issue(BOB), old, expected={BOB})
    assert reason(res.server) == "expired"


def test_foreign_ca_server(ca: CertificateAuthority) -> None:
    other = CertificateAuthority.generate(TD)
    res = pair(other.issue(BOB), ca.issue(ALICE), expected={BOB})
    assert reason(res.client) == "foreign-ca"


def test_foreign_ca_client(ca: CertificateAuthority) -> None:
    other = CertificateAuthority.generate(TD)
    res = pair(ca.issue(BOB), _trusting_both(other.issue(ALICE), ca.roots_pem), expected={BOB})
    assert reason(res.server) == "foreign-ca"


def test_wrong_trust_domain(ca: CertificateAuthority) -> None:
    # A CA for another trust domain whose root we *do* trust: the chain verifies, the
    # identity must still be refused.
    foreign_td = CertificateAuthority.generate("other.example")
    mallory = SpiffeId("other.example", "default", "alice")
    server = _trusting_both(ca.issue(BOB), foreign_td.roots_pem)
    client = _trusting_both(foreign_td.issue(mallory), ca.roots_pem)
    res = pair(server, client, expected={BOB})
    assert reason(res.server) == "wrong-trust-domain"
    res = pair(client, server, expected={mallory})  # same check on the client side
    assert reason(res.client) == "wrong-trust-domain"


def test_unexpected_san(ca: CertificateAuthority) -> None:
    res = pair(ca.issue(ALICE), ca.issue(ALICE), expected={BOB})
    assert reason(res.client) == "unexpected-san"


def test_client_without_certificate(ca: CertificateAuthority) -> None:
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.minimum_version = ssl.TLSVersion.TLSv1_3
    bare.set_alpn_protocols(["h2"])
    bare.load_verify_locations(cadata=ca.roots_pem.decode())
    res = run(handshake(tls.server_context(ca.issue(BOB)), bare, expected={BOB}))
    assert reason(res.server) == "no-certificate"


def test_no_spiffe_san() -> None:
    # A certificate from a trusted CA that names a DNS host, not a workload.
    root, root_key = _operator_ca("root")
    ca = CertificateAuthority.from_pem(_pem(root), _key_pem(root_key))
    key = generate_key()
    now = datetime.now(UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web")]))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("web.example")]), False)
        .sign(root_key, hashes.SHA256())
    )
    cert = WorkloadCertificate(
        identity=BOB, key_pem=_key_pem(key), chain_pem=[_pem(leaf)], roots_pem=ca.roots_pem,
        not_before=leaf.not_valid_before_utc, not_after=leaf.not_valid_after_utc,
    )
    res = pair(cert, ca.issue(ALICE), expected={BOB})
    assert reason(res.client) == "no-spiffe-san"


def test_tls12_only_client_refused(ca: CertificateAuthority) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    old.load_verify_locations(cadata=ca.roots_pem.decode())
    res = run(handshake(tls.server_context(ca.issue(BOB)), old))
    assert reason(res.server) == "handshake"
    assert reason(res.client) == "handshake"


def test_plaintext_peer_is_a_handshake_error(ca: CertificateAuthority) -> None:
    async def go() -> PeerVerificationError:
        result: asyncio.Future[PeerVerificationError] = asyncio.get_running_loop().create_future()
        ctx = tls.server_context(ca.issue(BOB))

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await writer.start_tls(ctx)
            except Exception as exc:
                result.set_result(tls.classify_handshake_error(exc))
            finally:
                writer.close()

        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        _, w = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await w.drain()
        try:
            return await result
        finally:
            w.close()
            server.close()
            await server.wait_closed()

    assert run(go()).reason == "handshake"


# -- alerts, seen over blocking sockets (which, unlike asyncio, flush the alert) ----------


def blocking_pair(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> Result:
    """A handshake over socket.socketpair(), server in a thread; each side classifies."""
    a, b = socket.socketpair()
    a.settimeout(GUARD)
    b.settimeout(GUARD)
    res = Result()

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                res.server = tls.verify_peer(s, trust_domain=TD)
                s.sendall(b"ok")
                s.recv(1)
        except Exception as exc:
            res.server = tls.classify_handshake_error(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname=None) as c:
            peer = tls.verify_peer(c, trust_domain=TD)
            assert c.recv(2) == b"ok"
            res.client = peer
    except Exception as exc:
        res.client = tls.classify_handshake_error(exc)
    finally:
        thread.join(GUARD)
    return res


def test_blocking_success(ca: CertificateAuthority) -> None:
    res = blocking_pair(tls.server_context(ca.issue(BOB)), tls.client_context(ca.issue(ALICE)))
    assert (res.server, res.client) == (ALICE, BOB)


def test_alert_expired_server_cert(ca: CertificateAuthority) -> None:
    old = ca.issue(BOB, timedelta(hours=1), now=datetime.now(UTC) - timedelta(days=1))
    res = blocking_pair(tls.server_context(old), tls.client_context(ca.issue(ALICE)))
    assert reason(res.client) == "expired"
    assert reason(res.server) == "expired"  # from the client's certificate_expired alert


def test_alert_expired_client_cert(ca: CertificateAuthority) -> None:
    old = ca.issue(ALICE, timedelta(hours=1), now=datetime.now(UTC) - timedelta(days=1))
    res = blocking_pair(tls.server_context(ca.issue(BOB)), tls.client_context(old))
    assert reason(res.server) == "expired"
    assert reason(res.client) == "expired"


def test_alert_foreign_ca_client(ca: CertificateAuthority) -> None:
    other = CertificateAuthority.generate(TD)
    client = dataclasses.replace(other.issue(ALICE), roots_pem=ca.roots_pem)
    res = blocking_pair(tls.server_context(ca.issue(BOB)), tls.client_context(client))
    assert reason(res.server) == "foreign-ca"
    assert reason(res.client) == "foreign-ca"  # from the server's unknown_ca alert


def test_alert_client_without_certificate(ca: CertificateAuthority) -> None:
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.load_verify_locations(cadata=ca.roots_pem.decode())
    res = blocking_pair(tls.server_context(ca.issue(BOB)), bare)
    assert reason(res.server) == "no-certificate"
    assert reason(res.client) == "no-certificate"  # from the certificate_required alert


# -- CertificateManager: rotation with live connections ------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


class FlakyProvider(LocalCaProvider):
    """A local CA that can be made to fail, counting calls."""

    def __init__(self, ca: CertificateAuthority, ttl: timedelta) -> None:
        super().__init__(ca, ttl)
        self.fail = False
        self.calls = 0
        self.gate: asyncio.Event | None = None

    async def fetch(self, identity: SpiffeId) -> WorkloadCertificate:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise CaError("istiod unavailable (test)")
        return await super().fetch(identity)


async def _serve(mgr: CertificateManager, identity: SpiffeId) -> asyncio.Server:
    """An echo server whose every new handshake asks the manager for the current context."""
    # Fetch before listening: StreamWriter.start_tls ignores bytes the stream already buffered,
    # so the handler must not yield (a first fetch would) while a ClientHello can arrive.
    await mgr.get(identity)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await writer.start_tls(await mgr.server_ctx(identity))
            while data := await reader.read(100):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handler, "127.0.0.1", 0)


async def _connect(
    mgr: CertificateManager, port: int, me: SpiffeId, server_id: SpiffeId
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=await mgr.client_ctx(me), server_hostname=""
    )
    sslobj = writer.get_extra_info("ssl_object")
    assert tls.verify_peer(sslobj, trust_domain=TD, expected={server_id}) == server_id
    serial = x509.load_der_x509_certificate(sslobj.getpeercert(binary_form=True)).serial_number
    return reader, writer, serial


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, msg: bytes) -> bytes:
    writer.write(msg)
    await writer.drain()
    return await reader.readexactly(len(msg))


def test_rotation_at_half_life_keeps_live_connections(ca: CertificateAuthority) -> None:
    async def go() -> None:
        clock = FakeClock()
        mgr = CertificateManager(LocalCaProvider(ca, timedelta(hours=1)), clock=clock)
        first = await mgr.get(BOB)
        ctx = mgr.server_context(BOB)
        assert mgr.server_context(BOB) is ctx  # built once per certificate
        assert mgr.next_due() == first.refresh_at()

        server = await _serve(mgr, BOB)
        port = server.sockets[0].getsockname()[1]
        try:
            r1, w1, serial1 = await _connect(mgr, port, ALICE, BOB)
            assert serial1 == first.serial_number
            assert await _echo(r1, w1, b"before") == b"before"

            clock.advance(timedelta(minutes=29))
            await mgr.refresh_due()
            assert (await mgr.get(BOB)).serial_number == first.serial_number  # not yet due

            clock.advance(timedelta(minutes=2))  # past half-life
            await mgr.refresh_due()
            second = await mgr.get(BOB)
            assert second.serial_number != first.serial_number
            assert mgr.server_context(BOB) is not ctx

            # the established connection is unaffected; new handshakes see the new cert
            assert await _echo(r1, w1, b"after") == b"after"
            r2, w2, serial2 = await _connect(mgr, port, ALICE, BOB)
            assert serial2 == second.serial_number
            assert await _echo(r2, w2, b"new") == b"new"
            for w in (w1, w2):
                w.close()
        finally:
            server.close()
            await server.wait_closed()
            await mgr.stop()

    run(go())


def test_background_rotation_real_clock_short_ttl(ca: CertificateAuthority) -> None:
    async def go() -> None:
        async with CertificateManager(LocalCaProvider(ca, timedelta(seconds=4))) as mgr:
            first = await mgr.get(ALICE)
            server = await _serve(mgr, BOB)
            port = server.sockets[0].getsockname()[1]
            try:
                r, w, _ = await _connect(mgr, port, ALICE, BOB)
                while (await mgr.get(ALICE)).serial_number == first.serial_number:
                    await asyncio.sleep(0.1)  # condition wait; GUARD catches a hang
                assert await _echo(r, w, b"still here") == b"still here"
                w.close()
            finally:
                server.close()
                await server.wait_closed()

    run(go())


def test_ca_failure_keeps_old_cert_and_backs_off(ca: CertificateAuthority) -> None:
    async def go() -> None:
        clock = FakeClock()
        provider = FlakyProvider(ca, timedelta(hours=1))
        mgr = CertificateManager(provider, clock=clock)
        first = await mgr.get(BOB)
        provider.fail = True
        clock.now = first.refresh_at()
        delays = []
        for _ in range(30):
            await mgr.refresh_due()
            due = mgr.next_due()
            assert due is not None
            delays.append((due - clock.now).total_seconds())
            assert (await mgr.get(BOB)).serial_number == first.serial_number  # old cert kept
            clock.now = due
            if clock.now >= first.not_after - timedelta(seconds=150):
                break
        assert delays[:8] == [1, 2, 4, 8, 16, 32, 64, 128]
        assert max(delays) == 150
        [entry] = mgr.dump()
        assert entry["state"] == "Available"

        # once it expires the cert is dropped and the identity is unavailable
        clock.now = first.not_after
        await mgr.refresh_due()
        [entry] = mgr.dump()
        assert entry["state"].startswith("Unavailable: istiod unavailable")
        assert entry["certChain"] == []
        with pytest.raises(CertificateError, match="is the CA"):
            await mgr.get(BOB)
        with pytest.raises(CertificateError):
            mgr.server_context(BOB)

        provider.fail = False  # CA back: the next use fetches at once
        clock.now = datetime.now(UTC)
        again = await mgr.get(BOB)
        assert again.serial_number != first.serial_number
        assert mgr.dump()[0]["state"] == "Available"

    run(go())


def test_concurrent_get_shares_one_fetch(ca: CertificateAuthority) -> None:
    async def go() -> None:
        provider = FlakyProvider(ca, timedelta(hours=1))
        provider.gate = asyncio.Event()
        mgr = CertificateManager(provider)
        waiters = [asyncio.create_task(mgr.get(ALICE)) for _ in range(5)]
        await asyncio.sleep(0)
        assert mgr.dump()[0]["state"] == "Initializing"
        provider.gate.set()
        certs = await asyncio.gather(*waiters)
        assert provider.calls == 1
        assert len({c.serial_number for c in certs}) == 1
        assert await mgr.get(ALICE) is certs[0]  # cached
        assert provider.calls == 1

    run(go())


def test_dump_and_forget(ca: CertificateAuthority) -> None:
    async def go() -> None:
        mgr = CertificateManager(LocalCaProvider(ca))
        cert = await mgr.get(BOB)
        await mgr.get(ALICE)
        dump = mgr.dump()
        assert [d["identity"] for d in dump] == [str(ALICE), str(BOB)]
        bob = dump[1]
        assert bob["state"] == "Available"
        [leaf] = bob["certChain"]
        assert leaf["serialNumber"] == str(cert.serial_number)
        assert leaf["pem"].startswith("-----BEGIN CERTIFICATE-----")
        assert datetime.fromisoformat(leaf["expirationTime"]) == cert.not_after
        assert datetime.fromisoformat(leaf["validFrom"]) == cert.not_before
        assert [r["pem"].encode() for r in bob["rootCerts"]] == [ca.roots_pem]
        mgr.forget(BOB)
        assert [d["identity"] for d in mgr.dump()] == [str(ALICE)]
        await mgr.stop()

    run(go())


def test_prefetch_failure_is_recorded_not_raised(ca: CertificateAuthority) -> None:
    async def go() -> None:
        provider = FlakyProvider(ca, timedelta(hours=1))
        provider.fail = True
        clock = FakeClock()
        mgr = CertificateManager(provider, clock=clock)
        mgr.prefetch(ALICE)
        while mgr.dump()[0]["state"] == "Initializing":
            await asyncio.sleep(0.01)  # condition wait; GUARD catches a hang
        assert mgr.dump()[0]["state"].startswith("Unavailable")
        provider.fail = False
        clock.advance(timedelta(seconds=1))
        await mgr.refresh_due()  # the background retry succeeds
        assert mgr.dump()[0]["state"] == "Available"

    run(go())


def test_hung_ca_times_out_and_cancelled_waiter_keeps_fetch(ca: CertificateAuthority) -> None:
    async def go() -> None:
        provider = FlakyProvider(ca, timedelta(hours=1))
        provider.gate = asyncio.Event()  # the CA does not answer
        mgr = CertificateManager(provider, fetch_timeout=timedelta(milliseconds=50))
        with pytest.raises(CertificateError, match="no answer from the CA"):
            await mgr.get(ALICE)
        assert mgr.dump()[0]["state"].startswith("Unavailable: no answer from the CA")

        # a caller that gives up does not cancel the fetch other callers share
        provider.gate.set()
        mgr2 = CertificateManager(provider)
        impatient = asyncio.create_task(mgr2.get(BOB))
        patient = asyncio.create_task(mgr2.get(BOB))
        await asyncio.sleep(0)
        impatient.cancel()
        cert = await patient
        assert cert.identity == BOB
        assert impatient.cancelled()

    run(go())
