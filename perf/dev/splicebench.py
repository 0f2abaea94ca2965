"""Same-node relay benchmark: direct vs ztunnel-style userspace relay vs kernel splice.

``python -m perf.dev.splicebench [--seconds 3] [--rounds 1]`` (root).  Two network namespaces
("client" and "server") joined by a veth; the server runs iperf3 and nginx.  Modes:

- ``direct``: the client talks to the server across the veth;
- ``user``: a relay process (uvloop when installed, like ztunnel) accepts in the client netns
  and dials from the server netns, copying with ``ambient.hbone.tcpleg.splice_tcp``;
- ``kernel``: the same relay hands both sockets to ``ambient.splicemap.KernelSplice`` (the maps
  ``bpf/splice.py`` loads, pinned in a temporary directory).

Per mode: iperf3 single-stream Gbit/s, wrk req/s (16 connections, keep-alive), the relay
process's CPU seconds per GB moved, and the whole machine's busy CPU seconds per GB (the
kernel splice moves bytes in kernel workers that no process is billed for; the machine is
shared, so that column is noisy).  Modes are interleaved per round.  Everything is removed at
exit.  A dev tool, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ambient.cluster import netlink
from ambient.netns import socket_in_netns
from perf import apps
from perf.parse import parse_wrk
from perf.procstat import cpu_seconds

REPO = Path(__file__).resolve().parents[2]
RELAY_PORT = 15001
MODES = ("direct", "user", "kernel")


# -- the relay (a subprocess) ---------------------------------------------------------------


async def _relay(mode: str, client_ns: str, server_ns: str, listen: tuple[str, int],
                 target: tuple[str, int], pin_dir: str) -> None:
    from ambient.hbone.tcpleg import splice_tcp
    from ambient.splicemap import KernelSplice

    loop = asyncio.get_running_loop()
    ks = KernelSplice.open(pin_dir) if mode == "kernel" else None
    if mode == "kernel" and ks is None:
        raise SystemExit(f"relay: no kernel splice: {KernelSplice.why}")
    lsock = socket_in_netns(client_ns)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(listen)
    lsock.listen(512)
    lsock.setblocking(False)

    async def dial() -> socket.socket:
        s = socket_in_netns(server_ns)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_connect(s, target)
        return s

    async def handle(a: socket.socket) -> None:
        a.setblocking(False)
        a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        b = await dial()
        if ks is not None:
            await ks.splice(a, b)
            return
        reader, writer = await asyncio.open_connection(sock=a)
        await splice_tcp((reader, writer), b)

    tasks: set[asyncio.Task[None]] = set()
    print("ready", flush=True)
    while True:
        a, _ = await loop.sock_accept(lsock)
        t = asyncio.create_task(handle(a))
        tasks.add(t)
        t.add_done_callback(tasks.discard)


def relay_main(argv: list[str]) -> None:
    mode, cns, sns, lip, tip, tport, pin = argv
    with contextlib.suppress(ImportError):
        import uvloop  # type: ignore[import-not-found]

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(_relay(mode, cns, sns, (lip, RELAY_PORT), (tip, int(tport)), pin))


# -- the bench ------------------------------------------------------------------------------


def _machine_busy_s() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def topology() -> Iterator[tuple[str, str, str, str]]:
    tag = secrets.token_hex(3)
    cns, sns = f"sbc{tag}", f"sbs{tag}"
    cip, sip = "10.231.0.1", "10.231.0.2"
    try:
        netlink.create_netns(cns)
        netlink.create_netns(sns)
        netlink.add_veth(cns, "eth0", sns, "eth0")
        netlink.add_address(cns, "eth0", f"{cip}/24")
        netlink.add_address(sns, "eth0", f"{sip}/24")
        yield cns, sns, cip, sip
    finally:
        netlink.delete_netns(cns)
        netlink.delete_netns(sns)


def _in_ns(ns: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def _stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def _iperf(cns: str, host: str, port: int, seconds: float) -> tuple[float, float]:
    out = subprocess.run(_in_ns(cns, [apps.IPERF3, "-c", host, "-p", str(port), "-t",
                                      str(max(1, round(seconds))), "-J"]),
                         capture_output=True, timeout=seconds + 30, check=False)
    doc = json.loads(out.stdout)
    if doc.get("error"):
        raise RuntimeError(f"iperf3: {doc['error']}")
    end = doc["end"]["sum_received"]
    return float(end["bits_per_second"]) / 1e9, float(end["bytes"])


def _wrk(cns: str, url: str, seconds: float) -> float:
    out = subprocess.run(_in_ns(cns, ["wrk", "-t1", "-c16", f"-d{max(1, round(seconds))}s", url]),
                         capture_output=True, text=True, timeout=seconds + 30, check=False)
    return parse_wrk(out.stdout).rps


def run(seconds: float, rounds: int) -> dict[str, list[dict[str, float]]]:
    from bpf import splice

    results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    pin = f"/sys/fs/bpf/ambbench-splice-{secrets.token_hex(3)}"
    work = Path(tempfile.mkdtemp(prefix="splicebench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        splice.load_splice(pin)
        with topology() as (cns, sns, cip, sip):
            conf = work / "nginx.conf"
            conf.write_text(apps.nginx_config(work, 8080))
            procs.append(subprocess.Popen(_in_ns(sns, apps.nginx_argv(conf))))
            procs.append(subprocess.Popen(_in_ns(sns, apps.iperf3_server_argv(5201)),
                                          stdout=subprocess.DEVNULL))
            time.sleep(0.5)  # dev tool: let the servers bind
            for _ in range(rounds):
                for mode in MODES:
                    results[mode].append(_one(mode, cns, sns, cip, sip, pin, seconds))
                    print(mode, json.dumps(results[mode][-1]), flush=True)
    finally:
        for p in procs:
            _stop(p)
        splice.unload_splice(pin)
        shutil.rmtree(work, ignore_errors=True)
    return results


def _start_relay(mode: str, cns: str, sns: str, cip: str, sip: str, port: int,
                 pin: str) -> subprocess.Popen[bytes]:
    """A relay subprocess listening on ``cip``:RELAY_PORT towards ``sip``:``port``, ready."""
    relay = subprocess.Popen(
        [sys.executable, "-m", "perf.dev.splicebench", "relay", mode, cns, sns, cip, sip,
         str(port), pin], cwd=REPO, stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert relay.stdout is not None
    if relay.stdout.readline().strip() != b"ready":
        _stop(relay)
        raise RuntimeError("relay did not start")
    return relay


def _one(mode: str, cns: str, sns: str, cip: str, sip: str, pin: str,
         seconds: float) -> dict[str, float]:
    relay = None
    host, iport, hport = sip, 5201, 8080
    try:
        if mode != "direct":
            relay = _start_relay(mode, cns, sns, cip, sip, iport, pin)
            host, iport = cip, RELAY_PORT
        cpu0, busy0 = cpu_seconds([relay.pid]) if relay else 0.0, _machine_busy_s()
        gbps, nbytes = _iperf(cns, host, iport, seconds)
        cpu1, busy1 = cpu_seconds([relay.pid]) if relay else 0.0, _machine_busy_s()
        gb = nbytes / 1e9
        row = {"gbit_s": round(gbps, 2), "relay_cpu_s_per_gb": round((cpu1 - cpu0) / gb, 3),
               "machine_cpu_s_per_gb": round((busy1 - busy0) / gb, 3)}
        if relay is not None:  # the HTTP leg goes through a relay to nginx
            _stop(relay)
            relay = _start_relay(mode, cns, sns, cip, sip, hport, pin)
            hport = RELAY_PORT
        row["wrk_rps"] = round(_wrk(cns, f"http://{host}:{hport}/", seconds))
        return row
    finally:
        if relay is not None:
            _stop(relay)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["relay"]:
        relay_main(argv[1:])
        return 0
    p = argparse.ArgumentParser(prog="splicebench", description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args(argv)
    res = run(args.seconds, args.rounds)
    print(f"{'mode':8} {'Gbit/s':>8} {'x direct':>9} {'req/s':>8} {'relay CPU s/GB':>15} "
          f"{'machine CPU s/GB':>17}")
    med = {m: sorted(rows, key=lambda r: r["gbit_s"])[len(rows) // 2] for m, rows in res.items()}
    for m in MODES:
        r = med[m]
        print(f"{m:8} {r['gbit_s']:8.2f} {r['gbit_s'] / med['direct']['gbit_s']:9.2f} "
              f"{r['wrk_rps']:8.0f} {r['relay_cpu_s_per_gb']:15.3f} "
              f"{r['machine_cpu_s_per_gb']:17.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
