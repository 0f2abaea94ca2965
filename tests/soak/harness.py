"""Load, soak and slow-peer scenarios against a real local mesh (shared by ``make soak`` and
``tests/e2e/test_load.py``).

The mesh is ``tests/soak/mesh.yaml``: namespace ``load`` (ambient, STRICT, an ALLOW policy for
the client's service account), pod ``client`` on node-a and pod ``server`` on node-b, iptables
capture. The server pod runs ``loadapp serve`` on 9000; the client pod runs ``loadapp hold`` or
``loadapp rate`` as its application, so every connection crosses node-a's ztunnel (15001 ->
HBONE) and node-b's (15008 -> the app).

What is measured, per ztunnel process: RSS (``VmRSS``), open descriptors (``/proc/<pid>/fd``)
and live connections (``istio_tcp_connections_opened_total`` minus ``..._closed_total``).

The slow peers run in this process, from inside the client pod's netns with ztunnel's socket
mark (so capture lets them out, as a hand-made HBONE client would), against node-b's ztunnel
on the server pod's 15008, each kind several times at once.

Invariants: every wait is bounded (a scenario raises ``SoakError`` naming what did not
happen); nothing is sent outside the namespaces the mesh created; the mesh is torn down by
the caller (``SoakMesh`` is a context manager).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ambient import tls
from ambient.ca import CertificateAuthority
from ambient.cluster import demo
from ambient.cluster.echo import wait_listening
from ambient.cluster.mesh import LocalMesh
from ambient.hbone.aio import HboneStream, open_hbone_connection
from ambient.hbone.protocol import HboneError, HboneSettings
from ambient.identity import SpiffeId
from ambient.netns import netns_path, socket_in_netns

MANIFESTS = Path(__file__).with_name("mesh.yaml")
REPO = Path(__file__).resolve().parents[2]
APP_PORT = 9000
ZTUNNEL_MARK = 1337
HBONE_PORT = 15008
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
NO_PINGS = HboneSettings(ping_interval=1e9, ping_timeout=1e9)
KERNEL_COUNTERS = frozenset({
    "TcpExtListenOverflows", "TcpExtListenDrops", "TcpAttemptFails", "TcpEstabResets",
    "TcpOutRsts", "TcpExtTW", "TcpExtTWRecycled", "TcpExtTCPAbortOnData",
    "TcpExtTCPAbortOnClose", "TcpExtTCPChallengeACK", "TcpExtPAWSEstab", "TcpExtTCPTimeouts",
    "TcpExtTCPReqQFullDrop", "TcpExtTCPSynRetrans",
})


class SoakError(AssertionError):
    """A scenario did not reach the state it waits for within its bound."""


@dataclass
class ProcStats:
    rss_kib: int
    fds: int
    live: float
    cpu_s: float = 0.0  # user + system CPU time of the process so far

    def text(self) -> str:
        return f"RSS {self.rss_kib / 1024:.1f} MiB, {self.fds} fds, {self.live:g} live"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(pred: Callable[[], Any], timeout: float, what: str, step: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise SoakError(f"{what}: not reached within {timeout:g}s")
        time.sleep(step)


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()


class SoakMesh:
    """The two-node mesh with the load server running (context manager)."""

    def __init__(self, root: Path, ztunnel_env: dict[str, str] | None = None,
                 capture: str = "iptables") -> None:
        self.mesh = LocalMesh(MANIFESTS, name=f"soak{secrets.token_hex(2)}", run_root=root,
                              capture=capture, ztunnel_env=dict(ztunnel_env or {}))

    def __enter__(self) -> SoakMesh:
        try:
            self.mesh.up(progress=lambda _m: None)
            assert self.mesh.cluster is not None
            proc = self.mesh.cluster.start_app(
                self.mesh.pods["load/server"],
                [sys.executable, "-m", "tests.soak.loadapp", "serve", "--port", str(APP_PORT),
                 "--flood-bytes", str(256 << 20)],
                env=self.env(), log_name="loadserver")
            if not wait_listening(proc.pid, APP_PORT, 20):
                raise SoakError(f"load server not listening; see {self.log('loadserver')}")
        except BaseException:
            self.mesh.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        errors = self.mesh.down()
        if errors:
            raise SoakError(f"mesh teardown left: {errors}")

    @staticmethod
    def env() -> dict[str, str]:
        return {"PYTHONPATH": str(REPO), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}

    def log(self, name: str) -> Path:
        return self.mesh.run_dir / "logs" / f"{name}.log"

    @property
    def server_ip(self) -> str:
        return str(self.mesh.pods["load/server"].ip)

    def stats(self, node: str) -> ProcStats:
        pid = self.mesh.ztunnels[node].pid
        rss = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
        fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
        text = self.mesh.metrics(node)
        live = (demo.metric_value(text, "istio_tcp_connections_opened_total")
                - demo.metric_value(text, "istio_tcp_connections_closed_total"))
        return ProcStats(rss, fds, live, round(cpu_seconds(pid), 2))

    def flags(self, node: str) -> dict[str, float]:
        """``istio_tcp_connections_closed_total`` by ``response_flags`` (``-`` is success)."""
        out: dict[str, float] = {}
        for fam in demo.text_string_to_metric_families(self.mesh.metrics(node)):
            for smp in fam.samples:
                if smp.name == "istio_tcp_connections_closed_total":
                    f = smp.labels.get("response_flags", "?")
                    out[f] = out.get(f, 0) + smp.value
        return out

    def log_offset(self, node: str) -> int:
        return self.mesh.log_path(node).stat().st_size

    def log_errors(self, node: str, offset: int) -> dict[str, int]:
        """Access-log ``error=`` texts (first 70 chars) and WARNING/ERROR lines since
        ``offset`` in ``node``'s ztunnel log, counted."""
        counts: dict[str, int] = {}
        with self.mesh.log_path(node).open("rb") as f:
            f.seek(offset)
            for raw in f:
                line = raw.decode(errors="replace")
                key = ""
                if 'error="' in line:
                    key = "error=" + line.split('error="', 1)[1].split('"', 1)[0][:70]
                elif "\twarn\t" in line or "\terror\t" in line:
                    key = line.split("\t", 3)[-1].strip()[:90]
                if key:
                    counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:12])

    def kernel_counters(self, pod: str) -> dict[str, int]:
        """TCP counters of a pod's netns (``nstat``): drops, resets, TIME_WAIT reuse."""
        ns = netns_path(self.mesh.pods[pod].netns)
        p = subprocess.run(["nsenter", f"--net={ns}", "nstat", "-asz"], capture_output=True,
                           text=True, timeout=10, check=False)
        out = {}
        for line in p.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] in KERNEL_COUNTERS:
                out[parts[0]] = int(parts[1])
        return out

    def both(self) -> dict[str, ProcStats]:
        return {"node-a": self.stats("node-a"), "node-b": self.stats("node-b")}

    def settle(self, baseline: dict[str, ProcStats], timeout: float = 60.0,
               fd_slack: int = 0) -> dict[str, ProcStats]:
        """Wait until both ztunnels have no live connection and their fds are back at the
        baseline (plus ``fd_slack``); returns the stats then."""
        def done() -> dict[str, ProcStats] | None:
            now = self.both()
            ok = all(now[n].live == 0 and now[n].fds <= baseline[n].fds + fd_slack
                     for n in now)
            return now if ok else None
        try:
            return wait_for(done, timeout, "ztunnels back to no connections and baseline fds",
                            step=1.0)
        except SoakError as e:
            raise SoakError(f"{e}: now {self.both()}, baseline {baseline}") from None

    def run_client(self, argv: list[str], name: str) -> Any:
        assert self.mesh.cluster is not None
        return self.mesh.cluster.start_app(
            self.mesh.pods["load/client"],
            [sys.executable, "-m", "tests.soak.loadapp", *argv], env=self.env(),
            log_name=name)

    def status_path(self, name: str) -> Path:
        return self.mesh.run_dir / f"{name}.json"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
        return doc
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- concurrent hold


