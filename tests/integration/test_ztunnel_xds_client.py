"""ztunnel's delta xDS client against the real control-plane server, on loopback."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from ambient.api.istio.security import authorization_pb2
from ambient.api.istio.workload import workload_pb2
from ambient.ca import CertificateAuthority
from ambient.identity import SpiffeId
from ambient.store import MeshStore
from controlplane.cache import SnapshotCache
from controlplane.server import ControlPlaneServer
from controlplane.xds import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, Caller, NodeId
from ztunnel.admin import Readiness
from ztunnel.config import Settings, from_env
from ztunnel.xds_client import XdsClient, XdsConfig, build_node


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def wl(uid: str, last: int = 1, name: str = "p") -> workload_pb2.Address:
    return workload_pb2.Address(workload=workload_pb2.Workload(
        uid=uid, name=name, namespace="default", addresses=[bytes([10, 0, 0, last])]))


def bad_wl(uid: str) -> workload_pb2.Address:  # a 3-byte address: from_proto rejects it
    return workload_pb2.Address(workload=workload_pb2.Workload(
        uid=uid, name="bad", namespace="default", addresses=[b"\x0a\x00\x00"]))


def pol(name: str) -> authorization_pb2.Authorization:
    return authorization_pb2.Authorization(name=name, namespace="default")


def content(version: int = 1) -> dict[str, dict[str, Any]]:
    return {
        ADDRESS_TYPE_URL: {"u/a": wl("u/a", 1), "u/b": wl("u/b", 2, name=f"b{version}")},
        AUTHORIZATION_TYPE_URL: {"default/allow": pol("allow")},
    }


def cache_with(resources: dict[str, dict[str, Any]]) -> SnapshotCache:
    cache = SnapshotCache()
    for type_url, items in resources.items():
        cache.apply(type_url, items)
    return cache


SETTINGS = Settings(instance_ip="10.0.0.5", pod_name="ztunnel-x", pod_namespace="istio-system",
                    node_name="node-1")


def plain_config(port: int) -> XdsConfig:
    return XdsConfig(f"127.0.0.1:{port}", True, build_node(SETTINGS, {}))


@asynccontextmanager
async def serving(cache: SnapshotCache, addr: str = "127.0.0.1:0",
                  **kw: Any) -> AsyncIterator[ControlPlaneServer]:
    srv = ControlPlaneServer(cache, plain_addr=addr, **kw)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(None)


@asynccontextmanager
async def client_running(client: XdsClient) -> AsyncIterator[XdsClient]:
    task = asyncio.create_task(client.run())
    try:
        yield client
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def until(cond: Callable[[], bool]) -> None:
    for _ in range(2000):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never became true")


def uids(store: MeshStore) -> set[str]:
    return set(store.snapshot.workloads)


# -- convergence and readiness ----------------------------------------------------------------


def test_store_converges_and_readiness_follows_the_first_acks() -> None:
    async def main() -> None:
        cache = cache_with(content())
        store = MeshStore()
        readiness = Readiness()
        token = readiness.register("state manager")
        async with serving(cache) as srv:
            client = XdsClient(plain_config(srv.plain_port or 0), store, on_synced=token.done)
            async with client_running(client):
                await until(lambda: readiness.ready)
                assert uids(store) == {"u/a", "u/b"}
                assert set(store.snapshot.policies) == {"default/allow"}
                assert client.connected and client.state.nacks == 0
                [stream] = srv.ads.streams.values()
                assert stream.node == NodeId("ztunnel", "10.0.0.5", "ztunnel-x", "istio-system",
                                             "istio-system.svc.cluster.local")
                assert stream.node_proto is not None
                meta = stream.node_proto.metadata.fields
                assert meta["NODE_NAME"].string_value == "node-1"
                assert meta["INSTANCE_IPS"].string_value == "10.0.0.5"

                cache.apply(ADDRESS_TYPE_URL, {"u/c": wl("u/c", 3)}, {"u/a"})
                await until(lambda: uids(store) == {"u/b", "u/c"})
                cache.apply(AUTHORIZATION_TYPE_URL, {"default/deny": pol("deny")},
                            {"default/allow"})
                await until(lambda: set(store.snapshot.policies) == {"default/deny"})
                assert client.state.known[ADDRESS_TYPE_URL] == {
                    n: e.version for n, e in cache.resources(ADDRESS_TYPE_URL).items()}

    run(main())


def test_a_bad_resource_is_nacked_and_the_store_keeps_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        cache = cache_with(content())
        cache.apply(ADDRESS_TYPE_URL, {"u/bad": bad_wl("u/bad")})
        store = MeshStore()
        synced: list[bool] = []
        async with serving(cache) as srv:
            client = XdsClient(plain_config(srv.plain_port or 0), store,
                               on_synced=lambda: synced.append(True))
            async with client_running(client):
                await until(lambda: uids(store) == {"u/a", "u/b"}
                            and bool(store.snapshot.policies))
                [stream] = srv.ads.streams.values()
                await until(lambda: stream.types[ADDRESS_TYPE_URL].nacks == 1)
                assert "u/bad" not in client.state.known[ADDRESS_TYPE_URL]
                # ztunnel marks a type synced only on ACK: not ready yet.
                assert synced == [] and client.state.acked_types == {AUTHORIZATION_TYPE_URL}

                # A bad change to a good workload keeps its last good version.
                good_b = store.snapshot.workload_by_uid("u/b")
                cache.apply(ADDRESS_TYPE_URL, {"u/b": bad_wl("u/b")})
                await until(lambda: stream.types[ADDRESS_TYPE_URL].nacks == 2)
                assert store.snapshot.workload_by_uid("u/b") == good_b

                # Fixing the source: the next push is clean, ACKed, and the proxy is ready.
                cache.apply(ADDRESS_TYPE_URL, {"u/bad": wl("u/bad", 9), "u/b": wl("u/b", 8)})
                await until(lambda: synced == [True])
                assert uids(store) == {"u/a", "u/b", "u/bad"}
                assert stream.types[ADDRESS_TYPE_URL].acks >= 1
        assert "rejected" in caplog.text and "u/bad" in caplog.text

    run(main())


def test_server_restart_client_reconnects_and_resumes() -> None:
    async def main() -> None:
        store = MeshStore()
        async with serving(cache_with(content(1))) as first:
            port = first.plain_port or 0
            client = XdsClient(plain_config(port), store, rng=lambda: 0.0)
            async with client_running(client):
                await until(lambda: client.state.synced)
                assert store.snapshot.workload_by_uid("u/b").name == "b1"  # type: ignore
                await first.stop(None)
                await until(lambda: not client.connected)
                # Disconnected: the last good state stays in force.
                assert uids(store) == {"u/a", "u/b"}
                # A new control plane (rebuilt from the objects, one of them changed).
                changed = content(2)
                changed[ADDRESS_TYPE_URL]["u/d"] = wl("u/d", 4)
                async with serving(cache_with(changed), f"127.0.0.1:{port}") as second:
                    await until(lambda: client.streams == 2 and bool(second.ads.streams))
                    await until(lambda: "u/d" in uids(store))
                    assert store.snapshot.workload_by_uid("u/b").name == "b2"  # type: ignore
                    [stream] = second.ads.streams.values()
                    # Only what differed was sent: u/b (changed) and u/d (new).
                    assert stream.resources_sent == 2

    run(main())


def test_tls_with_root_ca_alt_hostname_and_token(tmp_path: Path) -> None:
    ca = CertificateAuthority.generate()
    root = tmp_path / "root-cert.pem"
    root.write_bytes(ca.roots_pem)
    token_file = tmp_path / "istio-token"
    token_file.write_text("tok-1\n")
    seen: list[dict[str, str]] = []

    def auth(metadata: dict[str, str], peer: SpiffeId | None) -> Caller:
        seen.append(dict(metadata))
        return Caller("spiffe://cluster.local/ns/istio-system/sa/ztunnel", "token")

    async def main() -> None:
        cache = cache_with(content())
        async with serving(cache, addr="127.0.0.1:0", tls_addr="127.0.0.1:0", ca=ca,
                           authenticator=auth) as srv:
            env = {
                "XDS_ADDRESS": f"https://127.0.0.1:{srv.tls_port}",
                "XDS_ROOT_CA": str(root), "ALT_XDS_HOSTNAME": "istiod.istio-system.svc",
                "AUTH_TOKEN": str(token_file), "CLUSTER_ID": "c1", "XDS_HEADER_X_TENANT": "t",
                "INSTANCE_IP": "10.0.0.7", "POD_NAME": "zt", "POD_NAMESPACE": "istio-system",
                "ISTIO_META_DNS_CAPTURE": "true", "ISTIO_METAJSON_LABELS": '{"app": "zt"}',
            }
            settings = from_env(env)
            store = MeshStore()
            client = XdsClient(XdsConfig.from_settings(settings, env), store)
            async with client_running(client):
                await until(lambda: client.state.synced)
            assert uids(store) == {"u/a", "u/b"}
            assert seen[0]["authorization"] == "Bearer tok-1"
            assert seen[0]["clusterid"] == "c1" and seen[0]["x_tenant"] == "t"

            # A wrong expected hostname: never connects, and says why.
            bad = XdsClient(XdsConfig.from_settings(
                from_env({**env, "ALT_XDS_HOSTNAME": "nope.example"}), env), MeshStore())
            async with client_running(bad):
                await until(lambda: bad.last_error is not None)
            assert not bad.state.synced and "UNAVAILABLE" in (bad.last_error or "")

    run(main())


def test_node_identity_and_metadata() -> None:
    env = {"ISTIO_META_DNS_CAPTURE": "true", "ISTIO_METAJSON_LABELS": '{"app": "zt"}',
           "ISTIO_METAJSON_BROKEN": "{nope", "OTHER": "x"}
    node = build_node(SETTINGS, env)
    assert node.id == "ztunnel~10.0.0.5~ztunnel-x.istio-system~istio-system.svc.cluster.local"
    fields = json.loads(json.dumps({k: v for k, v in _struct(node.metadata).items()}))
    assert fields == {"NAME": "ztunnel-x", "NAMESPACE": "istio-system",
                      "INSTANCE_IPS": "10.0.0.5", "NODE_NAME": "node-1",
                      "DNS_CAPTURE": "true", "LABELS": {"app": "zt"}}
    # The default INSTANCE_IP is ztunnel's placeholder, and the id still parses.
    NodeId.parse(build_node(Settings(), {}).id)


def test_unreachable_control_plane_backs_off(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with serving(SnapshotCache()) as srv:
            port = srv.plain_port or 0
        client = XdsClient(plain_config(port), MeshStore(), rng=lambda: 0.0)
        with caplog.at_level(logging.WARNING, logger="ztunnel.xds"):
            async with client_running(client):
                await until(lambda: caplog.text.count("failed") >= 3)
        assert "is the control plane running" in caplog.text
        assert not client.connected and client.streams == 0

    run(main())


def _struct(s: Any) -> dict[str, Any]:
    from google.protobuf import json_format

    return json_format.MessageToDict(s)


# -- the whole control plane: source -> pipeline -> cache -> server -> ztunnel ----------------


class ScriptedSource:
    """Delivers the demo manifests as a resync, then whatever the test queues."""

    def __init__(self, objects: list[dict[str, Any]]) -> None:
        self.objects = objects
        self.more: asyncio.Queue[Any] = asyncio.Queue()

    async def run(self, sink: Callable[[Any], None]) -> None:
        from controlplane.objects import Update, object_key

        sink(Update(upserts={object_key(o): o for o in self.objects}, resync=True))
        while True:
            sink(await self.more.get())


def test_controlplane_main_feeds_ztunnel_from_manifests() -> None:
    import yaml

    from controlplane.main import Options
    from controlplane.main import run as run_controlplane
    from controlplane.objects import Update

    demo = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"
    objects = [d for d in yaml.safe_load_all(demo.read_text()) if d]
    pod = next(o for o in objects if o.get("kind") == "Pod"
               and o["metadata"]["name"] == "frontend")
    uid = f"Kubernetes//Pod/{pod['metadata']['namespace']}/frontend"

    async def main() -> None:
        source = ScriptedSource(objects)
        stop = asyncio.Event()
        started: asyncio.Queue[ControlPlaneServer] = asyncio.Queue()
        cp = asyncio.create_task(run_controlplane(
            Options(manifests=demo, xds_plain="127.0.0.1:0"), feed=source.run, stop=stop,
            on_started=started.put_nowait))
        srv = await asyncio.wait_for(started.get(), 30)
        store = MeshStore()
        client = XdsClient(plain_config(srv.plain_port or 0), store)
        async with client_running(client):
            await until(lambda: client.state.synced)
            assert uid in uids(store) and len(uids(store)) == len(_pods(objects))
            assert "shop/db-allow-backend" in store.snapshot.policies
            await source.more.put(Update(deletes={f"Pod/{pod['metadata']['namespace']}/frontend"}))
            await until(lambda: uid not in uids(store))
        stop.set()
        assert await cp == 0

    run(main())


def _pods(objects: list[dict[str, object]]) -> list[dict[str, object]]:
    return [o for o in objects if o.get("kind") == "Pod"]


def test_controlplane_main_with_the_local_manifests_source(tmp_path: Path) -> None:
    import yaml

    from controlplane.main import Options
    from controlplane.main import run as run_controlplane

    demo = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"
    objects = [d for d in yaml.safe_load_all(demo.read_text()) if d]
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "cluster.yaml").write_text(demo.read_text())
    ca_dir = tmp_path / "ca"

    async def main() -> None:
        stop = asyncio.Event()
        started: asyncio.Queue[ControlPlaneServer] = asyncio.Queue()
        cp = asyncio.create_task(run_controlplane(
            Options(manifests=manifests, xds_plain="127.0.0.1:0", xds_tls="127.0.0.1:0",
                    ca_dir=ca_dir), stop=stop, on_started=started.put_nowait))
        srv = await asyncio.wait_for(started.get(), 30)
        assert (ca_dir / "root-cert.pem").exists()  # created on first start
        env = {"XDS_ADDRESS": f"127.0.0.1:{srv.tls_port}", "XDS_ROOT_CA": str(
            ca_dir / "root-cert.pem"), "ALT_XDS_HOSTNAME": "istiod.istio-system.svc"}
        store = MeshStore()
        client = XdsClient(XdsConfig.from_settings(from_env(env), env), store)
        async with client_running(client):
            await until(lambda: client.state.synced)
            assert len(uids(store)) == len(_pods(objects))
            kept = [o for o in objects if not (o.get("kind") == "Pod"
                                               and o["metadata"]["name"] == "frontend")]
            (manifests / "cluster.yaml").write_text(yaml.safe_dump_all(kept))
            await until(lambda: len(uids(store)) == len(_pods(objects)) - 1)
        stop.set()
        assert await cp == 0

    run(main())
