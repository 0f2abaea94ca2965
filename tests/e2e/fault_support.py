"""Helpers for the fault tests (``test_faults.py``): pod applications, a wire sniffer, rules.

Two halves:

- **Pod applications** (``python tests/e2e/fault_support.py <cmd>``, started in a pod's cgroup
  and netns by ``LocalCluster.start_app`` so every capture backend sees them as the pod's
  traffic):
  ``load`` opens ``--rate`` new connections per second (each a full greeting + echo exchange
  with the echo app) until ``--stop-file`` appears or ``--seconds`` pass, prints one
  ``progress`` line per second and a final ``result {json}`` line;
  ``stream`` keeps one connection and sends a marker line every ``--interval`` seconds,
  checking each echo, and prints ``connected``, ``echoed <n>`` and finally ``broken <why>``.
  Every loop is bounded in count and time.
- **Test-side helpers**: :class:`Sniffer` (an AF_PACKET socket inside a node netns reading
  every frame on one interface, counting frames that carry a marker and frames to/from port
  15008), :func:`capture_rules` (the capture state of a pod netns as text), and
  :func:`add_pod` / :func:`delete_pod` (a pod created and removed the way the API server and
  kubelet would: object first, then CNI ADD; CNI DEL, then the object).

Invariants: the sniffer only reads (it never sends) and only in a namespace the mesh created;
every helper is bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script inside a pod: make the checkout importable
    sys.path.insert(0, str(ROOT))

from ambient.cluster.echo import GREETING_RE, tcp_probe  # noqa: E402
from ambient.netns import netns_path, socket_in_netns  # noqa: E402

SCRIPT = str(Path(__file__).resolve())
ETH_P_ALL = 0x0003
NSENTER = "/usr/bin/nsenter"
COUNTERS = re.compile(r"counter packets \d+ bytes \d+")  # nft shows iptables-nft's counters


# ------------------------------------------------------------------------ pod applications


def load(host: str, port: int, rate: float, seconds: float, stop_file: str | None,
         timeout: float) -> int:
    """Open ``rate`` connections per second (paced, one at a time) until told to stop."""
    ok = failed = 0
    errors: list[str] = []
    interval = 1.0 / max(rate, 0.1)
    start = time.monotonic()
    deadline = start + seconds
    next_at = start
    last_progress = start
    while time.monotonic() < deadline and ok + failed < 100_000:
        if stop_file and os.path.exists(stop_file):
            break
        r = tcp_probe(None, host, port, payload=b"load\n", timeout=timeout)
        if r.ok:
            ok += 1
        else:
            failed += 1
            if len(errors) < 20:
                errors.append(f"{time.monotonic() - start:.2f}s: {r.error}")
        now = time.monotonic()
        if now - last_progress >= 1.0:
            print(f"progress ok={ok} failed={failed}", flush=True)
            last_progress = now
        next_at += interval
        if next_at > now:
            time.sleep(next_at - now)
        else:
            next_at = now  # behind schedule: don't burst to catch up
    result = {"ok": ok, "failed": failed, "errors": errors,
              "seconds": round(time.monotonic() - start, 3)}
    print("result " + json.dumps(result), flush=True)
    return 0


def stream(host: str, port: int, marker: str, interval: float, seconds: float) -> int:
    """One connection carrying ``marker`` lines; prints each step (see the module doc)."""
    deadline = time.monotonic() + seconds
    line = (marker + "\n").encode()
    try:
        s = socket.create_connection((host, port), timeout=5.0)
    except OSError as e:
        print(f"failed {e!r}", flush=True)
        return 1
    with s:
        try:
            s.settimeout(5.0)
            greeting = b""
            while b"\n" not in greeting and len(greeting) < 4096:
                chunk = s.recv(4096)
                if not chunk:
                    break
                greeting += chunk
            first, _, rest = greeting.partition(b"\n")
            if not GREETING_RE.match(first.decode(errors="replace")):
                print(f"failed greeting {first!r}", flush=True)
                return 1
            print(f"connected {first.decode(errors='replace')}", flush=True)
            n = 0
            buf = rest
            while time.monotonic() < deadline:
                s.sendall(line)
                while len(buf) < len(line):
                    chunk = s.recv(65536)
                    if not chunk:
                        print("broken eof", flush=True)
                        return 0
                    buf += chunk
                if buf[:len(line)] != line:
                    print(f"broken garbled {buf[:80]!r}", flush=True)
                    return 1
                buf = buf[len(line):]
                n += 1
                if n % 5 == 0:
                    print(f"echoed {n}", flush=True)
                time.sleep(interval)
        except OSError as e:
            print(f"broken {e!r}", flush=True)
            return 0
    print("timeout", flush=True)
    return 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fault_support.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    lp = sub.add_parser("load", help="open new connections at a steady rate")
    lp.add_argument("--host", required=True)
    lp.add_argument("--port", type=int, default=8080)
    lp.add_argument("--rate", type=float, default=10.0)
    lp.add_argument("--seconds", type=float, default=120.0)
    lp.add_argument("--stop-file")
    lp.add_argument("--timeout", type=float, default=5.0)
    sp = sub.add_parser("stream", help="one connection carrying marker lines")
    sp.add_argument("--host", required=True)
    sp.add_argument("--port", type=int, default=8080)
    sp.add_argument("--marker", required=True)
    sp.add_argument("--interval", type=float, default=0.05)
    sp.add_argument("--seconds", type=float, default=120.0)
    a = ap.parse_args(argv)
    if a.cmd == "load":
        return load(a.host, a.port, a.rate, a.seconds, a.stop_file, a.timeout)
    return stream(a.host, a.port, a.marker, a.interval, a.seconds)


# ------------------------------------------------------------------------ the test side


def app_log(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []


def load_result(path: Path) -> dict[str, Any] | None:
    for ln in reversed(app_log(path)):
        if ln.startswith("result "):
            data: dict[str, Any] = json.loads(ln[len("result "):])
            return data
    return None


@dataclass
class Sniffer:
    """Every frame on ``ifname`` inside the netns ``netns``, read by a thread until ``stop``.

    Counts frames carrying any of ``markers`` (per marker), all frames, and TCP frames to or
    from ``tls_port`` (the HBONE port: evidence that the sniffer saw the encrypted path).
    """

    netns: str
    ifname: str
    markers: tuple[bytes, ...]
    tls_port: int = 15008
    frames: int = 0
    tls_frames: int = 0
    hits: dict[bytes, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _sock: socket.socket | None = None
    error: str = ""

    def __enter__(self) -> Sniffer:
        self.hits = {m: 0 for m in self.markers}
        s = socket_in_netns(netns_path(self.netns), socket.AF_PACKET, socket.SOCK_RAW,
                            socket.htons(ETH_P_ALL))
        s.bind((self.ifname, 0))
        s.settimeout(0.2)
        self._sock = s
        self._thread = threading.Thread(target=self._run, name="sniffer", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _run(self) -> None:
        assert self._sock is not None
        deadline = time.monotonic() + 600  # bounded even if stop() is never called
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                frame = self._sock.recv(65535)
            except TimeoutError:
                continue
            except OSError as e:
                self.error = repr(e)
                return
            self.frames += 1
            for m in self.markers:
                if m in frame:
                    self.hits[m] += 1
            ports = _tcp_ports(frame)
            if ports is not None and self.tls_port in ports:
                self.tls_frames += 1


def _tcp_ports(frame: bytes) -> tuple[int, int] | None:
    """(sport, dport) of an Ethernet/IPv4/TCP frame, else None."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    ihl = (frame[14] & 0x0F) * 4
    if frame[23] != 6 or len(frame) < 14 + ihl + 4:
        return None
    sport, dport = struct.unpack("!HH", frame[14 + ihl:14 + ihl + 4])
    return sport, dport