@dataclass
class HoldReport:
    count: int
    peak: dict[str, Any]
    done: dict[str, Any]
    before: dict[str, dict[str, Any]]
    at_peak: dict[str, dict[str, Any]]
    after: dict[str, dict[str, Any]]
    load: str = ""


def hold_scenario(sm: SoakMesh, count: int, *, max_seconds: float = 600.0) -> HoldReport:
    """``count`` concurrent connections held open, then closed; ztunnels measured around it."""
    before = sm.both()
    name = f"hold{count}"
    status, release = sm.status_path(name), sm.mesh.run_dir / f"{name}.release"
    for stale in (status, release):  # from an earlier round
        stale.unlink(missing_ok=True)
    proc = sm.run_client(["hold", "--host", sm.server_ip, "--port", str(APP_PORT), "--count",
                          str(count), "--status", str(status), "--release-file", str(release),
                          "--max-seconds", str(max_seconds)], name)
    try:
        def phase(p: str) -> dict[str, Any] | None:
            doc = _read_json(status)
            if doc is None and proc.popen.poll() is not None:
                raise SoakError(f"hold client exited early; see {sm.log(name)}")
            return doc if doc and doc.get("phase") == p else None
        peak = wait_for(lambda: phase("peak"), max_seconds + 30, "hold: all connections open")
        at_peak = sm.both()
        load = load_average()
        release.touch()
        done = wait_for(lambda: phase("done"), max_seconds + 30, "hold: all connections closed")
        proc.popen.wait(timeout=30)
    finally:
        if proc.popen.poll() is None:
            proc.popen.kill()
            proc.popen.wait(timeout=10)
    after = sm.settle(before, timeout=120)
    return HoldReport(count, peak, done, {k: asdict(v) for k, v in before.items()},
                      {k: asdict(v) for k, v in at_peak.items()},
                      {k: asdict(v) for k, v in after.items()}, load)


