"""The pod application of the local cluster, and probes that run *from* a pod.

Server (``python -m ambient.cluster.echo serve --tcp 8080 --http 8081 --name <pod>``):
- TCP: on connect send one line ``hello from <name>; you are <peer ip>:<port>``, then echo
  everything until EOF and half-close back.
- HTTP/1.1: any method returns 200 with JSON ``{"pod", "client", "path" (the request target,
  query included), "method", "headers"}`` and the header ``x-pod: <name>`` (keep-alive
  honoured); ``/status/<code>`` answers with that status instead.

Client API (for the harness and tests): ``tcp_probe`` / ``http_get`` / ``http_request`` open
their socket inside the pod netns with ``ambient.netns.socket_in_netns``, so the connection
originates in that pod and goes through the pod's capture rules.  The ``probe`` and ``http``
subcommands run the same clients *as the pod's application* (started in its cgroup and netns
by ``LocalCluster.run_in_pod``).  Every step has a bounded timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from ambient.netns import NetnsRef, netns_path, socket_in_netns

GREETING_RE = re.compile(r"^hello from (?P<name>\S+); you are (?P<ip>[^ ]+):(?P<port>\d+)$")
_MAX_HEADER = 64 * 1024


# ---------------------------------------------------------------------------------- server


async def _handle_tcp(name: str, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
    peer = writer.get_extra_info("peername") or ("?", 0)
    try:
        writer.write(f"hello from {name}; you are {peer[0]}:{peer[1]}\n".encode())
        await writer.drain()
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _handle_http(name: str, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
    peer = writer.get_extra_info("peername") or ("?", 0)
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3:
                writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n"
                             b"connection: close\r\n\r\n")
                await writer.drain()
                return
            method, path, version = parts
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            length = int(headers.get("content-length", "0") or 0)
            if length:
                await reader.readexactly(length)
            close = (headers.get("connection", "").lower() == "close"
                     or version == "HTTP/1.0")
            status, body = _http_answer(name, peer[0], method, path, headers)
            delay = re.search(r"[?&]delay_ms=(\d{1,5})\b", path)
            if delay:  # a slow backend, for timeout tests
                await asyncio.sleep(int(delay[1]) / 1000)
            writer.write(
                f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nx-pod: {name}\r\n"
                f"connection: {'close' if close else 'keep-alive'}\r\n\r\n".encode()
                + (body if method != "HEAD" else b""))
            await writer.drain()
            if close:
                return
    except (ConnectionError, OSError, asyncio.IncompleteReadError, ValueError):
        pass
    finally:
        writer.close()


def _http_answer(name: str, client: str, method: str, target: str,
                 headers: dict[str, str]) -> tuple[str, bytes]:
    """(status line, JSON body) for one request: ``/status/<code>`` answers ``<code>``;
    everything else 200 (``?delay_ms=N`` answers N ms late).  The body echoes what the app
    saw and how many requests it has served (for L7 tests)."""
    global _served
    _served += 1
    code = 200
    m = re.fullmatch(r"/status/(\d{3})", target.partition("?")[0])
    if m and 200 <= int(m[1]) <= 599:
        code = int(m[1])
    body = json.dumps({"pod": name, "client": client, "path": target, "method": method,
                       "headers": headers, "served": _served}).encode()
    if code in (204, 304):
        body = b""  # these responses have no body
    return f"{code} {_REASONS.get(code, 'Status')}", body


_served = 0  # HTTP requests this echo app has answered
_REASONS = {200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request", 403: "Forbidden",
            404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error",
            502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


async def serve(name: str, tcp_port: int | None, http_port: int | None,
                host: str = "0.0.0.0") -> None:
    servers = []
    if tcp_port:
        servers.append(await asyncio.start_server(
            lambda r, w: _handle_tcp(name, r, w), host, tcp_port, reuse_address=True))
    if http_port:
        servers.append(await asyncio.start_server(
            lambda r, w: _handle_http(name, r, w), host, http_port, reuse_address=True,
            limit=_MAX_HEADER))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"echo {name}: listening tcp={tcp_port} http={http_port}", flush=True)
    await stop.wait()
    for s in servers:
        s.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ambient.cluster.echo")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("serve", help="run the echo application")
    sp.add_argument("--tcp", type=int, default=8080)
    sp.add_argument("--http", type=int, default=8081)
    sp.add_argument("--name", default=os.uname().nodename)
    sp.add_argument("--host", default="0.0.0.0")
    pp = sub.add_parser("probe", help="connect to an echo server as a pod's application "
                                       "would, print the result as JSON")
    pp.add_argument("--host", required=True)
    pp.add_argument("--port", type=int, default=8080)
    pp.add_argument("--timeout", type=float, default=5.0)
    hp = sub.add_parser("hold", help="open one connection and keep it alive (a ping per "
                                      "interval) until the peer closes it; print each step")
    hp.add_argument("--host", required=True)
    hp.add_argument("--port", type=int, default=8080)
    hp.add_argument("--max-seconds", type=float, default=60.0)
    tp = sub.add_parser("http", help="send HTTP/1.1 requests as a pod's application would "
                                      "(a new connection each); print one JSON line with all")
    tp.add_argument("--host", required=True)
    tp.add_argument("--port", type=int, default=80)
    tp.add_argument("--path", default="/")
    tp.add_argument("--method", default="GET")
    tp.add_argument("--header", action="append", default=[], metavar="NAME:VALUE")
    tp.add_argument("--count", type=int, default=1)
    tp.add_argument("--timeout", type=float, default=5.0)
    args = ap.parse_args(argv)
    if args.cmd == "http":
        hdrs = [tuple(h.split(":", 1)) for h in args.header if ":" in h]
        out = [http_request(None, args.host, args.port, args.path, method=args.method,
                            headers=[(k.strip(), v.strip()) for k, v in hdrs],
                            timeout=args.timeout).to_json()
               for _ in range(max(0, min(args.count, 10_000)))]
        print(json.dumps({"results": out}))
        return 0
    if args.cmd == "hold":
        return hold(args.host, args.port, args.max_seconds)
    if args.cmd == "probe":
        r = tcp_probe(None, args.host, args.port, timeout=args.timeout)
        print(json.dumps({"ok": r.ok, "greeting": r.greeting,
                          "echoed": r.echoed.decode(errors="replace"), "error": r.error}))
        return 0
    asyncio.run(serve(args.name, args.tcp, args.http, args.host))
    return 0


# ---------------------------------------------------------------------------------- client


def hold(host: str, port: int, max_seconds: float, interval: float = 0.2) -> int:
    """A long-lived client: prints ``connected <greeting>``, then pings until the connection
    is closed or reset (prints ``closed <why>``, exit 0) or ``max_seconds`` pass (exit 1)."""
    deadline = time.monotonic() + max_seconds
    try:
        s = _connect(None, host, port, 5.0, None)
        greeting, _ = read_line(s, time.monotonic() + 5.0)
    except OSError as e:
        print(f"failed {e!r}", flush=True)
        return 1
    print(f"connected {greeting}", flush=True)
    with s:
        while time.monotonic() < deadline:
            try:
                s.settimeout(2.0)
                s.sendall(b"ping\n")
                if not s.recv(64):
                    print("closed eof", flush=True)
                    return 0
            except OSError as e:
                print(f"closed {e!r}", flush=True)
                return 0
            time.sleep(interval)
    print("timeout", flush=True)
    return 1



@dataclass
class ProbeResult:
    ok: bool
    greeting: str = ""
    echoed: bytes = b""
    error: str = ""

    @property
    def server_name(self) -> str | None:
        m = GREETING_RE.match(self.greeting)
        return m["name"] if m else None

    @property
    def seen_client(self) -> tuple[str, int] | None:
        """The (ip, port) the server saw as its peer, from the greeting."""
        m = GREETING_RE.match(self.greeting)
        return (m["ip"], int(m["port"])) if m else None


def _connect(netns: NetnsRef | None, host: str, port: int, timeout: float,
             mark: int | None) -> socket.socket:
    if netns is None:  # this process's own netns (a probe running inside the pod)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    else:
        target = netns if isinstance(netns, int) else netns_path(netns)
        s = socket_in_netns(target, socket.AF_INET, socket.SOCK_STREAM)
    try:
        if mark is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        s.settimeout(timeout)
        s.connect((host, port))
        return s
    except BaseException:
        s.close()
        raise


def read_line(s: socket.socket, deadline: float, limit: int = 4096) -> tuple[str, bytes]:
    """One line (the echo app's greeting) and what followed it, read before ``deadline``."""
    buf = b""
    while b"\n" not in buf and len(buf) < limit:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    line, _, rest = buf.partition(b"\n")
    return line.decode(errors="replace"), rest


def tcp_probe(netns: NetnsRef | None, host: str, port: int, payload: bytes = b"ping\n",
              timeout: float = 5.0, mark: int | None = None) -> ProbeResult:
    """Connect from inside ``netns`` to the echo server, check greeting and echo.

    ``netns`` is an ``ip netns`` name, a path or an fd; ``mark`` sets SO_MARK on the socket.
    Never raises for network errors: they are reported in ``ProbeResult.error``.
    """
    deadline = time.monotonic() + timeout
    try:
        s = _connect(netns, host, port, timeout, mark)
    except OSError as exc:
        return ProbeResult(False, error=f"connect {host}:{port}: {exc!r}")
    with s:
        try:
            greeting, rest = read_line(s, deadline)
            s.settimeout(max(0.01, deadline - time.monotonic()))
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            echoed = rest
            while len(echoed) <= len(payload) + 65536:  # until EOF, bounded
                s.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = s.recv(65536)
                if not chunk:
                    break
                echoed += chunk
        except OSError as exc:
            return ProbeResult(False, error=f"{host}:{port}: {exc!r}")
    ok = bool(GREETING_RE.match(greeting)) and echoed == payload
    err = "" if ok else f"unexpected reply: greeting={greeting!r} echoed={echoed!r}"
    return ProbeResult(ok, greeting, echoed, err)


def http_get(netns: NetnsRef, host: str, port: int, path: str = "/",
             timeout: float = 5.0, mark: int | None = None) -> tuple[int, dict[str, object]]:
    """GET ``path`` from inside ``netns``; returns (status, parsed JSON body or {}).

    Raises OSError on network errors and TimeoutError past ``timeout``.
    """
    deadline = time.monotonic() + timeout
    with _connect(netns, host, port, timeout, mark) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nhost: {host}:{port}\r\nconnection: close\r\n\r\n"
                  .encode())
        buf = b""
        while True:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode(errors="replace")
    parts = status_line.split(" ")
    if len(parts) < 2 or not parts[1].isdigit():
        raise OSError(f"bad HTTP response from {host}:{port}: {status_line!r}")
    try:
        data = json.loads(body) if body else {}
    except ValueError:
        data = {"raw": body.decode(errors="replace")}
    return int(parts[1]), data


