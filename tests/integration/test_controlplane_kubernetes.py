"""The control plane process in Kubernetes mode, against the in-process API server with the
real ``kubernetes`` client: it lists/watches the cluster, serves delta xDS and the CA on TLS
to callers that prove their ServiceAccount by TokenReview, lets a node proxy impersonate only
pods on its own node, and publishes the root as ConfigMap ``istio-ca-root-cert``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from k8s_apiserver import FakeApiServer

from ambient.api.envoy.config.core.v3 import base_pb2
from ambient.api.envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from ambient.certs import CertificateError, GrpcCaProvider
from ambient.identity import SpiffeId
from controlplane.main import Options, run
from controlplane.server import ControlPlaneServer

ADDRESS = "type.googleapis.com/istio.workload.Address"
NODE_ID = "ztunnel~10.0.0.1~ztunnel-abc.istio-system~istio-system.svc.cluster.local"
ZTUNNEL = "system:serviceaccount:istio-system:ztunnel"
HOST = "istiod.istio-system.svc"


def _objects(api: FakeApiServer) -> None:
    api.create({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}})
    for name, node, sa, ip in (("web", "node1", "web", "10.1.0.5"),
                               ("db", "node2", "db", "10.2.0.5")):
        api.create({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": name, "namespace": "shop", "labels": {"app": name}},
                    "spec": {"nodeName": node, "serviceAccountName": sa,
                             "containers": [{"name": "app", "image": "x"}]},
                    "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                               "conditions": [{"type": "Ready", "status": "True"}]}})


async def _xds_names(port: int, roots: bytes, token: str | None) -> list[str]:
    creds = grpc.ssl_channel_credentials(roots)
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=[
            ("grpc.ssl_target_name_override", HOST)]) as ch:
        md = [("authorization", f"Bearer {token}")] if token else []
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch).DeltaAggregatedResources(
            metadata=md)
        req = discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS,
                                                  resource_names_subscribe=["*"])
        req.node.CopyFrom(base_pb2.Node(id=NODE_ID))
        await call.write(req)
        resp = await asyncio.wait_for(call.read(), 10)
        call.cancel()
        return sorted(r.name for r in resp.resources)


def test_kubernetes_mode_serves_xds_and_ca_to_token_holders(tmp_path: Path) -> None:
    with FakeApiServer() as api:
        _objects(api)
        api.add_token("node1-token", ZTUNNEL,
                      extra={"authentication.kubernetes.io/node-name": ["node1"]},
                      audiences=["istio-ca"])
        api.add_token("web-token", "system:serviceaccount:shop:web", audiences=["istio-ca"])
        token_file = tmp_path / "token"

        async def main() -> None:
            started: asyncio.Future[ControlPlaneServer] = (
                asyncio.get_running_loop().create_future())
            stop = asyncio.Event()
            opts = Options(manifests=None, xds_plain=None, xds_tls="127.0.0.1:0",
                           ca_dir=tmp_path / "ca", kubernetes=True)
            task = asyncio.create_task(run(opts, stop=stop, api=api.api_client(),
                                           on_started=started.set_result))
            try:
                srv = await asyncio.wait_for(started, 20)
                assert srv.tls_port and srv.ca is not None
                roots = srv.ca.roots_pem

                # xDS: the token holder gets the translated workloads, an anonymous caller not.
                names = await _xds_names(srv.tls_port, roots, "node1-token")
                assert any(n.endswith("/shop/web") for n in names), names
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await _xds_names(srv.tls_port, roots, None)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

                # CA: node1's ztunnel may impersonate web (on node1), not db (on node2).
                async def fetch(identity: SpiffeId, token: str, impersonate: bool = True) -> Any:
                    token_file.write_text(token)
                    p = GrpcCaProvider(f"127.0.0.1:{srv.tls_port}", roots, str(token_file),
                                       alt_hostname=HOST, impersonate=impersonate)
                    try:
                        return await p.fetch(identity)
                    finally:
                        await p.close()

                web = SpiffeId("cluster.local", "shop", "web")
                cert = await fetch(web, "node1-token")
                assert cert.identity == web
                with pytest.raises(CertificateError, match="node2|node1"):
                    await fetch(SpiffeId("cluster.local", "shop", "db"), "node1-token")
                with pytest.raises(CertificateError):
                    await fetch(web, "forged-token")
                # A workload's own token gets its own identity; it may not impersonate.
                assert (await fetch(web, "web-token", impersonate=False)).identity == web
                with pytest.raises(CertificateError):
                    await fetch(web, "web-token")
            finally:
                stop.set()
                assert await asyncio.wait_for(task, 20) == 0

        asyncio.run(main())

        # The root is published where pods expect it.
        cm = api.get("ConfigMap", "istio-ca-root-cert", "shop")
        assert cm is not None and "BEGIN CERTIFICATE" in cm["data"]["root-cert.pem"]