# --------------------------------------------------------------------------- connection rate


@dataclass
class RateReport:
    rate: float
    seconds: float
    result: dict[str, Any]
    before: dict[str, dict[str, Any]]
    after: dict[str, dict[str, Any]]
    peak_rss_kib: dict[str, int] = field(default_factory=dict)
    load: str = ""
    closed_by_flag: dict[str, dict[str, float]] = field(default_factory=dict)
    log_errors: dict[str, dict[str, int]] = field(default_factory=dict)
    kernel: dict[str, dict[str, int]] = field(default_factory=dict)  # counter deltas per pod


def rate_scenario(sm: SoakMesh, per_second: float, seconds: float) -> RateReport:
    """``per_second`` new connections per second for ``seconds``, each connect + echo + close."""
    before = sm.both()
    flags0 = {n: sm.flags(n) for n in before}
    offsets = {n: sm.log_offset(n) for n in before}
    pods = ("load/client", "load/server")
    k0 = {p: sm.kernel_counters(p) for p in pods}
    name = f"rate{int(per_second)}x{int(seconds)}"
    status = sm.status_path(name)
    status.unlink(missing_ok=True)
    proc = sm.run_client(["rate", "--host", sm.server_ip, "--port", str(APP_PORT), "--rate",
                          str(per_second), "--seconds", str(seconds), "--status", str(status)],
                         name)
    peak = {n: s.rss_kib for n, s in before.items()}
    load = ""
    try:
        deadline = time.monotonic() + seconds + 180
        while proc.popen.poll() is None and time.monotonic() < deadline:
            time.sleep(2.0)
            with contextlib.suppress(OSError, ValueError):
                for n, s in sm.both().items():
                    peak[n] = max(peak[n], s.rss_kib)
            load = load or (load_average() if time.monotonic() > deadline - 180 - seconds / 2
                            else "")
        if proc.popen.poll() is None:
            raise SoakError(f"rate client still running after {seconds + 180:g}s")
    finally:
        if proc.popen.poll() is None:
            proc.popen.kill()
            proc.popen.wait(timeout=10)
    result = _read_json(status)
    if result is None:
        raise SoakError(f"rate client wrote no result; see {sm.log(name)}")
    after = sm.settle(before, timeout=120)
    by_flag = {}
    for n in before:
        now = sm.flags(n)
        by_flag[n] = {f: v - flags0[n].get(f, 0) for f, v in now.items()
                      if v - flags0[n].get(f, 0)}
    return RateReport(per_second, seconds, result, {k: asdict(v) for k, v in before.items()},
                      {k: asdict(v) for k, v in after.items()}, peak, load, by_flag,
                      {n: sm.log_errors(n, offsets[n]) for n in before},
                      {p: {k: v - k0[p].get(k, 0) for k, v in sm.kernel_counters(p).items()
                           if v - k0[p].get(k, 0)} for p in pods})


# --------------------------------------------------------------------------- slow peers


@dataclass
class PeerOutcome:
    kind: str
    closed_by_ztunnel: bool
    detail: str
    seconds: float
    served: bool | None = None  # trickle: did the bytes it trickled come back?


def _client_ctx(sm: SoakMesh) -> ssl.SSLContext:
    ca = CertificateAuthority.load_dir(sm.mesh.run_dir / "ca")
    return tls.client_context(ca.issue(SpiffeId("cluster.local", "load", "client")))


