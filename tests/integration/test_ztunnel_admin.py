"""The admin (15000), stats (15020) and readiness (15021) servers over real loopback sockets."""

from __future__ import annotations

import asyncio
import io
import json
import socket

import pytest

from ambient.model import Workload
from ztunnel import accesslog
from ztunnel.admin import AdminServer, Readiness, ReadinessServer, StatsServer
from ztunnel.httpserve import MAX_HEAD
from ztunnel.metrics import Metrics
from ztunnel.result import ConnectionResult, ConnectionTracker


async def http(
    addr: tuple[str, int],
    method: str,
    target: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection(*addr)
    hdrs = {"Host": "localhost", **(headers or {})}
    if body:
        hdrs["Content-Length"] = str(len(body))
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
    writer.write(head.encode() + b"\r\n" + body)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)  # server closes after one response
    writer.close()
    return _parse(raw)


def _parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    assert int(headers["content-length"]) == len(body)
    return status, headers, body


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


@pytest.fixture
def logging_configured():
    accesslog.configure_logging("info", "plain", io.StringIO())
    yield
    accesslog.reset_logging()


def test_config_dump_and_index():
    wl = Workload(uid="Kubernetes//Pod/ns/a", name="a", namespace="ns")
    dump = {
        "workloads": [wl],
        "services": [],
        "policies": [],
        "certificates": [{"identity": "spiffe://cluster.local/ns/ns/sa/default"}],
        "workloadState": {wl.uid: {"info": {"name": "a"}, "state": "Up"}},
        "staticConfig": {},
        "config": {"adminAddr": "127.0.0.1:15000"},
        "version": {"version": "0.1.0"},
    }

    async def main():
        srv = AdminServer(config_dump=lambda: dump)
        addr = await srv.start("127.0.0.1", 0)
        try:
            status, headers, body = await http(addr, "GET", "/config_dump")
            assert status == 200 and headers["content-type"] == "application/json"
            got = json.loads(body)
            assert set(got) == set(dump)
            assert got["workloads"][0]["uid"] == wl.uid  # model objects via to_json()
            assert got["workloadState"][wl.uid]["state"] == "Up"

            status, headers, body = await http(addr, "GET", "/")
            assert status == 200 and headers["content-type"].startswith("text/html")
            for path in (b"config_dump", b"logging", b"quitquitquit", b"connections"):
                assert path in body

            assert (await http(addr, "GET", "/nope"))[0] == 404
            assert (await http(addr, "POST", "/config_dump"))[0] == 405
        finally:
            await srv.close()

    run(main())


def test_async_config_dump_callable_and_errors():
    async def dump():
        return {"version": {"v": 1}}

    def broken():
        raise RuntimeError("state not loaded")

    async def main():
        ok, bad = AdminServer(config_dump=dump), AdminServer(config_dump=broken)
        a, b = await ok.start("127.0.0.1", 0), await bad.start("127.0.0.1", 0)
        try:
            assert json.loads((await http(a, "GET", "/config_dump"))[2]) == {"version": {"v": 1}}
            status, _, body = await http(b, "GET", "/config_dump")
            assert status == 500 and b"state not loaded" in body
            assert (await http(b, "GET", "/"))[0] == 200  # the server survived
        finally:
            await ok.close()
            await bad.close()

    run(main())


def test_logging_get_and_set(logging_configured):
    async def main():
        srv = AdminServer()
        addr = await srv.start("127.0.0.1", 0)
        try:
            status, _, body = await http(addr, "GET", "/logging")
            assert (status, body) == (200, b"current log level is info\n")

            status, _, body = await http(addr, "POST", "/logging?level=debug")
            assert (status, body) == (200, b"current log level is debug\n")

            status, _, body = await http(addr, "POST", "/logging?access=trace")
            assert body == b"current log level is access=trace,debug\n"

            status, _, body = await http(addr, "POST", "/logging?level=access%3Dwarn%2Cinfo")
            assert body == b"current log level is access=warn,info\n"

            status, _, body = await http(addr, "POST", "/logging?level=loud")
            assert status == 400
            assert b"Invalid level provided: loud" in body and b"error, warn, info" in body
            assert accesslog.get_log_level() == "access=warn,info"  # unchanged

            status, _, body = await http(addr, "POST", "/logging?reset")
            assert body == b"current log level is info\n"
            assert (await http(addr, "PUT", "/logging"))[0] == 405
        finally:
            await srv.close()

    run(main())


def test_quitquitquit_calls_shutdown_after_responding():
    async def main():
        fired = asyncio.Event()
        srv = AdminServer(shutdown=fired.set)
        addr = await srv.start("127.0.0.1", 0)
        try:
            assert (await http(addr, "GET", "/quitquitquit"))[0] == 405
            assert not fired.is_set()
            status, _, body = await http(addr, "POST", "/quitquitquit")
            assert (status, body) == (200, b"shutdown now\n")
            await asyncio.wait_for(fired.wait(), 5)
        finally:
            await srv.close()

    run(main())


