"""Helpers for the end-to-end security tests (``test_security.py``).

Role: the small tools an attacker (or an auditor) uses against the local mesh, each with a
bound on time and size:

- :class:`Sniffer`: an AF_PACKET socket opened inside a node's (or the underlay's) netns on
  one interface, collecting raw frames on a thread for a bounded time, so a test can look for
  a plaintext marker in what really crossed the wire;
- :func:`hbone_try`: a hand-made HBONE client (our own TLS context and CONNECT authority) run
  from inside a pod netns against a real ztunnel's 15008;
- :func:`plaintext_try`: a plain TCP client that reports whether an application answered;
- the ``python security_support.py <cmd>`` entry point, run *inside* a pod or node netns
  (often as an unprivileged user): ``send`` (a marker through the echo app), ``escape``
  (what an application can do to its socket, then connections through capture) and ``ca``
  (a CreateCertificate call to the control plane's CA with a given token).  Each prints one
  JSON line.

Invariants: no helper raises for a network failure (outcomes are values); every loop is
bounded in iterations and in time; sockets are closed on every path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script inside a pod
    sys.path.insert(0, str(REPO))

from ambient.cluster.echo import read_line  # noqa: E402
from ambient.hbone.aio import HboneConnectError, open_hbone_connection  # noqa: E402
from ambient.hbone.protocol import HboneError  # noqa: E402
from ambient.identity import SpiffeId  # noqa: E402
from ambient.netns import netns_path, socket_in_netns  # noqa: E402
from ambient.tls import PeerVerificationError  # noqa: E402

ZTUNNEL_MARK = 1337
HBONE_PORT = 15008
STEP_TIMEOUT = 8.0
ETH_P_ALL = 0x0003
IP_TRANSPARENT = 19  # <linux/in.h>; socket.IP_TRANSPARENT is missing on some builds
SCRIPT = Path(__file__).resolve()


# ------------------------------------------------------------------------------ sniffing


class Sniffer:
    """Raw frames seen on ``ifname`` inside ``netns`` while the ``with`` body runs.

    Collection stops when the body ends (plus ``linger`` seconds for frames in flight), after
    ``max_seconds`` or after ``max_frames`` frames, whichever comes first.
    """

    def __init__(self, netns: str, ifname: str, *, max_seconds: float = 60.0,
                 max_frames: int = 200_000, linger: float = 0.5) -> None:
        self.netns, self.ifname = netns, ifname
        self.max_seconds, self.max_frames, self.linger = max_seconds, max_frames, linger
        self.frames: list[bytes] = []
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Sniffer:
        s = socket_in_netns(netns_path(self.netns), socket.AF_PACKET, socket.SOCK_RAW,
                            socket.htons(ETH_P_ALL))
        try:
            s.bind((self.ifname, 0))
            s.settimeout(0.1)
        except BaseException:
            s.close()
            raise
        self._sock = s
        self._thread = threading.Thread(target=self._run, name="sniffer", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        assert self._sock is not None
        deadline = time.monotonic() + self.max_seconds
        while len(self.frames) < self.max_frames and time.monotonic() < deadline:
            try:
                self.frames.append(self._sock.recv(65536))
            except TimeoutError:
                if self._stop.is_set():
                    return
            except OSError:
                return

    def __exit__(self, *exc: object) -> None:
        time.sleep(self.linger)  # frames of the last exchange still on their way
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.max_seconds + 5)
        if self._sock is not None:
            self._sock.close()

    def count(self, needle: bytes) -> int:
        """Frames containing ``needle``, and the needle across frame boundaries too."""
        per_frame = sum(needle in f for f in self.frames)
        return per_frame or int(needle in b"".join(self.frames))

    def tcp_frames(self, port: int) -> int:
        """IPv4/TCP frames to or from ``port`` (to show the sniffer saw the transfer)."""
        n = 0
        for f in self.frames:
            if len(f) < 38 or f[12:14] != b"\x08\x00" or f[23] != 6:
                continue
            ihl = (f[14] & 0x0F) * 4
            sport = int.from_bytes(f[14 + ihl:16 + ihl], "big")
            dport = int.from_bytes(f[16 + ihl:18 + ihl], "big")
            n += port in (sport, dport)
        return n


# ------------------------------------------------------------------------------ plain TCP


@dataclass
class PlainOutcome:
    """A plain TCP attempt: ``connected`` (the handshake completed, maybe with a redirect
    listener), what came back (bounded) and the error that ended it."""

    connected: bool
    reply: bytes = b""
    error: str = ""

    @property
    def app_answered(self) -> bool:
        """The echo application answered (its TCP greeting or an HTTP response)."""
        return self.reply.startswith(b"hello from ") or self.reply.startswith(b"HTTP/1.1 ")


def plaintext_try(netns: str, host: str, port: int, payload: bytes,
                  timeout: float = 3.0) -> PlainOutcome:
    """Connect from inside ``netns`` (a socket of this process, unmarked), send ``payload``,
    collect the reply until its first line, EOF, reset, 64 KiB or ``timeout``."""
    deadline = time.monotonic() + timeout
    s = socket_in_netns(netns_path(netns))
    with s:
        s.settimeout(timeout)
        try:
            s.connect((host, port))
        except OSError as e:
            return PlainOutcome(False, error=repr(e))
        reply, error = b"", ""
        try:
            s.sendall(payload)
            while (b"\n" not in reply and len(reply) < 65536
                   and time.monotonic() < deadline):
                s.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = s.recv(65536)
                if not chunk:
                    error = "eof"
                    break
                reply += chunk
        except OSError as e:
            error = repr(e)
        return PlainOutcome(True, reply, error)


# ------------------------------------------------------------------------------ HBONE


@dataclass
class HboneOutcome:
    """A hand-made HBONE attempt: ``kind`` is ``ok`` (200, ``reply`` holds what the app
    sent first), ``status`` (answered ``status``), ``tls`` (handshake or identity refused),
    ``reset`` (the stream or connection died), ``connect`` or ``timeout``."""

    kind: str
    status: int | None = None
    reply: bytes = b""
    error: str = ""


async def _hbone(netns: str, dst_ip: str, ctx: ssl.SSLContext, authority: str,
                 trust_domain: str, expected: Iterable[SpiffeId] | None,
                 payload: bytes, step: float) -> HboneOutcome:
    loop = asyncio.get_running_loop()
    sock = socket_in_netns(netns_path(netns))
    # A pod's capture would send a connection to 15008 through its own ztunnel; the mark
    # makes this one go straight out, the way a hand-crafted client (or ztunnel) would.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, ZTUNNEL_MARK)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (dst_ip, HBONE_PORT)), step)
    except (OSError, TimeoutError) as e:
        sock.close()
        return HboneOutcome("connect", error=repr(e))
    try:
        conn = await asyncio.wait_for(open_hbone_connection(
            sock, ctx, trust_domain=trust_domain, expected=expected), step)
    except TimeoutError:
        sock.close()
        return HboneOutcome("timeout", error="TLS handshake timed out")
    except (PeerVerificationError, ssl.SSLError, OSError, HboneError) as e:
        sock.close()
        return HboneOutcome("tls", error=repr(e))
    try:
        try:
            stream = await asyncio.wait_for(conn.open_stream(authority), step)
        except TimeoutError:
            return HboneOutcome("timeout", error="no answer to CONNECT")
        except HboneConnectError as e:
            if e.status is not None:
                return HboneOutcome("status", status=e.status, error=e.message)
            return HboneOutcome("reset", error=repr(e))
        except (HboneError, OSError) as e:
            # A server that refuses our client certificate after the handshake (TLS 1.3
            # sends its alert then) surfaces here, on the first read.
            return HboneOutcome("reset", error=repr(e))
        reply = b""
        try:
            if payload:
                await asyncio.wait_for(stream.write(payload), step)
            while b"\n" not in reply and len(reply) < 65536:
                data = await asyncio.wait_for(stream.read(), step)
                if not data:
                    break
                reply += data
        except (HboneError, OSError, TimeoutError) as e:
            return HboneOutcome("reset", 200, reply, repr(e))
        stream.close()
        return HboneOutcome("ok", 200, reply)
    finally:
        conn.close()


def hbone_try(netns: str, dst_ip: str, ctx: ssl.SSLContext, authority: str, *,
              trust_domain: str = "cluster.local", expected: Iterable[SpiffeId] | None = None,
              payload: bytes = b"", timeout: float = STEP_TIMEOUT) -> HboneOutcome:
    """CONNECT ``authority`` over a fresh mTLS connection from inside ``netns`` to
    ``dst_ip:15008`` (one event loop per attempt; each step bounded by ``timeout``)."""
    return asyncio.run(_hbone(netns, dst_ip, ctx, authority, trust_domain, expected, payload,
                              timeout))


# ------------------------------------------------------------------------------ in-pod tools


def _caps() -> dict[str, str]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Uid", "CapEff", "CapPrm", "CapBnd", "NoNewPrivs"):
                out[key] = value.strip()
    return out


def _errno_of(fn: Any) -> str:
    """``ok`` if ``fn()`` succeeded, else the errno name it failed with."""
    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e))


def _setsockopt_try(level: int, opt: int, value: int) -> str:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with s:
        return _errno_of(lambda: s.setsockopt(level, opt, value))


def _raw_try() -> str:
    def make() -> None:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP).close()
    return _errno_of(make)


def _probe(host: str, port: int, mark: int | None, timeout: float = 5.0) -> dict[str, Any]:
    """One connection: ``connected``, and ``ok`` if the echo app's greeting came back."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    deadline = time.monotonic() + timeout
    connected = False
    with s:
        try:
            if mark is not None:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            s.settimeout(timeout)
            s.connect((host, port))
            connected = True
            greeting, _ = read_line(s, deadline)
            return {"target": f"{host}:{port}", "connected": True,
                    "ok": greeting.startswith("hello from "),
                    "greeting": greeting.strip(), "error": ""}
        except OSError as e:
            return {"target": f"{host}:{port}", "connected": connected, "ok": False,
                    "greeting": "", "error": repr(e)}


