"""Helpers that run *inside a pod* as its application (``python -m perf.loadgen ...``).

``hold``: open N keep-alive HTTP/1.1 connections to ``host:port``, make one request on each
(so every leg of the path, proxies included, is established), then keep them all open and
idle until SIGTERM or ``--max-seconds``.  Writes ``{"open": n, "errors": e, "first_error":
...}`` as JSON to ``--status`` once all attempts are done, so the harness can read the proxies'
memory at that moment.  Bounded: at most ``--concurrency`` attempts in flight, each with a
timeout, and the whole run ends after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal

_REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


async def _open_one(host: str, port: int, timeout: float
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(_REQUEST)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        if not head.startswith(b"HTTP/1.1 200"):
            raise ConnectionError(f"answer {head[:40]!r}")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        await asyncio.wait_for(reader.readexactly(length), timeout)
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def hold(host: str, port: int, count: int, concurrency: int, status: str,
               max_seconds: float, timeout: float = 10.0) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 1024), hard))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    sem = asyncio.Semaphore(concurrency)
    conns: list[asyncio.StreamWriter] = []
    errors: list[str] = []

    async def one() -> None:
        async with sem:
            try:
                _, w = await _open_one(host, port, timeout)
                conns.append(w)
            except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError) as e:
                errors.append(f"{type(e).__name__}: {e}")

    try:
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), max_seconds)
    except TimeoutError:
        errors.append(f"not all connections were open after {max_seconds}s")
    tmp = status + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"open": len(conns), "errors": len(errors),
                   "first_error": errors[0] if errors else None}, f)
    os.replace(tmp, status)
    try:
        await asyncio.wait_for(stop.wait(), max_seconds)
    except TimeoutError:
        pass
    for w in conns:
        w.close()
    return 0 if not errors else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.loadgen")
    sub = ap.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hold", help="hold N idle keep-alive HTTP connections open")
    h.add_argument("--host", required=True)
    h.add_argument("--port", type=int, default=80)
    h.add_argument("--count", type=int, default=1000)
    h.add_argument("--concurrency", type=int, default=50)
    h.add_argument("--status", required=True, help="JSON file written when all are open")
    h.add_argument("--max-seconds", type=float, default=120.0)
    args = ap.parse_args(argv)
    return asyncio.run(hold(args.host, args.port, args.count, args.concurrency, args.status,
                            args.max_seconds))


if __name__ == "__main__":
    raise SystemExit(main())
