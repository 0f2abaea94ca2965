"""The load and soak tests' pod applications (``python -m tests.soak.loadapp <cmd>``).

Started inside a pod (its cgroup and netns, ``LocalCluster.start_app``) so that every
connection is the pod's own traffic and goes through the pod's ztunnel. Each raises its
``RLIMIT_NOFILE`` soft limit to the hard limit first.

* ``serve --port P``: a line echo server. Each line comes back as it is; after ``bye`` it
  closes the connection (the server closes first, so TIME_WAIT lands on accepted sockets and
  the clients' ephemeral ports are not used up); a connection that starts with ``flood``
  gets an endless stream of bytes (paced by TCP backpressure, at most ``--flood-bytes``).
* ``hold --count N``: open N connections (``--concurrency`` attempts in flight), exchange a
  line on each, write ``{"phase": "peak", ...}`` to ``--status``, keep them all until
  ``--release-file`` exists (or ``--max-seconds``), then say ``bye`` on each, wait for the
  server's close, and write ``{"phase": "done", ...}``.
* ``rate --rate R --seconds S``: start R new connections per second for S seconds (each:
  connect, ``bye``, read the echo and the close; latency measured from before ``connect`` to
  the close), at most ``--max-inflight`` at once; writes failures and latency percentiles.

Invariants: every loop is bounded in count and time; every socket is closed on every path;
the status file is replaced atomically, so a reader never sees half of it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import time
from collections import Counter
from typing import Any

HELLO = b"hello\n"
BYE = b"bye\n"
FLOOD = b"flood\n"
CHUNK = b"x" * 65536


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def write_status(path: str, doc: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p90/p99/max of ``values`` in milliseconds (empty -> {})."""
    if not values:
        return {}
    v = sorted(values)

    def at(q: float) -> float:
        return round(v[min(len(v) - 1, int(q * len(v)))] * 1000, 2)

    return {"p50_ms": at(0.50), "p90_ms": at(0.90), "p99_ms": at(0.99),
            "max_ms": round(v[-1] * 1000, 2)}


# ------------------------------------------------------------------------------------ serve


async def _serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     flood_bytes: int) -> None:
    try:
        for _ in range(1000):  # lines per connection
            line = await reader.readline()
            if not line:
                break
            if line == FLOOD:
                sent = 0
                while sent < flood_bytes:
                    writer.write(CHUNK)
                    sent += len(CHUNK)
                    await writer.drain()
                break
            writer.write(line)
            if line == BYE:
                break
            await writer.drain()
        await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def serve(port: int, flood_bytes: int) -> int:
    raise_nofile()
    server = await asyncio.start_server(
        lambda r, w: _serve_one(r, w, flood_bytes), "0.0.0.0", port, backlog=4096)
    print(f"serving on {port}", flush=True)
    async with server:
        await server.serve_forever()
    return 0


# ------------------------------------------------------------------------------------ hold


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes,
                    timeout: float) -> None:
    writer.write(line)
    await asyncio.wait_for(writer.drain(), timeout)
    got = await asyncio.wait_for(reader.readline(), timeout)
    if got != line:
        raise ConnectionError(f"echo {got[:40]!r} for {line!r}")


async def _bye(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               timeout: float) -> None:
    """Say bye, read the echo, then the server's close."""
    try:
        await _exchange(reader, writer, BYE, timeout)
        rest = await asyncio.wait_for(reader.read(1024), timeout)
        if rest:
            raise ConnectionError(f"bytes after bye: {rest[:40]!r}")
    finally:
        writer.close()


def _err(e: BaseException) -> str:
    return type(e).__name__ if not str(e) else f"{type(e).__name__}: {str(e)[:80]}"