def cmd_send(host: str, port: int, payload: bytes, timeout: float) -> dict[str, Any]:
    """Through the echo app: read its greeting, send ``payload``, read it all back."""
    deadline = time.monotonic() + timeout
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with s:
        try:
            s.settimeout(timeout)
            s.connect((host, port))
            greeting, echoed = read_line(s, deadline)
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            while len(echoed) < len(payload) + 65536 and time.monotonic() < deadline:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = s.recv(65536)
                if not chunk:
                    break
                echoed += chunk
            return {"ok": echoed == payload, "greeting": greeting,
                    "echoed": len(echoed), "error": ""}
        except OSError as e:
            return {"ok": False, "greeting": "", "echoed": 0, "error": repr(e)}


def cmd_escape(targets: list[str], mark: int | None) -> dict[str, Any]:
    """What this process may do to its sockets, then one connection per ``host:port``."""
    conns = []
    for t in targets:
        host, _, port = t.rpartition(":")
        conns.append(_probe(host, int(port), mark))
    return {
        "status": _caps(),
        "so_mark": _setsockopt_try(socket.SOL_SOCKET, socket.SO_MARK, ZTUNNEL_MARK),
        "ip_transparent": _setsockopt_try(socket.SOL_IP, IP_TRANSPARENT, 1),
        "raw_socket": _raw_try(),
        "connections": conns,
    }


