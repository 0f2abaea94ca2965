"""ambient-cni chained after the real reference plugins (bridge + host-local), in a throw-away
node netns, talking to a small real agent built on ``serve_events``.

The conflist is produced by the installer from a bridge-only primary config, the launcher is the
installed one (absolute interpreter, minimal environment), and the plugins run through
``ambient.cluster.cni.CniRuntime`` exactly as the local cluster runs them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from ambient.cluster import netlink
from ambient.cluster.cluster import pod_cni_args
from ambient.cluster.cni import CNI_PATH, CniError, CniNetwork, CniRuntime, bridge_network
from cni import install as inst
from cni.events import AgentReply, PluginEvent, serve_events

pytestmark = pytest.mark.netns



@dataclass
class StubAgent:
    """A node agent that records events and answers with ``reply``."""

    path: str
    reply: AgentReply = field(default_factory=lambda: AgentReply(ok=True, enrolled=True))
    events: list[PluginEvent] = field(default_factory=list)
    netns_seen: dict[str, bool] = field(default_factory=dict)
    loop: asyncio.AbstractEventLoop | None = None
    server: Any = None
    thread: threading.Thread | None = None

    async def handle(self, ev: PluginEvent) -> AgentReply:
        self.events.append(ev)
        self.netns_seen[ev.cmd] = bool(ev.netns) and os.path.exists(ev.netns)
        return self.reply

    def start(self) -> None:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            assert self.loop is not None
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(serve_events(self.path, self.handle))
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(10), "stub agent did not start"

    def stop(self) -> None:
        if self.loop is None or self.thread is None:
            return

        async def close() -> None:
            self.server.close()
            await self.server.wait_closed()

        if self.server is not None:
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.loop = None


@dataclass
class Node:
    name: str
    runtime: CniRuntime
    network: CniNetwork
    run_dir: str
    bin_dir: str
    agent: StubAgent
    pods: list[str] = field(default_factory=list)

    def rt(self, cid: str) -> CniRuntime:
        """The runtime as kubelet calls it for pod ``cid`` (Kubernetes CNI_ARGS included)."""
        return dataclasses.replace(self.runtime, args=pod_cni_args(cid, "default", f"uid-{cid}",
                                                                   cid))

    def new_pod(self) -> tuple[str, str, str]:
        """(container id, netns name, netns path) of a fresh pod netns with lo up."""
        cid = f"p{secrets.token_hex(3)}"
        ns = f"{self.name}-{cid}"
        self.pods.append(ns)
        return cid, ns, netlink.create_netns(ns)


@pytest.fixture
def node() -> Iterator[Node]:
    tag = f"ambcni{secrets.token_hex(3)}"
    tmp = tempfile.mkdtemp(prefix=f"{tag}-")  # short: unix socket paths are limited to 108
    conf_dir, bin_dir = os.path.join(tmp, "net.d"), os.path.join(tmp, "bin")
    run_dir = os.path.join(tmp, "run")
    os.makedirs(conf_dir)
    os.makedirs(bin_dir)
    for plugin in ("bridge", "host-local", "loopback"):
        os.symlink(os.path.join(CNI_PATH, plugin), os.path.join(bin_dir, plugin))
    primary = bridge_network("pods", "10.250.3.0/24", os.path.join(tmp, "ipam"), bridge="cni0")
    with open(os.path.join(conf_dir, "10-pods.conflist"), "w") as fh:
        json.dump(primary.to_conflist(), fh)
    inst.install(conf_dir, bin_dir, values={"cni_agent_run_dir": run_dir, "agent_timeout_s": 10})
    with open(os.path.join(conf_dir, "10-pods.conflist")) as fh:
        conflist = json.load(fh)
    network = CniNetwork(conflist["name"], conflist["plugins"], conflist["cniVersion"])
    agent = StubAgent(os.path.join(run_dir, "pluginevent.sock"))
    n = Node(f"{tag}-node", CniRuntime(exec_netns=f"{tag}-node", cni_path=bin_dir), network,
             run_dir, bin_dir, agent)
    try:
        netlink.create_netns(n.name)
        agent.start()
        yield n
    finally:
        agent.stop()
        for ns in n.pods:
            netlink.delete_netns(ns)
        netlink.delete_netns(n.name)
        shutil.rmtree(tmp, ignore_errors=True)


def _pod_ipv4(ns: str) -> str:
    out = netlink.ip_in(ns, "-4", "-o", "addr", "show", "dev", "eth0")
    return out.split()[3].split("/")[0]


def test_add_returns_bridge_result_and_agent_sees_pod(node: Node) -> None:
    assert [p["type"] for p in node.network.plugins] == ["bridge", "ambient-cni"]
    cid, ns, path = node.new_pod()
    result = node.rt(cid).add(node.network, cid, path)
    ip = _pod_ipv4(ns)
    assert [a["address"] for a in result["ips"]] == [f"{ip}/24"]
    assert result["cniVersion"] == node.network.cni_version
    assert [ev.cmd for ev in node.agent.events] == ["add"]
    ev = node.agent.events[0]
    assert (ev.container_id, ev.netns, ev.ifname) == (cid, path, "eth0")
    assert (ev.pod_name, ev.pod_namespace, ev.pod_uid) == (cid, "default", f"uid-{cid}")
    assert ev.ips == [ip]
    assert ev.interfaces == ["eth0"]
    assert node.agent.netns_seen["add"], "the netns path the agent got does not exist"

    # our plugin is the identity on the bridge plugin's real result: byte-for-byte JSON
    conf = {**node.network.plugins[-1], "cniVersion": node.network.cni_version,
            "name": node.network.name, "prevResult": result}
    proc = subprocess.run(
        [netlink.IP, "netns", "exec", node.name, os.path.join(node.bin_dir, "ambient-cni")],
        input=json.dumps(conf).encode(), capture_output=True, timeout=60, check=False,
        env={"CNI_COMMAND": "ADD", "CNI_CONTAINERID": cid, "CNI_NETNS": path,
             "CNI_IFNAME": "eth0", "CNI_PATH": node.bin_dir, "PATH": "/usr/bin:/bin",
             "CNI_ARGS": ";".join(f"{k}={v}" for k, v in node.rt(cid).args.items())})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == json.dumps(result).encode()

    node.rt(cid).check(node.network, cid, path, result)
    assert [e.cmd for e in node.agent.events] == ["add", "add", "check"]
    node.rt(cid).delete(node.network, cid, path, result)
    assert node.agent.events[-1].cmd == "del"


def test_refusing_agent_fails_the_whole_add(node: Node) -> None:
    node.agent.reply = AgentReply(ok=False, enrolled=True, code=0,
                                  message="capture rules could not be applied")
    cid, ns, path = node.new_pod()
    with pytest.raises(CniError) as err:
        node.rt(cid).add(node.network, cid, path)
    assert err.value.plugin == "ambient-cni"
    assert err.value.code == 100
    assert err.value.details == "capture rules could not be applied"
    assert [ev.cmd for ev in node.agent.events] == ["add"]
    # the runtime cleans up a failed ADD with DEL, which succeeds even though the agent refuses
    node.rt(cid).delete(node.network, cid, path)


def test_unreachable_agent_is_try_again_later(node: Node) -> None:
    node.agent.stop()
    cid, ns, path = node.new_pod()
    with pytest.raises(CniError) as err:
        node.rt(cid).add(node.network, cid, path)
    assert (err.value.plugin, err.value.code) == ("ambient-cni", 11)
    assert node.agent.path in err.value.msg
    node.rt(cid).delete(node.network, cid, path)  # and DEL still succeeds


def test_del_after_netns_is_gone(node: Node) -> None:
    cid, ns, path = node.new_pod()
    result = node.rt(cid).add(node.network, cid, path)
    netlink.delete_netns(ns)
    node.rt(cid).delete(node.network, cid, path, result)
    ev = node.agent.events[-1]
    assert (ev.cmd, ev.netns, ev.container_id) == ("del", "", cid)
    assert ev.ips == [result["ips"][0]["address"].split("/")[0]]
    # DEL twice, without prevResult and with the agent gone: still fine
    node.agent.stop()
    node.rt(cid).delete(node.network, cid, path)
