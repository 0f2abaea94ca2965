"""The node agent in Kubernetes mode: the real ``kubernetes`` client against the in-process
API server.  Enrollment follows namespace and pod labels over list/watch, and the agent
writes ``ambient.istio.io/redirection`` on the pods it captures and removes it on release."""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from cni_doubles import RecordingBackend, RecordingZds
from k8s_apiserver import FakeApiServer

from cni.agent import AgentConfig, NodeAgent
from cni.agent_main import k8s_annotator, make_source
from cni.events import PluginEvent

ANNOTATION = "ambient.istio.io/redirection"


def _pod(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "apps", "labels": labels or {}},
            "spec": {"nodeName": "node1", "containers": [{"name": "app", "image": "x"}]}}


def _ns(labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "apps",
                                                                   "labels": labels}}


async def _until(pred: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.05)
    return bool(pred())


def test_kubernetes_mode_enrolls_by_label_and_annotates(tmp_path: Path) -> None:
    netns = tmp_path / "netns-web"
    netns.write_text("")  # only its existence matters to the agent's bookkeeping

    with FakeApiServer() as api:
        api.create(_ns({}))
        web = api.create(_pod("web"))
        uid = web["metadata"]["uid"]

        async def scenario() -> None:
            client = api.api_client()
            backend, zds = RecordingBackend(), RecordingZds()
            agent = NodeAgent(AgentConfig(node_name="node1",
                                          state_path=str(tmp_path / "state.msgpack")),
                              backend, zds, annotate=k8s_annotator(client))
            run_source = make_source(argparse.Namespace(), client)
            source = asyncio.create_task(run_source(agent.on_update))
            try:
                await asyncio.wait_for(agent.synced.wait(), 10)
                reply = await agent.handle_event(PluginEvent(
                    cmd="add", container_id="c1", netns=str(netns), ifname="eth0",
                    pod_name="web", pod_namespace="apps", pod_uid=uid, ips=["10.1.0.5"],
                    interfaces=["eth0"]))
                assert reply.ok and not reply.enrolled  # namespace not labelled yet

                def annotation() -> str | None:
                    pod = api.get("Pod", "web", "apps") or {}
                    return (pod["metadata"].get("annotations") or {}).get(ANNOTATION)

                # kubectl label namespace apps istio.io/dataplane-mode=ambient
                api.update(_ns({"istio.io/dataplane-mode": "ambient"}))
                assert await _until(lambda: uid in zds.served and annotation() == "enabled")
                assert uid in backend.applied

                # kubectl label pod web istio.io/dataplane-mode=none: released, annotation gone
                api.patch("Pod", "web", {"metadata": {"labels": {
                    "istio.io/dataplane-mode": "none"}}}, "apps")
                assert await _until(lambda: uid not in zds.served and annotation() is None)
                assert uid not in backend.applied
            finally:
                source.cancel()
                await asyncio.gather(source, return_exceptions=True)

        asyncio.run(scenario())