async def _dial(netns: str, ip: str) -> socket.socket:
    sock = socket_in_netns(netns_path(netns))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, ZTUNNEL_MARK)
    sock.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (ip, HBONE_PORT)), 10)
    return sock


async def _until_closed(reader: asyncio.StreamReader, bound: float) -> str:
    """Read (and drop) until the peer closes; 'eof'/'reset', or raise TimeoutError."""
    end = asyncio.get_running_loop().time() + bound
    try:
        for _ in range(100_000):
            data = await asyncio.wait_for(reader.read(65536),
                                          max(0.01, end - asyncio.get_running_loop().time()))
            if not data:
                return "eof"
    except TimeoutError:  # before OSError, of which it is a subclass
        raise
    except (ConnectionError, ssl.SSLError, OSError) as e:
        return f"reset ({type(e).__name__})"
    raise TimeoutError


async def _silent(netns: str, ip: str, ctx: ssl.SSLContext, bound: float) -> PeerOutcome:
    """TCP to 15008, then nothing: no ClientHello."""
    t = time.monotonic()
    sock = await _dial(netns, ip)
    loop = asyncio.get_running_loop()
    try:
        data = await asyncio.wait_for(loop.sock_recv(sock, 1024), bound)
        how = "eof" if not data else f"{len(data)} bytes"
        return PeerOutcome("silent", not data, how, time.monotonic() - t)
    except TimeoutError:
        return PeerOutcome("silent", False, "still open", time.monotonic() - t)
    except OSError as e:
        return PeerOutcome("silent", True, f"reset ({type(e).__name__})", time.monotonic() - t)
    finally:
        sock.close()


async def _tls_then(netns: str, ip: str, ctx: ssl.SSLContext, kind: str, bound: float,
                    trickle: bytes) -> PeerOutcome:
    """TLS completes; then nothing (``trickle`` empty) or ``trickle`` one byte a second."""
    t = time.monotonic()
    sock = await _dial(netns, ip)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(sock=sock, ssl=ctx, server_hostname=""), 10)
    try:
        closed = asyncio.ensure_future(_until_closed(reader, bound))
        for b in trickle:
            if closed.done():
                break
            try:
                writer.write(bytes([b]))
                await writer.drain()
            except (ConnectionError, OSError):
                break
            await asyncio.wait([closed], timeout=1.0)
        try:
            how = await closed
            return PeerOutcome(kind, True, how, time.monotonic() - t)
        except TimeoutError:
            return PeerOutcome(kind, False, "still open", time.monotonic() - t)
    finally:
        writer.transport.abort()


async def _stream_peer(netns: str, ip: str, ctx: ssl.SSLContext, kind: str, bound: float,
                       trickle_s: int, tcp_nonreader: bool = False) -> PeerOutcome:
    """A real HBONE CONNECT to the load server. ``trickle``: send ``hello\\n`` spread over
    ``trickle_s`` seconds, read the echo, then go quiet. ``zero-window``: ask for a flood
    and never read (HTTP/2 window closes; with ``tcp_nonreader`` not even TCP is read)."""
    t = time.monotonic()
    sock = await _dial(netns, ip)
    # No keepalive of our own: a peer that gives up by itself would prove nothing.
    conn = await asyncio.wait_for(open_hbone_connection(
        sock, ctx, trust_domain="cluster.local", expected=None, settings=NO_PINGS), 10)
    served: bool | None = None
    try:
        stream = await asyncio.wait_for(conn.open_stream(f"{ip}:{APP_PORT}"), 10)
        if kind == "trickle-stream":
            line = b"hello\n"
            pace = trickle_s / len(line)
            for b in line:
                await stream.write(bytes([b]))
                await asyncio.sleep(pace)
            got = b""
            while not got.endswith(b"\n") and len(got) < 64:
                got += await asyncio.wait_for(stream.read(), 10)
            served = got == line
        else:
            await stream.write(b"flood\n")
            if tcp_nonreader and conn._transport is not None:
                conn._transport.pause_reading()  # stop reading TCP at all
        outcome = await _wait_reset(stream, bound, tcp_nonreader, conn)
        return PeerOutcome(kind, outcome != "still open", outcome, time.monotonic() - t, served)
    except (HboneError, OSError, TimeoutError) as e:
        return PeerOutcome(kind, False, f"failed: {e!r}", time.monotonic() - t, served)
    finally:
        conn.abort()


