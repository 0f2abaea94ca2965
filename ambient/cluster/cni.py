"""A minimal CNI runtime that drives the real reference plugins from /usr/lib/cni.

Role: what kubelet/containerd do for a pod sandbox, in ~a page: walk a network's plugin chain
(ADD in order passing ``prevResult``, DEL in reverse, CHECK in order), the CNI way: environment
``CNI_COMMAND/CNI_CONTAINERID/CNI_NETNS/CNI_IFNAME/CNI_PATH``, the plugin's config JSON on
stdin, a result or error JSON on stdout.

Invariants:
- Plugins run *inside the node netns* (``ip netns exec <node> <plugin>``): the bridge plugin
  creates its bridge in the caller's netns, so running it from the host would change the host.
- Plugins get a minimal environment and absolute paths, like a real runtime.
- ``CniNetwork.plugins`` is the chain; append a chained plugin (e.g. our own) to it.
- DEL is idempotent and tolerates a missing pod netns and a missing ``prevResult``.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from dataclasses import dataclass, field
from typing import Any

from ambient.cluster.netlink import IP

CNI_PATH = "/usr/lib/cni"
CNI_VERSION = "1.0.0"
_PLUGIN_TIMEOUT = 60.0


class CniError(RuntimeError):
    """A plugin failed; ``code``/``msg``/``details`` come from its error JSON when it sent one."""

    def __init__(self, plugin: str, command: str, code: int, msg: str, details: str = "") -> None:
        super().__init__(f"CNI {command} {plugin}: code {code}: {msg}"
                         + (f" ({details})" if details else ""))
        self.plugin = plugin
        self.command = command
        self.code = code
        self.msg = msg
        self.details = details


@dataclass
class CniNetwork:
    """A conflist: a named network and its plugin chain (each a plugin config dict)."""

    name: str
    plugins: list[dict[str, Any]] = field(default_factory=list)
    cni_version: str = CNI_VERSION

    def to_conflist(self) -> dict[str, Any]:
        return {"cniVersion": self.cni_version, "name": self.name, "plugins": self.plugins}


def bridge_network(name: str, subnet: str, data_dir: str, bridge: str = "cni0") -> CniNetwork:
    """The node's pod network: ``bridge`` + ``host-local`` IPAM, default route via the bridge."""
    return CniNetwork(name, [{
        "type": "bridge",
        "bridge": bridge,
        "isGateway": True,
        "ipMasq": False,
        "hairpinMode": True,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": subnet}]],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": data_dir,
        },
    }])


def loopback_network() -> CniNetwork:
    """``lo`` up in the pod; run as its own network, as containerd does."""
    return CniNetwork("cni-loopback", [{"type": "loopback"}])


@dataclass
class CniRuntime:
    """Invokes plugins of ``cni_path`` inside the netns ``exec_netns`` (a node netns name)."""

    exec_netns: str
    cni_path: str = CNI_PATH  # colon-separated directories, searched in order
    args: dict[str, str] = field(default_factory=dict)  # CNI_ARGS, e.g. K8S_POD_NAME

    def plugin_path(self, ptype: str) -> str:
        dirs = [d for d in self.cni_path.split(":") if d]
        for d in dirs:
            path = os.path.join(d, ptype)
            if os.access(path, os.X_OK):
                return path
        raise CniError(ptype, "find", -1, f"no executable plugin {ptype!r} in CNI_PATH "
                                          f"{self.cni_path}")

    def _invoke(self, network: CniNetwork, plugin: dict[str, Any], command: str,
                container_id: str, netns: str, ifname: str,
                prev_result: dict[str, Any] | None) -> dict[str, Any] | None:
        conf = copy.deepcopy(plugin)
        conf["cniVersion"] = network.cni_version
        conf["name"] = network.name
        if prev_result is not None:
            conf["prevResult"] = prev_result
        ptype = conf["type"]
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": netns,
            "CNI_IFNAME": ifname,
            "CNI_PATH": self.cni_path,
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        }
        if self.args:
            env["CNI_ARGS"] = ";".join(["IgnoreUnknown=1"]
                                       + [f"{k}={v}" for k, v in self.args.items()])
        cmd = [IP, "netns", "exec", self.exec_netns, self.plugin_path(ptype)]
        proc = subprocess.run(cmd, input=json.dumps(conf).encode(), env=env,
                              capture_output=True, timeout=_PLUGIN_TIMEOUT, check=False)
        out = proc.stdout.decode(errors="replace").strip()
        if proc.returncode != 0:
            try:
                err = json.loads(out)
                raise CniError(ptype, command, int(err.get("code", -1)), str(err.get("msg", "")),
                               str(err.get("details", "")))
            except (ValueError, AttributeError):
                raise CniError(ptype, command, -1,
                               out or proc.stderr.decode(errors="replace").strip()
                               or f"exit {proc.returncode}") from None
        if command != "ADD" or not out:
            return None
        return json.loads(out)

    def add(self, network: CniNetwork, container_id: str, netns: str,
            ifname: str = "eth0") -> dict[str, Any]:
        """ADD through the chain; returns the final result (the last plugin's output)."""
        result: dict[str, Any] | None = None
        for plugin in network.plugins:
            result = self._invoke(network, plugin, "ADD", container_id, netns, ifname, result)
        return result or {}

    def check(self, network: CniNetwork, container_id: str, netns: str,
              prev_result: dict[str, Any], ifname: str = "eth0") -> None:
        """CHECK every plugin with the cached ADD result; raises CniError on drift."""
        for plugin in network.plugins:
            self._invoke(network, plugin, "CHECK", container_id, netns, ifname, prev_result)

    def delete(self, network: CniNetwork, container_id: str, netns: str,
               prev_result: dict[str, Any] | None = None, ifname: str = "eth0") -> None:
        """DEL in reverse order.  Idempotent; a missing netns is passed as empty CNI_NETNS."""
        if netns and not os.path.exists(netns):
            netns = ""
        errors: list[CniError] = []
        for plugin in reversed(network.plugins):
            try:
                self._invoke(network, plugin, "DEL", container_id, netns, ifname, prev_result)
            except CniError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


def result_ipv4(result: dict[str, Any]) -> str:
    """The first IPv4 address (without prefix length) in a CNI 1.0 result."""
    for ipc in result.get("ips", []):
        addr = ipc.get("address", "")
        if ":" not in addr:
            return addr.split("/")[0]
    raise ValueError(f"no IPv4 address in CNI result {result!r}")