async def hold(host: str, port: int, count: int, concurrency: int, status: str,
               release_file: str, max_seconds: float, timeout: float) -> int:
    limit = raise_nofile()
    deadline = time.monotonic() + max_seconds
    sem = asyncio.Semaphore(concurrency)
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    errors: Counter[str] = Counter()

    async def one() -> None:
        async with sem:
            opened: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
            try:
                opened = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
                await _exchange(*opened, HELLO, timeout)
                conns.append(opened)
            except (OSError, TimeoutError, ConnectionError, asyncio.IncompleteReadError) as e:
                errors[_err(e)] += 1
                if opened is not None:
                    opened[1].close()

    t0 = time.monotonic()
    tasks = [asyncio.ensure_future(one()) for _ in range(count)]
    done, pending = await asyncio.wait(tasks, timeout=max(1.0, deadline - time.monotonic()))
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if pending:
        errors["not open before --max-seconds"] += len(pending)
    open_s = time.monotonic() - t0
    write_status(status, {"phase": "peak", "open": len(conns), "failed": sum(errors.values()),
                          "errors": dict(errors), "open_seconds": round(open_s, 2),
                          "fd_limit": limit})
    while not os.path.exists(release_file) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    # Everything still open must still work: one more line on each, then bye.
    close_errors: Counter[str] = Counter()
    closed = 0

    async def finish(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal closed
        async with sem:
            try:
                await _exchange(r, w, HELLO, timeout)
                await _bye(r, w, timeout)
                closed += 1
            except (OSError, TimeoutError, ConnectionError, asyncio.IncompleteReadError) as e:
                close_errors[_err(e)] += 1
                w.close()

    await asyncio.gather(*(finish(r, w) for r, w in conns))
    write_status(status, {"phase": "done", "open": len(conns), "failed": sum(errors.values()),
                          "errors": dict(errors), "open_seconds": round(open_s, 2),
                          "closed_ok": closed, "close_failed": sum(close_errors.values()),
                          "close_errors": dict(close_errors), "fd_limit": limit})
    return 0 if not errors and not close_errors else 1


# ------------------------------------------------------------------------------------ rate


async def rate(host: str, port: int, per_second: float, seconds: float, status: str,
               max_inflight: int, timeout: float) -> int:
    raise_nofile()
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    inflight: set[asyncio.Task[None]] = set()
    skipped = 0

    async def one() -> None:
        t = loop.time()
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
            await _bye(r, w, timeout)
            latencies.append(loop.time() - t)
        except (OSError, TimeoutError, ConnectionError, asyncio.IncompleteReadError) as e:
            errors[_err(e)] += 1

    total = int(per_second * seconds)
    start = loop.time()
    last_report = start
    for i in range(total):
        due = start + i / per_second
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
        if len(inflight) >= max_inflight:
            skipped += 1  # the mesh is not keeping up: count it, do not queue without bound
            continue
        task = asyncio.ensure_future(one())
        inflight.add(task)
        task.add_done_callback(inflight.discard)
        if loop.time() - last_report >= 5:
            last_report = loop.time()
            print(f"{i + 1}/{total} started, {len(latencies)} ok, {sum(errors.values())} "
                  f"failed, {len(inflight)} in flight", flush=True)
    offered_s = loop.time() - start
    if inflight:
        await asyncio.wait(set(inflight), timeout=timeout * 3)
    for t in list(inflight):
        t.cancel()
        errors["unfinished"] += 1
    elapsed = loop.time() - start
    doc = {"attempted": total - skipped, "ok": len(latencies), "failed": sum(errors.values()),
           "skipped_max_inflight": skipped, "errors": dict(errors),
           "offered_seconds": round(offered_s, 2), "elapsed_seconds": round(elapsed, 2),
           "achieved_per_second": round(len(latencies) / max(offered_s, 1e-9), 1),
           "latency": percentiles(latencies)}
    write_status(status, doc)
    print(json.dumps(doc), flush=True)
    return 0 if not errors and not skipped else 1


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="loadapp")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, default=9000)
    s.add_argument("--flood-bytes", type=int, default=1 << 30)
    for name in ("hold", "rate"):
        p = sub.add_parser(name)
        p.add_argument("--host", required=True)
        p.add_argument("--port", type=int, default=9000)
        p.add_argument("--status", required=True)
        p.add_argument("--timeout", type=float, default=30.0)
    h = sub.choices["hold"]
    h.add_argument("--count", type=int, required=True)
    h.add_argument("--concurrency", type=int, default=500)
    h.add_argument("--release-file", required=True)
    h.add_argument("--max-seconds", type=float, default=600.0)
    r = sub.choices["rate"]
    r.add_argument("--rate", type=float, required=True)
    r.add_argument("--seconds", type=float, required=True)
    r.add_argument("--max-inflight", type=int, default=5000)
    a = ap.parse_args(argv)
    try:
        import uvloop
        run: Any = uvloop.run
    except ImportError:  # pragma: no cover
        run = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        if a.cmd == "serve":
            return int(run(serve(a.port, a.flood_bytes)))
        if a.cmd == "hold":
            return int(run(hold(a.host, a.port, a.count, a.concurrency, a.status,
                                a.release_file, a.max_seconds, a.timeout)))
        return int(run(rate(a.host, a.port, a.rate, a.seconds, a.status, a.max_inflight,
                            a.timeout)))
    return 130


if __name__ == "__main__":
    raise SystemExit(main())