def cmd_ca(address: str, root: str, identity: str, token_file: str | None,
           token: str | None, alt_hostname: str) -> dict[str, Any]:
    """CreateCertificate for ``identity`` (impersonated, as a node proxy asks)."""
    from ambient.certs import CertificateError, GrpcCaProvider
    from ambient.grpclite import GrpcError

    provider = GrpcCaProvider(address, Path(root).read_bytes(), token_file, token=token,
                              alt_hostname=alt_hostname)

    async def fetch() -> dict[str, Any]:
        try:
            cert = await provider.fetch(SpiffeId.parse(identity))
            return {"ok": True, "code": "OK", "identity": str(cert.identity), "error": ""}
        except CertificateError as e:
            cause = e.__cause__
            code = cause.code.name if isinstance(cause, GrpcError) else "?"
            return {"ok": False, "code": code, "identity": "", "error": str(e)}
        finally:
            await provider.close()

    return asyncio.run(fetch())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="security_support.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("send")
    sp.add_argument("--host", required=True)
    sp.add_argument("--port", type=int, required=True)
    sp.add_argument("--payload-hex", required=True)
    sp.add_argument("--timeout", type=float, default=10.0)
    ep = sub.add_parser("escape")
    ep.add_argument("--target", action="append", default=[])
    ep.add_argument("--mark", type=int, default=None)
    cp = sub.add_parser("ca")
    cp.add_argument("--address", required=True)
    cp.add_argument("--root", required=True)
    cp.add_argument("--identity", required=True)
    cp.add_argument("--token-file", default=None)
    cp.add_argument("--token", default=None)
    cp.add_argument("--alt-hostname", default="istiod.istio-system.svc")
    args = ap.parse_args(argv)
    if args.cmd == "send":
        out = cmd_send(args.host, args.port, bytes.fromhex(args.payload_hex), args.timeout)
    elif args.cmd == "escape":
        out = cmd_escape(args.target, args.mark)
    else:
        out = cmd_ca(args.address, args.root, args.identity, args.token_file, args.token,
                     args.alt_hostname)
    print(json.dumps(out), flush=True)
    return 0


def parse_last_json(stdout: str, stderr: str) -> dict[str, Any]:
    """The JSON line a ``security_support.py`` command printed, or an ``error`` entry."""
    for line in reversed(stdout.strip().splitlines()):
        with contextlib.suppress(ValueError):
            data = json.loads(line)
            if isinstance(data, dict):
                return data
    return {"ok": False, "error": f"no result: {stderr.strip()[-800:]}"}


def unprivileged(argv: list[str], uid: int = 65534, gid: int = 65534) -> list[str]:
    """``argv`` as an unprivileged user with no capability at all (none to regain)."""
    return ["/usr/bin/setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", *argv]


def net_raw_only(argv: list[str]) -> list[str]:
    """``argv`` as root with CAP_NET_RAW as its only capability: a container running as
    root with the runtime's default capabilities, minus everything but NET_RAW."""
    return ["/usr/bin/setpriv", "--inh-caps=-all", "--bounding-set=-all,+net_raw",
            "--no-new-privs", *argv]


if __name__ == "__main__":
    raise SystemExit(main())
