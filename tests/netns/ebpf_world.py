"""A node netns + a pod netns + a test cgroup for the eBPF capture tests (real kernel).

Layout: node netns ``10.77.0.1/24`` (+ the probe-SNAT address) on ``n0`` <-veth-> pod netns
``10.77.0.2/24`` on ``eth0`` with a default route via the node.  The pod's processes run in
``<cgroup2>/ambtest-ebpf-<tag>/pod``; the backend attaches to ``<cgroup2>/ambtest-ebpf-<tag>``.
Everything is uniquely named and removed on exit; the backend's state is *not* removed here
(tests decide, so they can check for leaks).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

from ambient.cluster import cgroups, netlink
from ambient.cluster.cgroups import PodProcess
from ambient.netns import socket_in_netns
from cni.capture.base import PROBE_SNAT_IP, PodCapture

NODE_IP = "10.77.0.1"
POD_IP = "10.77.0.2"
OUTSIDE_IP = "10.99.0.9"  # routed to the node, which has no such host
SPOOFED_CLIENT_IP = "10.99.0.50"
ZTUNNEL_MARK = 1337
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

APP_CLIENT = r"""
import json, socket, sys
host, port, mark, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
out = {}
try:
    s = socket.socket()
    if mark:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    s.settimeout(timeout)
    s.connect((host, port))
    out["peer"] = list(s.getpeername())
    out["local"] = list(s.getsockname())
    s.sendall(b"ping\n")
    out["reply"] = s.recv(200).decode()
    s.close()
except OSError as e:
    out["error"] = type(e).__name__ + ": " + str(e)
print(json.dumps(out), flush=True)
"""


@dataclass
class World:
    tag: str
    node: str
    pod: str
    cgroot: str
    cgpod: str
    pin_dir: str
    logdir: str
    procs: list[PodProcess] = field(default_factory=list)

    @property
    def pod_netns(self) -> str:
        return f"/var/run/netns/{self.pod}"

    @property
    def node_netns(self) -> str:
        return f"/var/run/netns/{self.node}"

    def capture(self, **kw: object) -> PodCapture:
        return PodCapture(uid=f"uid-{self.tag}", name="app", namespace="default",
                          netns=self.pod_netns, ips=(POD_IP,), **kw)  # type: ignore[arg-type]

    def start_echo(self, port: int = 8080) -> PodProcess:
        p = cgroups.start_in_pod(
            self.cgpod, self.pod,
            [sys.executable, "-m", "ambient.cluster.echo", "serve", "--tcp", str(port),
             "--http", "0", "--name", "app"],
            env={"PYTHONPATH": REPO, "PATH": "/usr/bin:/bin"}, cwd=REPO,
            log_path=os.path.join(self.logdir, f"echo-{port}.log"))
        self.procs.append(p)
        from ambient.cluster.echo import wait_listening
        assert wait_listening(p.pid, port), "echo app did not start listening"
        return p

    def app_connect(self, host: str, port: int, *, mark: int = 0,
                    timeout: float = 5.0) -> AppRun:
        """Start the application client in the pod (netns + cgroup)."""
        log = os.path.join(self.logdir, f"client-{secrets.token_hex(3)}.log")
        p = cgroups.start_in_pod(self.cgpod, self.pod,
                                 [sys.executable, "-c", APP_CLIENT, host, str(port), str(mark),
                                  str(timeout)], log_path=log)
        self.procs.append(p)
        assert p.popen is not None
        return AppRun(p.popen, log)


@dataclass
class AppRun:
    popen: subprocess.Popen[bytes]
    log: str

    def result(self, timeout: float = 20.0) -> dict[str, object]:
        """What the client printed: peer/local/reply, or error."""
        self.popen.wait(timeout=timeout)
        with open(self.log) as f:
            lines = [ln for ln in f.read().splitlines() if ln.startswith("{")]
        assert lines, f"the app client printed nothing (log {self.log})"
        return dict(json.loads(lines[-1]))


def ztunnel_listener(netns: str, port: int) -> socket.socket:
    """A stand-in for ztunnel's in-pod listener: created in the pod netns, mark 1337."""
    s = socket_in_netns(netns)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, ZTUNNEL_MARK)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(16)
        s.settimeout(10)
    except OSError:
        s.close()
        raise
    return s


@contextlib.contextmanager
def world(logdir: str) -> Iterator[World]:
    tag = secrets.token_hex(3)
    cgroot = os.path.join(cgroups.cgroup2_mount(), f"ambtest-ebpf-{tag}")
    w = World(tag=tag, node=f"ebn{tag}", pod=f"ebp{tag}", cgroot=cgroot,
              cgpod=os.path.join(cgroot, "pod"), pin_dir=f"/sys/fs/bpf/ambtest-{tag}",
              logdir=logdir)
    try:
        netlink.create_netns(w.node)
        netlink.create_netns(w.pod)
        netlink.add_veth(w.node, "n0", w.pod, "eth0")
        netlink.add_address(w.node, "n0", f"{NODE_IP}/24")
        netlink.add_address(w.node, "n0", f"{PROBE_SNAT_IP}/32")
        netlink.add_address(w.pod, "eth0", f"{POD_IP}/24")
        netlink.add_route(w.pod, "default", via=NODE_IP)
        cgroups.create_cgroup(w.cgpod)
        yield w
    finally:
        for p in w.procs:
            cgroups.stop_process(p)
        cgroups.remove_cgroup(w.cgpod)
        cgroups.remove_empty_dir(w.cgroot)
        netlink.delete_netns(w.pod)
        netlink.delete_netns(w.node)
