"""The waypoint's request series key: ``RequestRecord.finish`` counts each request in the
series ``RequestRecord.labels`` describes (same values, ``HTTP_LABELS`` order), and the
cached peer labels follow the objects they were made from."""

from __future__ import annotations

import pytest

from ambient.model import Service, Workload
from waypoint.telemetry import HTTP_LABELS, RequestRecord, WaypointMetrics, peer_key

SRC = Workload(uid="s", name="client-0", namespace="app", workload_name="client",
               canonical_name="client", canonical_revision="v1")
DST = Workload(uid="d", name="server-0", namespace="app", service_account="server",
               workload_name="server", canonical_name="server", canonical_revision="v2")
SVC = Service(name="server", namespace="app", hostname="server.app.svc.cluster.local")


@pytest.mark.parametrize("src, dst, svc, grpc, status, grpc_status, flags", [
    (SRC, DST, SVC, False, 200, None, []),
    (None, None, None, False, 503, None, ["UF", "URX"]),
    (SRC, None, SVC, True, 200, "14", ["UH"]),
    (None, DST, None, True, 404, None, []),
])
def test_finish_counts_the_series_labels_describe(
        src: Workload | None, dst: Workload | None, svc: Service | None, grpc: bool,
        status: int, grpc_status: str | None, flags: list[str]) -> None:
    m = WaypointMetrics("test")
    rec = RequestRecord(m, ("10.0.0.1", 1234), src, "spiffe://cluster.local/ns/app/sa/c",
                        "GET", "server", "/", "HTTP/1.1", grpc, service=svc, dst_workload=dst)
    for f in flags:
        rec.flag(f)
    want = rec.labels(status, grpc_status)
    assert rec.finish(status, request_bytes=1, response_bytes=2, grpc_status=grpc_status)
    assert m.requests.series() == {tuple(want[n] for n in HTTP_LABELS): 1.0}


def test_peer_key_follows_the_objects_not_their_ids() -> None:
    a = peer_key(SRC, "p", DST, SVC)
    assert peer_key(SRC, "p", DST, SVC) is a  # cached
    moved = Workload(uid="d", name="server-1", namespace="other", workload_name="server-x")
    b = peer_key(SRC, "p", moved, SVC)
    assert b != a and "other" in b and "server-x" in b
    assert peer_key(SRC, "q", DST, SVC) != a  # the principal is part of the key