def capture_rules(netns: str) -> str:
    """The capture state of a pod netns as comparable text: ``iptables-save`` and ``nft list
    ruleset`` (counters and comments dropped), ``ip rule`` and every routing table."""
    path = netns_path(netns)
    parts = []
    for argv in (["/usr/sbin/iptables-save"], ["/usr/sbin/nft", "list", "ruleset"],
                 ["/usr/sbin/ip", "rule", "list"],
                 ["/usr/sbin/ip", "-4", "route", "show", "table", "all"]):
        p = subprocess.run([NSENTER, f"--net={path}", "--", *argv], capture_output=True,
                           text=True, timeout=30, check=False)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {netns}: {p.stderr.strip()}")
        lines = [COUNTERS.sub("counter", ln.split(" [", 1)[0] if ln.startswith(":") else ln)
                 for ln in p.stdout.splitlines() if not ln.startswith("#")]
        parts.append(f"== {' '.join(argv)}\n" + "\n".join(lines))
    return "\n".join(parts)


def add_pod(mesh: Any, name: str, namespace: str, node: str, service_account: str,
            labels: dict[str, str] | None = None) -> str:
    """Create a pod as the API server + kubelet would: the Pod object first (the agent reads
    its labels), then CNI ADD, then its status with the IP; starts the echo app.  Returns
    ``ns/name``."""
    uid = str(uuid.uuid4())
    obj = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {}),
                        "uid": uid},
           "spec": {"nodeName": node, "serviceAccountName": service_account,
                    "containers": [{"name": "app", "ports": [
                        {"name": "tcp-echo", "containerPort": 8080}]}]}}
    mesh.objects.append(obj)
    mesh.write_manifests()
    pod = mesh.cluster.add_pod(name, namespace, node, service_account=service_account,
                               labels=dict(labels or {}), uid=uid)
    key = f"{namespace}/{name}"
    mesh.pods[key] = pod
    mesh.write_manifests()
    mesh.cluster.start_echo(pod)
    return key


def delete_pod(mesh: Any, key: str) -> list[str]:
    """Remove a pod as kubelet + the API server would: stop it, CNI DEL, then the object."""
    pod = mesh.pods[key]
    errors: list[str] = mesh.cluster.remove_pod(pod.name)
    mesh.pods.pop(key, None)
    mesh.delete_object("Pod", pod.namespace, pod.name, missing_ok=True)
    return errors


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


if __name__ == "__main__":
    raise SystemExit(main())
