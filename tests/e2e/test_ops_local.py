"""The operator verbs against a running local cluster (iptables capture, examples/demo.yaml):
``ztunnel-config`` and ``policy explain`` read a node's ztunnel, ``tap`` streams the events of
real connections, ``enroll`` changes a namespace the agents act on, ``version --remote``."""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ambient.cli import main
from ambient.cluster import demo
from ambient.cluster.mesh import LocalMesh
from ambient.ops.tap import TapFilter, tap_events
from ambient.ops.targets import resolve_targets

pytestmark = [pytest.mark.e2e, pytest.mark.netns]
MANIFESTS = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    root = tmp_path_factory.mktemp("run")
    m = LocalMesh(MANIFESTS, name=f"ops{secrets.token_hex(2)}", run_root=root,
                  capture="iptables")
    try:
        m.up(progress=lambda _msg: None)
        yield m
    finally:
        errors = m.down()
        assert not errors, errors


def cli(mesh: LocalMesh, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main([*argv, "--cluster", mesh.name, "--run-dir", str(mesh.run_root)])
    return code, capsys.readouterr().out


def test_ztunnel_config_from_a_node(mesh: LocalMesh, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = cli(mesh, capsys, "zc", "workloads", "--node", "node-b")
    assert code == 0
    rows = {line.split()[1]: line.split() for line in out.splitlines()[1:]}
    db = mesh.pods["shop/db"]
    assert rows["db"][:4] == ["shop", "db", db.ip, "node-b"] and rows["db"][-1] == "HBONE"
    assert rows["web"][-1] == "TCP"
    code, out = cli(mesh, capsys, "zc", "policies", "--node", "node-b")
    assert "db-allow-backend" in out and "Allow" in out
    # node-b holds certificates for the identities it serves once they were used.
    assert demo.probe(mesh, "shop/backend-2", "10.96.0.20", 5432).ok
    code, out = cli(mesh, capsys, "zc", "certificates", "--node", "node-b")
    assert "spiffe://cluster.local/ns/shop/sa/db" in out and " true " in out


@pytest.mark.parametrize(("src", "dst", "allowed", "words"), [
    ("shop/backend-2", "shop/db:5432", True, "allowed by policy shop/db-allow-backend"),
    ("shop/frontend", "shop/db:5432", False, "allow policies exist, but none allowed"),
    ("legacy/client", "shop/backend-1:8080", False, "istio_converted_static_strict"),
])
def test_policy_explain_matches_what_the_mesh_does(
        mesh: LocalMesh, capsys: pytest.CaptureFixture[str], src: str, dst: str, allowed: bool,
        words: str) -> None:
    node = mesh.pods[dst.split(":")[0]].node
    code, out = cli(mesh, capsys, "policy", "explain", src, dst, "--node", node)
    assert code == 0
    assert f"decision: {'ALLOW' if allowed else 'DENY'}" in out and words in out
    host, port = dst.split(":")
    target = mesh.pods[host]
    svc_port = {"shop/db": 5432}.get(host)
    ip, p = ("10.96.0.20", svc_port) if svc_port else (target.ip, int(port))
    assert demo.probe(mesh, src, ip, p).ok is allowed  # the mesh agrees with the explanation


def test_tap_streams_real_connections(mesh: LocalMesh) -> None:
    """Both ends of two connections to db, merged from every node: the source ztunnel
    (node-a) reports outbound, the destination (node-b) inbound with its policy decision."""
    targets = resolve_targets([], [], mesh.name, mesh.run_root, all_nodes=True)
    assert {t.label for t in targets} == {"node-a", "node-b"}
    got: list[dict[str, Any]] = []
    both = threading.Event()

    def on_sub(n: int) -> None:
        if n == len(targets):
            both.set()

    async def run() -> int:
        return await tap_events(targets, TapFilter(workload="shop/db", closed_only=True),
                                got.append, count=4, duration=60, warn=lambda m: None,
                                on_subscribed=on_sub)

    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(asyncio.run(run())), daemon=True)
    t.start()
    assert both.wait(20), "tap did not subscribe to both ztunnels"
    denied = demo.probe(mesh, "shop/frontend", "10.96.0.20", 5432)
    allowed = demo.probe(mesh, "shop/backend-2", "10.96.0.20", 5432)
    t.join(60)
    assert not denied.ok and allowed.ok
    assert result == [4], got
    seen = {(e["node"], e["direction"], e["srcWorkload"]): e for e in got}
    assert set(seen) == {("node-a", "outbound", "frontend"), ("node-a", "outbound", "backend-2"),
                         ("node-b", "inbound", "frontend"), ("node-b", "inbound", "backend-2")}
    d = seen[("node-b", "inbound", "frontend")]
    assert d["responseFlags"] == "DENY" and d["policy"]["decision"] == "deny"
    assert d["srcIdentity"] == "spiffe://cluster.local/ns/shop/sa/frontend"
    a = seen[("node-b", "inbound", "backend-2")]
    assert a["policy"] == {"decision": "allow", "policy": "shop/db-allow-backend",
                           "reason": "allowed by policy shop/db-allow-backend"}
    assert a["responseFlags"] == "-" and a["bytesSent"] > 0 and a["bytesRecv"] > 0
    assert seen[("node-a", "outbound", "frontend")]["responseFlags"] == "DENY"
    assert seen[("node-a", "outbound", "backend-2")]["policy"] is None  # authorized at node-b


def test_tap_denied_filter_shows_the_policy(mesh: LocalMesh) -> None:
    targets = resolve_targets([], ["node-b"], mesh.name, mesh.run_root)
    got: list[dict[str, Any]] = []
    ready = threading.Event()
    result: list[int] = []

    async def run() -> int:
        return await tap_events(targets, TapFilter(denied=True), got.append, count=1,
                                duration=60, warn=lambda m: None,
                                on_subscribed=lambda n: ready.set())

    t = threading.Thread(target=lambda: result.append(asyncio.run(run())), daemon=True)
    t.start()
    assert ready.wait(20)
    assert demo.probe(mesh, "shop/backend-2", "10.96.0.20", 5432).ok  # allowed: filtered out
    assert not demo.probe(mesh, "shop/frontend", "10.96.0.20", 5432).ok
    t.join(60)
    assert result == [1]
    (ev,) = got
    assert ev["node"] == "node-b" and ev["direction"] == "inbound"
    assert ev["srcWorkload"] == "frontend" and ev["dstWorkload"] == "db"
    assert ev["srcIdentity"] == "spiffe://cluster.local/ns/shop/sa/frontend"
    assert ev["responseFlags"] == "DENY"
    assert ev["policy"] == {"decision": "deny", "policy": None,
                            "reason": "denied: allow policies exist, but none allowed"}


def test_version_remote(mesh: LocalMesh, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = cli(mesh, capsys, "version", "--remote")
    assert code == 0
    assert "ztunnel version (node-a)" in out and "ztunnel version (node-b)" in out


def test_enroll_and_unenroll_a_namespace(mesh: LocalMesh,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, out = cli(mesh, capsys, "enroll", "legacy")
    assert code == 0 and "istio.io/dataplane-mode=ambient" in out
    try:
        assert demo._wait_captured(mesh, "legacy/web", True), "the agent did not capture web"
    finally:
        code, out = cli(mesh, capsys, "unenroll", "legacy")
        assert code == 0
    assert demo._wait_captured(mesh, "legacy/web", False), "the agent did not release web"
