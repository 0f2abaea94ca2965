"""The node agent's state machine: enrollment, fail-closed ADD, late (un)enrollment, restart.

The capture backend and ZDS here are recording doubles: what they *do* to the kernel and
to ztunnel is tested against the real thing in tests/netns and tests/e2e; this file tests
the agent's decisions and their order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
from cni_doubles import RecordingBackend, RecordingZds

from cni.agent import AgentConfig, NodeAgent, load_checkpoint, save_checkpoint
from cni.events import PluginEvent
from controlplane.objects import Update


def ns_obj(name: str, ambient: bool) -> dict[str, Any]:
    labels = {"istio.io/dataplane-mode": "ambient"} if ambient else {}
    return {"kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def pod_obj(name: str, ns: str = "default", labels: dict[str, str] | None = None,
            uid: str = "") -> dict[str, Any]:
    return {"kind": "Pod", "metadata": {"name": name, "namespace": ns, "uid": uid or f"u-{name}",
                                        "labels": labels or {}},
            "spec": {"nodeName": "n1"}}


def update(*objs: dict[str, Any], resync: bool = True) -> Update:
    out: dict[str, dict[str, Any]] = {}
    for o in objs:
        ns = "" if o["kind"] == "Namespace" else o["metadata"]["namespace"]
        out[f"{o['kind']}/{ns}/{o['metadata']['name']}"] = o
    return Update(upserts=out, resync=resync)


def add_event(name: str, netns: str, ns: str = "default") -> PluginEvent:
    return PluginEvent(cmd="add", container_id=f"c-{name}", netns=netns, ifname="eth0",
                       pod_name=name, pod_namespace=ns, pod_uid=f"u-{name}",
                       ips=["10.0.0.5"], interfaces=["eth0"])


@pytest.fixture
def netns_file(tmp_path: Path) -> str:
    p = tmp_path / "netns-a"
    p.write_text("")  # stands for the netns path; only its existence matters here
    return str(p)


def make_agent(tmp_path: Path, **kw: Any) -> tuple[NodeAgent, RecordingBackend, RecordingZds]:
    backend, zds = RecordingBackend(), RecordingZds()
    cfg = AgentConfig(node_name="n1", state_path=str(tmp_path / "state.msgpack"),
                      meta_wait_s=0.3, **kw)
    return NodeAgent(cfg, backend, zds), backend, zds


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_add_enrolled_pod_captures_then_hands_to_ztunnel(tmp_path: Path, netns_file: str) -> None:
    async def go() -> None:
        agent, backend, zds = make_agent(tmp_path)
        agent.on_update(update(ns_obj("default", True), pod_obj("a")))
        reply = await agent.handle_event(add_event("a", netns_file))
        assert reply.ok and reply.enrolled
        assert backend.calls == [("apply", "a")] and zds.calls == [("add", "a")]
        assert [p.uid for p in agent.snapshot()] == ["u-a"]
    run(go())


def test_add_not_enrolled_touches_nothing(tmp_path: Path, netns_file: str) -> None:
    async def go() -> None:
        agent, backend, zds = make_agent(tmp_path)
        agent.on_update(update(ns_obj("default", False), pod_obj("a")))
        reply = await agent.handle_event(add_event("a", netns_file))
        assert reply.ok and not reply.enrolled
        assert backend.calls == [] and zds.calls == []
        assert "u-a" in agent.pods  # remembered for a later enrollment
    run(go())


def test_add_fails_closed_when_ztunnel_is_down(tmp_path: Path, netns_file: str) -> None:
    async def go() -> None:
        agent, backend, zds = make_agent(tmp_path)
        zds.down = True
        agent.on_update(update(ns_obj("default", True), pod_obj("a")))
        reply = await agent.handle_event(add_event("a", netns_file))
        assert not reply.ok and reply.code == 101
        assert "ztunnel" in reply.message
        assert "u-a" in backend.applied  # rules stay: traffic is refused, not plaintext
        zds.down = False
        await agent.reconcile()  # the retry loop's step
        assert "u-a" in zds.served
    run(go())


def test_add_fails_when_capture_fails(tmp_path: Path, netns_file: str) -> None:
    async def go() -> None:
        agent, backend, zds = make_agent(tmp_path)
        backend.fail_apply = True
        agent.on_update(update(ns_obj("default", True), pod_obj("a")))
        reply = await agent.handle_event(add_event("a", netns_file))
        assert not reply.ok and "iptables-restore failed" in reply.message
        assert zds.calls == []
    run(go())


def test_add_refuses_ipv6_pods_rather_than_leave_them_uncaptured(
        tmp_path: Path, netns_file: str) -> None:
    async def go() -> None:
        agent, backend, zds = make_agent(tmp_path)
        agent.on_update(update(ns_obj("default", True), pod_obj("a")))
        ev = dataclasses.replace(add_event("a", netns_file), ips=["10.0.0.5", "fd00::5"])
        reply = await agent.handle_event(ev)
        assert not reply.ok and "IPv6" in reply.message
        assert backend.calls == [] and zds.calls == []
    run(go())


def test_add_unknown_pod_asks_runtime_to_retry(tmp_path: Path, netns_file: str) -> None:
    async def go() -> None:
        agent, backend, _ = make_agent(tmp_path)
        agent.on_update(update(ns_obj("default", True)))
        reply = await agent.handle_event(add_event("ghost", netns_file))
        assert not reply.ok and reply.code == 11 and "not known" in reply.message
        assert backend.calls == []
    run(go())


def test_add_waits_for_the_pod_to_appear(tmp_path: Path, netns_file: str) -> None:
    async def go() -> None:
        agent, _, zds = make_agent(tmp_path)
        agent.on_update(update(ns_obj("default", True)))
        task = asyncio.create_task(agent.handle_event(add_event("a", netns_file)))
        await asyncio.sleep(0.05)
        agent.on_update(update(ns_obj("default", True), pod_obj("a")))
        reply = await task
        assert reply.ok and reply.enrolled and "u-a" in zds.served
    run(go())


def test_late_enrollment_and_unenrollment(tmp_path: Path, netns_file: str) -> None:
    async def go() -> None:
        agent, backend, zds = make_agent(tmp_path)
        agent.on_update(update(ns_obj("default", False), pod_obj("a")))
        await agent.handle_event(add_event("a", netns_file))
        agent.on_update(update(ns_obj("default", True), pod_obj("a")))
        await agent.reconcile()
        # running pod: ztunnel's listeners first, then the redirection
        assert zds.calls == [("add", "a")] and backend.calls == [("apply", "a")]
        agent.on_update(update(ns_obj("default", True),
                               pod_obj("a", labels={"istio.io/dataplane-mode": "none"})))
        await agent.reconcile()
        assert zds.calls[-1] == ("del", "u-a") and backend.calls[-1] == ("remove", "a")
        assert agent.snapshot() == []
    run(go())


def test_del_removes_capture_and_is_idempotent(tmp_path: Path, netns_file: str) -> None:
    async def go() -> None:
        agent, backend, zds = make_agent(tmp_path)
        agent.on_update(update(ns_obj("default", True), pod_obj("a")))
        await agent.handle_event(add_event("a", netns_file))
        ev = PluginEvent(cmd="del", container_id="c-a", netns="", ifname="eth0", pod_name="a",
                         pod_namespace="default", pod_uid="", ips=[], interfaces=[])
        assert (await agent.handle_event(ev)).ok
        assert backend.applied == {} and zds.served == {} and agent.pods == {}
        assert (await agent.handle_event(ev)).ok
    run(go())


def test_check_reports_drift(tmp_path: Path, netns_file: str) -> None:
    async def go() -> None:
        agent, backend, _ = make_agent(tmp_path)
        agent.on_update(update(ns_obj("default", True), pod_obj("a")))
        await agent.handle_event(add_event("a", netns_file))
        ev = dataclasses.replace(add_event("a", netns_file), cmd="check")
        assert (await agent.handle_event(ev)).ok
        backend.drift = ["nat ISTIO_OUTPUT: missing redirect to 15001"]
        reply = await agent.handle_event(ev)
        assert not reply.ok and "missing redirect" in reply.message
    run(go())


def test_restart_restores_and_forgets_vanished_pods(tmp_path: Path, netns_file: str) -> None:
    async def go() -> None:
        agent, _, _ = make_agent(tmp_path)
        agent.on_update(update(ns_obj("default", True), pod_obj("a"), pod_obj("b")))
        await agent.handle_event(add_event("a", netns_file))
        gone = str(tmp_path / "netns-b")
        Path(gone).write_text("")
        await agent.handle_event(add_event("b", gone))
        os.unlink(gone)
        agent2, backend2, _ = make_agent(tmp_path)
        await agent2.restore()
        assert sorted(agent2.pods) == ["u-a"]
        assert backend2.calls == [("apply", "a"), ("remove", "b")]
        assert [p.uid for p in agent2.snapshot()] == ["u-a"]
    run(go())


def test_checkpoint_corrupt_or_foreign_is_ignored(tmp_path: Path) -> None:
    p = tmp_path / "state.msgpack"
    p.write_bytes(b"\xc1garbage")
    assert load_checkpoint(str(p)) == []
    save_checkpoint(str(p), [])
    assert load_checkpoint(str(p)) == []
    assert load_checkpoint(str(tmp_path / "missing")) == []


def test_retry_loop_forgets_a_pod_whose_netns_vanished(tmp_path: Path, netns_file: str) -> None:
    """A netns deleted without CNI DEL (runtime crash, `ip netns del`) is noticed by the retry
    loop alone, with no cluster event: ztunnel is told (ZDS Del) and the pod forgotten."""
    async def go() -> None:
        agent, _, zds = make_agent(tmp_path, retry_interval_s=0.01)
        agent.on_update(update(ns_obj("default", True), pod_obj("a")))
        assert (await agent.handle_event(add_event("a", netns_file))).enrolled
        await asyncio.sleep(0.05)  # let on_update's reconcile finish: no event follows
        os.unlink(netns_file)
        loop = asyncio.create_task(agent.retry_loop())
        try:
            for _ in range(200):
                if not agent.pods:
                    break
                await asyncio.sleep(0.01)
        finally:
            loop.cancel()
        assert agent.pods == {} and ("del", "u-a") in zds.calls
    run(go())
