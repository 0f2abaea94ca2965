"""Reaching ztunnel admin endpoints: by URL, by local-cluster node, or a recorded dump file.

A target is a host:port, optionally inside a network namespace (a node of a local cluster
built by ``ambientctl demo --keep``: its ztunnel admin listens on 127.0.0.1:15000 inside the
node's netns ``<cluster>-<node>``). The local cluster is found from its ``state.json`` under
the run root (``/run/ambient/<cluster>``).

Invariants: only GET; every call is bounded by a timeout; errors are ``TargetError`` with a
message that says what to check. The HTTP client is deliberately tiny (one request per
connection, Content-Length, chunked or read-to-close bodies) because the admin port is.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ambient.netns import socket_in_netns

__all__ = [
    "DEFAULT_ADMIN",
    "DEFAULT_RUN_ROOT",
    "AdminTarget",
    "TargetError",
    "cluster_nodes",
    "find_cluster",
    "get",
    "get_json",
    "load_dump_file",
    "open_stream",
    "parse_admin_url",
    "resolve_targets",
]

DEFAULT_ADMIN = "http://127.0.0.1:15000"
DEFAULT_RUN_ROOT = Path("/run/ambient")
ADMIN_PORT = 15000


class TargetError(RuntimeError):
    """An admin endpoint cannot be reached or answered badly; the message says what to do."""


@dataclass(frozen=True)
class AdminTarget:
    label: str  # what to call it in output: the node name, or host:port
    host: str
    port: int
    netns: str | None = None  # a netns name/path, for local-cluster nodes

    def describe(self) -> str:
        where = f" in netns {self.netns}" if self.netns else ""
        return f"{self.host}:{self.port}{where}"


def parse_admin_url(url: str) -> AdminTarget:
    """``http://host:port`` (or ``host:port``) -> a target; raises ``TargetError``."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise TargetError(f"--admin {url!r}: want http://HOST:PORT (the admin port is plain HTTP)")
    port = parts.port or ADMIN_PORT
    return AdminTarget(f"{parts.hostname}:{port}", parts.hostname, port)


def _state(run_root: Path, cluster: str) -> dict[str, Any]:
    path = run_root / cluster / "state.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise TargetError(f"no local cluster {cluster!r} ({path} is missing); start one with "
                          "`ambientctl demo --keep`") from None
    except (OSError, ValueError) as e:
        raise TargetError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise TargetError(f"{path} is not a cluster state file")
    return data


def find_cluster(run_root: Path, cluster: str | None) -> str:
    """The cluster to use: the one named, else the only one under ``run_root``."""
    if cluster:
        return cluster
    found = sorted(p.parent.name for p in run_root.glob("*/state.json"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise TargetError(f"no local cluster under {run_root}; start one with "
                          "`ambientctl demo --keep`, or give --admin URL")
    raise TargetError(f"several local clusters under {run_root} ({', '.join(found)}); "
                      "choose one with --cluster")


def cluster_nodes(run_root: Path, cluster: str) -> dict[str, str]:
    """node name -> netns name, from the cluster's state file."""
    nodes = _state(run_root, cluster).get("nodes") or {}
    return {name: str(h.get("netns") or f"{cluster}-{name}") for name, h in sorted(nodes.items())}


def resolve_targets(admins: list[str], nodes: list[str], cluster: str | None,
                    run_root: Path = DEFAULT_RUN_ROOT, *, port: int = ADMIN_PORT,
                    all_nodes: bool = False) -> list[AdminTarget]:
    """The admin endpoints named by ``--admin``/``--node``/``--cluster`` (all nodes of the
    cluster when ``all_nodes`` and no node is named; ``DEFAULT_ADMIN`` when nothing is)."""
    out = [parse_admin_url(a) for a in admins]
    if nodes or (all_nodes and cluster) or (all_nodes and not admins):
        name = find_cluster(run_root, cluster)
        known = cluster_nodes(run_root, name)
        for n in nodes or list(known):
            if n not in known:
                raise TargetError(f"cluster {name} has no node {n!r} (nodes: "
                                  f"{', '.join(known) or 'none'})")
            out.append(AdminTarget(n, "127.0.0.1", port, known[n]))
    if not out:
        out.append(parse_admin_url(DEFAULT_ADMIN))
    return out


def _connect(target: AdminTarget, timeout: float) -> socket.socket:
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise TargetError(f"cannot resolve {target.host}: {e}") from e
    family, _, _, _, addr = infos[0]
    try:
        if target.netns:
            sock = socket_in_netns(target.netns, family)
        else:
            sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise TargetError(f"cannot enter netns {target.netns} of node {target.label}: {e} "
                          "(is the local cluster running, and are you root?)") from e
    sock.settimeout(timeout)
    try:
        sock.connect(addr)
    except OSError as e:
        sock.close()
        raise TargetError(f"ztunnel admin at {target.describe()} is not reachable: {e}; is "
                          "ztunnel running there (and did you mean that node/port)?") from e
    return sock


def _dechunk(body: bytes) -> bytes:
    out, rest = b"", body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2:]
    return out


def get(target: AdminTarget, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """GET ``path`` from ``target``: (status, body)."""
    deadline = time.monotonic() + timeout
    with _connect(target, timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
                     "Connection: close\r\n\r\n".encode())
        buf = b""
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise TargetError(f"{target.describe()}{path}: no complete answer within "
                                  f"{timeout}s") from None
            if not chunk:
                break
            buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) < 2 or not parts[1].isdigit():
        raise TargetError(f"{target.describe()} did not answer HTTP: {lines[0][:80]!r}")
    if any(ln.lower().startswith("transfer-encoding:") and "chunked" in ln.lower()
           for ln in lines[1:]):
        body = _dechunk(body)
    return int(parts[1]), body


def get_json(target: AdminTarget, path: str, timeout: float = 10.0) -> Any:
    status, body = get(target, path, timeout)
    if status != 200:
        raise TargetError(f"{target.describe()}{path} answered {status}: "
                          f"{body[:200].decode(errors='replace').strip()}")
    try:
        return json.loads(body)
    except ValueError as e:
        raise TargetError(f"{target.describe()}{path} did not return JSON: {e}") from e


def load_dump_file(path: Path) -> dict[str, Any]:
    """A config dump saved with ``curl localhost:15000/config_dump > dump.json``."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TargetError(f"cannot read config dump {path}: {e}") from e
    if not isinstance(data, dict):
        raise TargetError(f"{path} is not a ztunnel config dump (want a JSON object)")
    return data


async def open_stream(target: AdminTarget, path: str, timeout: float = 10.0
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a streaming GET; returns the reader positioned at the body."""
    sock = await asyncio.to_thread(_connect, target, timeout)
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock, limit=1024 * 1024)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
                 "Connection: close\r\n\r\n".encode())
    await writer.drain()
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        writer.close()
        raise TargetError(f"{target.describe()}{path}: no answer ({e!r})") from e
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ")
    if len(parts) < 2 or parts[1] != "200":
        body = b""
        try:
            body = await asyncio.wait_for(reader.read(400), 2.0)
        except (TimeoutError, OSError):
            pass
        writer.close()
        raise TargetError(f"{target.describe()}{path} answered {status_line!r}: "
                          f"{body.decode(errors='replace').strip()} (is this ztunnel new "
                          "enough to have /tap?)")
    return reader, writer
