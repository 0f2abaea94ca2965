"""The fuzz targets: every parser of untrusted input, with its harness and seed inputs.

A target's ``run(data)`` must return normally for every ``data``; anything it raises is a
finding (a crash), a run that does not finish within the runner's timeout is a hang, and a
process that outgrows the runner's RSS limit is unbounded growth.  ``seeds()`` are valid
inputs that start the coverage-guided search from well-formed messages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fuzz import targets_cp as cp
from fuzz import targets_net as net
from fuzz import targets_waypoint as wp


@dataclass(frozen=True)
class Target:
    name: str
    entry: str  # the entry point under test, for the report
    run: Callable[[bytes], None]
    seeds: Callable[[], list[bytes]]
    max_len: int = 4096  # longest input the long run generates


TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("hbone_server", "ambient.hbone.protocol.HboneServerProtocol.receive_data",
           net.hbone_server, net.hbone_server_seeds, 8192),
    Target("hbone_client", "ambient.hbone.protocol.HboneClientProtocol.receive_data",
           net.hbone_client, net.hbone_client_seeds, 8192),
    Target("hbone_authority", "ambient.hbone.protocol.parse_authority",
           net.hbone_authority, net.hbone_authority_seeds, 512),
    Target("zds", "ambient.zds.decode_request / decode_ack / decode_hello",
           net.zds_datagram, net.zds_seeds, 1200),
    Target("cni_plugin", "cni.plugin.run (stdin, env, agent reply)",
           net.cni_plugin, net.cni_plugin_seeds),
    Target("cni_frames", "cni.events.FrameDecoder.feed",
           net.cni_frames, net.cni_frames_seeds),
    Target("grpc_client", "ambient.grpclite.ClientCore.receive",
           net.grpc_client, net.grpc_client_seeds, 8192),
    Target("xds_client", "ztunnel.xds_client.XdsClientState.handle_response + model.from_proto",
           cp.xds_client, cp.xds_client_seeds, 16384),
    Target("xds_server", "controlplane.xds.DeltaStream.handle_request",
           cp.xds_server, cp.xds_server_seeds),
    Target("xds_node_id", "controlplane.xds.NodeId.parse", cp.node_id, cp.node_id_seeds, 512),
    Target("manifests", "ambient.config.manifests.translate_manifests / Translator.apply",
           cp.manifests_translate, cp.manifests_seeds, 8192),
    Target("local_config", "ambient.config.local.parse_local_config",
           cp.local_config, lambda: [b"\x01" + cp.LOCAL_CONFIG.encode()]),
    Target("local_source", "controlplane.local_source.parse_manifests",
           cp.local_source, lambda: [cp.MANIFESTS.encode()], 8192),
    Target("csr", "controlplane.ca_service.validate_csr + ambient.ca.sign_csr",
           cp.csr, cp.csr_seeds),
    Target("cert_chain",
           "ambient.workloadcert.workload_certificate_from_chain + ambient.certs.verify_chain",
           cp.cert_chain, cp.cert_chain_seeds, 8192),
    Target("spiffe_id", "ambient.identity.SpiffeId.parse (+ controlplane.xds.peer_identity)",
           cp.spiffe_id, cp.spiffe_seeds, 512),
    Target("waypoint_l7", "waypoint.l7.build_config + route / authorize / admit / pick_backend",
           wp.waypoint_l7, wp.waypoint_seeds),
    Target("waypoint_h1", "waypoint.h1.serve_h1 (downstream HTTP/1.1)",
           wp.waypoint_h1, wp.waypoint_h1_seeds),
]}