async def _wait_reset(stream: HboneStream, bound: float, tcp_nonreader: bool,
                      conn: Any) -> str:
    """Wait (without reading) until ztunnel ends the stream or the connection."""
    loop = asyncio.get_running_loop()
    end = loop.time() + bound
    if tcp_nonreader:
        # Not reading TCP, we cannot see ztunnel's GOAWAY/FIN (it sits behind the bytes the
        # kernel holds for us). Stay deaf for half the bound, at most 30 s (several idle
        # timeouts, and longer than ztunnel's keepalive needs to give up on us), then
        # read again: a connection ztunnel closed ends as soon as those bytes are drained.
        resume_at = loop.time() + min(bound / 2, 30.0)
        while loop.time() < end:
            await asyncio.sleep(0.5)
            if conn.closed.done():
                return "connection closed"
            if resume_at and loop.time() >= resume_at and conn._transport is not None:
                conn._transport.resume_reading()
                resume_at = 0.0
        return "still open"
    while loop.time() < end:
        await asyncio.sleep(0.5)
        if stream._error is not None or stream._eof:  # reset arrives even unread
            return "stream reset" if stream._error is not None else "stream ended"
    return "still open"


@dataclass
class SlowPeerReport:
    per_kind: int
    settings: dict[str, str]
    outcomes: list[dict[str, Any]]
    before: dict[str, Any]
    during: dict[str, Any]
    after: dict[str, Any]
    normal_ok_during: bool


def slow_peer_scenario(sm: SoakMesh, per_kind: int, bound: float,
                       settings: dict[str, str]) -> SlowPeerReport:
    """``per_kind`` peers of each slow kind at once against node-b's ztunnel; each must be
    closed by ztunnel within ``bound`` seconds, a normal connection must work meanwhile,
    and node-b's descriptors must return to the baseline."""
    netns = sm.mesh.pods["load/client"].netns
    ip = sm.server_ip
    ctx = _client_ctx(sm)
    before = sm.stats("node-b")
    during: dict[str, Any] = {}
    normal: list[bool] = []

    async def main() -> list[PeerOutcome]:
        peers = []
        for _ in range(per_kind):
            peers += [
                _silent(netns, ip, ctx, bound),
                _tls_then(netns, ip, ctx, "tls-no-preface", bound, b""),
                _tls_then(netns, ip, ctx, "preface-trickle", bound, PREFACE),
                _stream_peer(netns, ip, ctx, "trickle-stream", bound, 6),
                _stream_peer(netns, ip, ctx, "zero-window", bound, 0),
                _stream_peer(netns, ip, ctx, "tcp-nonreader", bound, 0, tcp_nonreader=True),
            ]
        tasks = [asyncio.ensure_future(p) for p in peers]
        await asyncio.sleep(1.5)
        loop = asyncio.get_running_loop()
        s = await loop.run_in_executor(None, sm.stats, "node-b")
        during.update(asdict(s))
        probe = await loop.run_in_executor(None, _normal_probe, sm)
        normal.append(probe)
        return list(await asyncio.gather(*tasks))

    outcomes = asyncio.run(main())
    after = sm.settle({"node-a": sm.stats("node-a"), "node-b": before}, timeout=bound + 30)
    return SlowPeerReport(per_kind, settings, [asdict(o) for o in outcomes], asdict(before),
                          during, asdict(after["node-b"]), bool(normal and normal[0]))


def _normal_probe(sm: SoakMesh) -> bool:
    """One ordinary connection through the mesh (client app -> server) while peers are slow."""
    assert sm.mesh.cluster is not None
    r = sm.mesh.cluster.probe(sm.mesh.pods["load/client"], sm.server_ip, 8080, timeout=10)
    return bool(r.ok)


def summarize_peers(outcomes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for o in outcomes:
        k = out.setdefault(o["kind"], {"peers": 0, "closed": 0, "max_seconds": 0.0,
                                       "how": set(), "served": 0})
        k["peers"] += 1
        k["closed"] += int(o["closed_by_ztunnel"])
        k["max_seconds"] = round(max(k["max_seconds"], o["seconds"]), 1)
        k["how"].add(o["detail"])
        k["served"] += int(bool(o.get("served")))
    for k in out.values():
        k["how"] = sorted(k["how"])
    return out


@contextlib.contextmanager
def soak_mesh(root: Path, env: dict[str, str] | None = None) -> Iterator[SoakMesh]:
    with SoakMesh(root, env) as sm:
        yield sm