def test_connections_endpoint():
    async def main():
        tracker = ConnectionTracker()
        srv = AdminServer(connections=tracker)
        addr = await srv.start("127.0.0.1", 0)
        try:
            assert json.loads((await http(addr, "GET", "/connections"))[2]) == []
            r = ConnectionResult.open(
                None, tracker=tracker, reporter="source",
                src=("10.0.0.1", 1234), dst=("10.0.0.2", 15008),
                src_identity="spiffe://cluster.local/ns/a/sa/b", security_policy="mutual_tls",
            )  # fmt: skip
            r.add_sent(7)
            (conn,) = json.loads((await http(addr, "GET", "/connections"))[2])
            assert conn["src"] == "10.0.0.1:1234" and conn["bytesSent"] == 7
            assert conn["srcIdentity"] == "spiffe://cluster.local/ns/a/sa/b"
            r.close()
            assert json.loads((await http(addr, "GET", "/connections"))[2]) == []
        finally:
            await srv.close()

    run(main())


def test_stats_server():
    async def main():
        m = Metrics()
        ConnectionResult.open(m, reporter="source", src=("10.0.0.1", 1), dst=("10.0.0.2", 2))
        srv = StatsServer(m)
        addr = await srv.start("127.0.0.1", 0)
        try:
            for path in ("/metrics", "/stats/prometheus"):
                status, headers, body = await http(addr, "GET", path)
                assert status == 200
                assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
                assert b"istio_tcp_connections_opened_total{" in body
                assert b'istio_build{component="ztunnel"' in body
            _, headers, body = await http(
                addr, "GET", "/metrics", {"Accept": "application/openmetrics-text;version=1.0.0"}
            )
            assert headers["content-type"].startswith("application/openmetrics-text")
            assert body.rstrip().endswith(b"# EOF")
            assert (await http(addr, "GET", "/"))[0] == 404
            assert (await http(addr, "POST", "/metrics"))[0] == 405
        finally:
            await srv.close()

    run(main())


def test_readiness_transition():
    async def main():
        ready = Readiness()
        state = ready.register("state manager")
        proxy = ready.register("proxy")
        srv = ReadinessServer(ready)
        addr = await srv.start("127.0.0.1", 0)
        try:
            status, _, body = await http(addr, "GET", "/healthz/ready")
            assert status >= 500
            assert body == b"not ready, pending: proxy, state manager\n"
            state.done()
            state.done()  # idempotent
            status, _, body = await http(addr, "GET", "/healthz/ready")
            assert status >= 500 and body == b"not ready, pending: proxy\n"
            waiter = asyncio.create_task(ready.wait())
            with proxy:
                pass
            await asyncio.wait_for(waiter, 5)
            assert ready.ready and ready.pending == []
            assert await http(addr, "GET", "/healthz/ready") == (
                200,
                {"content-type": "text/plain; charset=utf-8", "content-length": "6",
                 "connection": "close"},
                b"ready\n",
            )  # fmt: skip
            assert (await http(addr, "GET", "/healthz/live"))[0] == 404
            assert (await http(addr, "POST", "/healthz/ready"))[0] == 405
        finally:
            await srv.close()

    run(main())


def test_start_on_given_socket():
    async def main():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        srv = ReadinessServer(Readiness())
        addr = await srv.start(sock=sock)
        try:
            assert addr == sock.getsockname()
            assert (await http(addr, "GET", "/healthz/ready"))[0] == 200
        finally:
            await srv.close()

    run(main())


def test_oversized_head_rejected():
    async def main():
        srv = ReadinessServer(Readiness())
        addr = await srv.start("127.0.0.1", 0)
        try:
            status, _, body = await http(addr, "GET", "/healthz/ready", {"X-Big": "a" * MAX_HEAD})
            assert status == 431 and b"larger than" in body
            # A body larger than allowed is refused before it is read.
            reader, writer = await asyncio.open_connection(*addr)
            writer.write(b"POST /healthz/ready HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n")
            status, _, _ = _parse(await asyncio.wait_for(reader.read(), 10))
            writer.close()
            assert status == 413
            assert (await http(addr, "GET", "/healthz/ready"))[0] == 200
        finally:
            await srv.close()

    run(main())


def test_idle_client_is_timed_out():
    async def main():
        srv = ReadinessServer(Readiness(), read_timeout=0.2)
        addr = await srv.start("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection(*addr)
            writer.write(b"GET /healthz/ready HTTP/1.1\r\n")  # never finishes the head
            raw = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert _parse(raw)[0] == 408
            assert (await http(addr, "GET", "/healthz/ready"))[0] == 200
        finally:
            await srv.close()

    run(main())


def test_garbage_request_line():
    async def main():
        srv = ReadinessServer(Readiness())
        addr = await srv.start("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection(*addr)
            writer.write(b"HELLO\r\n\r\n")
            raw = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert _parse(raw)[0] == 400
        finally:
            await srv.close()

    run(main())
