"""Protobuf definitions of the ambient wire contract, and their generated Python modules.

The ``.proto`` sources are our own, written to be wire compatible with Istio ambient: they
declare the same proto packages, message names, field names and field numbers as upstream.

* ``ambient.api.istio.workload.workload_pb2`` -- ``istio.workload``: ``Address`` (a
  ``Workload`` or a ``Service``) and their parts; served over delta xDS as
  :data:`ADDRESS_TYPE_URL`.
* ``ambient.api.istio.security.authorization_pb2`` -- ``istio.security.Authorization``, the L4
  policy resource, served as :data:`AUTHORIZATION_TYPE_URL`.
* ``ambient.api.istio.workload.zds.zds_pb2`` -- ``istio.workload.zds``, the node-local protocol
  between the CNI agent and the node proxy.
* ``ambient.api.istio.v1.auth.ca_pb2`` / ``ca_pb2_grpc`` -- ``istio.v1.auth``, the
  ``IstioCertificateService`` CA API.
* ``ambient.api.envoy.service.discovery.v3.discovery_pb2`` / ``ads_pb2_grpc`` -- the delta xDS
  messages and ``AggregatedDiscoveryService.DeltaAggregatedResources``; with
  ``ambient.api.envoy.config.core.v3.base_pb2`` (``Node``) and
  ``ambient.api.google.rpc.status_pb2`` (``google.rpc.Status``).

The ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` files are generated and committed;
regenerate them with ``make proto`` (``python -m ambient.api.generate``) after editing a
``.proto``. ``tests/unit/test_proto_gen.py`` fails when they are stale.
"""

TYPE_URL_PREFIX = "type.googleapis.com/"
"""Prefix of every ``google.protobuf.Any`` type URL used by xDS."""

ADDRESS_TYPE_URL = "type.googleapis.com/istio.workload.Address"
"""xDS resource type for workloads and services (``istio.workload.Address``)."""

AUTHORIZATION_TYPE_URL = "type.googleapis.com/istio.security.Authorization"
"""xDS resource type for L4 authorization policies (``istio.security.Authorization``)."""

WORKLOAD_TYPE_URL = "type.googleapis.com/istio.workload.Workload"
"""Bare workload resource type; istiod knows it, ztunnel does not subscribe to it."""

__all__ = [
    "ADDRESS_TYPE_URL",
    "AUTHORIZATION_TYPE_URL",
    "TYPE_URL_PREFIX",
    "WORKLOAD_TYPE_URL",
]