@dataclass
class HttpResult:
    """One HTTP exchange: ``status`` 0 means no response (``error`` says why)."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: str = ""

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def json(self) -> dict[str, Any]:
        try:
            data = json.loads(self.body)
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "headers": self.headers, "body": self.text,
                "error": self.error}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> HttpResult:
        return cls(int(d.get("status", 0)), dict(d.get("headers") or {}),
                   str(d.get("body", "")).encode(), str(d.get("error", "")))


def http_request(netns: NetnsRef | None, host: str, port: int, path: str = "/", *,
                 method: str = "GET", headers: list[tuple[str, str]] | None = None,
                 body: bytes = b"", timeout: float = 5.0) -> HttpResult:
    """One HTTP/1.1 request on a new connection (``connection: close``).  Never raises for
    network or protocol errors: they are in ``HttpResult.error`` with ``status`` 0."""
    deadline = time.monotonic() + timeout
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}:{port}", "connection: close",
             f"content-length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    try:
        s = _connect(netns, host, port, timeout, None)
    except OSError as exc:
        return HttpResult(error=f"connect {host}:{port}: {exc!r}")
    buf = b""
    with s:
        try:
            s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
            while len(buf) < 16 * 1024 * 1024:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except OSError as exc:
            if not buf:
                return HttpResult(error=f"{host}:{port}: {exc!r}")
    return _parse_response(buf, f"{host}:{port}")


def _parse_response(buf: bytes, where: str) -> HttpResult:
    head, sep, rest = buf.partition(b"\r\n\r\n")
    status_line, *hlines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if not sep or len(parts) < 2 or not parts[1].isdigit():
        return HttpResult(error=f"no HTTP response from {where}: {buf[:80]!r}")
    hdrs: dict[str, str] = {}
    for line in hlines:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    if "chunked" in hdrs.get("transfer-encoding", "").lower():
        body = b""
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            try:
                size = int(size_line.split(b";")[0] or b"0", 16)
            except ValueError:
                return HttpResult(error=f"bad chunked body from {where}: {size_line[:40]!r}")
            if size == 0:
                break
            body, rest = body + rest[:size], rest[size + 2:]
    elif "content-length" in hdrs and hdrs["content-length"].isdigit():
        body = rest[:int(hdrs["content-length"])]
    else:
        body = rest
    return HttpResult(int(parts[1]), hdrs, body)


def wait_listening(pid: int, port: int, timeout: float = 10.0) -> bool:
    """Wait until process ``pid``'s netns has a TCP listener on ``port`` (reads
    ``/proc/<pid>/net/tcp``; sends no traffic).  Returns False on timeout or if pid dies."""
    deadline = time.monotonic() + timeout
    want = f":{port:04X}"
    while time.monotonic() < deadline:
        for fname in ("tcp", "tcp6"):
            try:
                with open(f"/proc/{pid}/net/{fname}") as f:
                    next(f, None)
                    for line in f:
                        cols = line.split()
                        if len(cols) > 3 and cols[1].endswith(want) and cols[3] == "0A":
                            return True
            except (FileNotFoundError, ProcessLookupError):
                return False
        time.sleep(0.02)
    return False


if __name__ == "__main__":
    raise SystemExit(main())
