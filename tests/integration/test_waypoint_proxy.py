"""The waypoint in-process on loopback: real HBONE in and out, real HTTP/1.1, HTTP/2 and TCP.

Behind the waypoint, fake node ztunnels (real HBONE servers with the pods' identities) relay
to real servers; see ``test_waypoint_helpers``. Nothing here asserts a duration.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os

import h2.config
import h2.connection
import h2.events
import pytest
from test_waypoint_helpers import (
    CLIENT_ID,
    DB_VIP,
    GRPC_VIP,
    H1,
    REVIEWS_VIP,
    WP_ID,
    h2_requests,
    http_get,
    parse_h1_responses,
    world,
)

from ambient.hbone.aio import HboneConnectError
from waypoint.examples.add_header import AddHeader
from waypoint.filters import FilterResult

VIP = f"{REVIEWS_VIP}:80"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def test_http1_default_route_keepalive_and_upstream_identity() -> None:
    async def main() -> None:
        async with world() as w:
            c = H1(await w.tunnel(VIP))
            r1 = await c.request("GET", "/hello?x=1")
            r2 = await c.request("POST", "/post", body=b"payload")
            assert r1.status == 200 and r1.json()["pod"] == "reviews-v1"
            assert r1.json()["path"] == "/hello?x=1"
            assert r2.json()["body"] == "payload" and r2.json()["method"] == "POST"
            # Upstream: HBONE to the pod's ztunnel, authority podIP:targetPort, as the waypoint.
            assert ("10.244.0.11:8081", WP_ID) in w.connects
            assert all(peer == WP_ID for _, peer in w.connects)

    run(main())


def test_http1_pipelined_requests_answered_in_order() -> None:
    async def main() -> None:
        async with world() as w:
            s = await w.tunnel(VIP)
            await s.write(b"GET /one HTTP/1.1\r\nhost: reviews\r\n\r\n"
                          b"GET /two HTTP/1.1\r\nhost: reviews\r\n\r\n"
                          b"GET /three HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n\r\n")
            data = await read_all(s)
            assert [r.json()["path"] for r in parse_h1_responses(data)] == ["/one", "/two",
                                                                              "/three"]

    run(main())


def test_http1_chunked_request_body_streams_through() -> None:
    async def main() -> None:
        async with world() as w:
            s = await w.tunnel(VIP)
            await s.write(b"POST /upload HTTP/1.1\r\nhost: reviews\r\n"
                          b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
                          b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
            (reply,) = parse_h1_responses(await read_all(s))
            assert reply.status == 200 and reply.json()["body"] == "hello world"

    run(main())


async def read_all(s) -> bytes:
    data = b""
    while chunk := await asyncio.wait_for(s.read(), 20):
        data += chunk
    return data


def test_http2_multiplexed_requests_and_large_body() -> None:
    async def main() -> None:
        async with world() as w:
            s = await w.tunnel(VIP)
            big = os.urandom(300_000).hex().encode()  # 600 kB: crosses flow-control windows
            replies = await h2_requests(s, [
                ("GET", "/a", [], b""), ("GET", "/b", [("x-n", "2")], b""),
                ("POST", "/big", [], big),
            ])
            assert [r.status for r in replies] == [200, 200, 200]
            assert replies[0].json()["path"] == "/a"
            assert replies[1].json()["headers"]["x-n"] == "2"
            assert replies[2].json()["body"] == big.decode()

    run(main())


def test_grpc_trailers_pass_through_and_metrics() -> None:
    async def main() -> None:
        async with world() as w:
            s = await w.tunnel(f"{GRPC_VIP}:80")
            hdrs = [("content-type", "application/grpc"), ("te", "trailers")]
            ok, fail = await h2_requests(s, [
                ("POST", "/pkg.Svc/Echo", hdrs, b"\x00\x00\x00\x00\x03abc"),
                ("POST", "/pkg.Svc/Fail", hdrs, b"\x00\x00\x00\x00\x00"),
            ], authority="grpc.shop.svc.cluster.local")
            assert ok.status == 200 and ok.body == b"\x00\x00\x00\x00\x03abc"
            assert ok.trailers["grpc-status"] == "0"
            assert fail.trailers["grpc-status"] == "5"
            _, text = await http_get(w.wp.stats.address[1], "/metrics")
            lines = [ln for ln in text.splitlines() if ln.startswith("istio_requests_total{")]
            assert any('request_protocol="grpc"' in ln and 'grpc_response_status="5"' in ln
                       for ln in lines), lines

    run(main())


def test_weighted_split_90_10() -> None:
    async def main() -> None:
        async with world() as w:
            c = H1(await w.tunnel(VIP))
            pods = [(await c.request("GET", "/split")).json()["pod"] for _ in range(200)]
            v1, v2 = pods.count("reviews-v1"), pods.count("reviews-v2")
            assert v1 + v2 == 200 and v2 >= 5 and v1 >= 150, (v1, v2)

    run(main())


def test_l7_deny_is_403_rbac_and_other_paths_pass() -> None:
    async def main() -> None:
        async with world() as w:
            c = H1(await w.tunnel(VIP))
            denied = await c.request("GET", "/admin/users")
            sneaky = await c.request("GET", "/public/../admin")
            ok = await c.request("GET", "/public")
            assert denied.status == 403 and denied.body == b"RBAC: access denied"
            assert sneaky.status == 403
            assert ok.status == 200
            assert "/admin/users" not in w.hits["reviews-v1"].by_path

    run(main())


def test_redirect_rewrite_and_header_modifiers() -> None:
    async def main() -> None:
        async with world() as w:
            c = H1(await w.tunnel(VIP))
            red = await c.request("GET", "/old")
            assert red.status == 301 and red.headers["location"].endswith("/new")
            r = await c.request("GET", "/api/items?q=1", headers=[("x-drop", "1"),
                                                                  ("x-set", "no")])
            seen = r.json()
            assert seen["path"] == "/v1api/items?q=1"
            assert seen["headers"]["host"] == "rewritten.example"
            assert seen["headers"]["x-set"] == "yes" and "x-drop" not in seen["headers"]
            assert r.headers["x-resp"] == "added"

    run(main())


def test_request_timeout_is_504_ut() -> None:
    async def main() -> None:
        async with world() as w:
            c = H1(await w.tunnel(VIP))
            r = await c.request("GET", "/slow")
            assert r.status == 504 and b"timeout" in r.body
            line = [x for x in w.access if getattr(x, "fields", None)][-1]
            assert dict(line.fields)["response_flags"] == "UT"

    run(main())


def test_retries_on_503_until_success() -> None:
    async def main() -> None:
        async with world() as w:
            c = H1(await w.tunnel(VIP))
            r = await c.request("GET", "/flaky")
            assert r.status == 200
            assert w.hits["reviews-v1"].by_path["/flaky"] == 3  # two 503s, then 200
            r2 = await c.request("POST", "/flaky", body=b"again")  # small body: replayed
            assert r2.status == 200 and r2.json()["body"] == "again"

    run(main())


def test_fault_abort_and_rate_limit() -> None:
    async def main() -> None:
        async with world() as w:
            c = H1(await w.tunnel(VIP))
            f = await c.request("GET", "/fault")
            assert f.status == 418 and f.body == b"fault filter abort"
            statuses = [(await c.request("GET", "/limited")).status for _ in range(3)]
            assert statuses == [200, 200, 429]
            flags = [dict(x.fields).get("response_flags") for x in w.access
                     if getattr(x, "fields", None)]
            assert "FI" in flags and "RL" in flags
            assert "/fault" not in w.hits["reviews-v1"].by_path

    run(main())


def test_tcp_port_is_proxied_at_l4_with_tcp_metrics() -> None:
    async def main() -> None:
        async with world() as w:
            s = await w.tunnel(f"{DB_VIP}:5432")
            payload = os.urandom(200_000)
            await s.write(payload)
            s.write_eof()
            back = b""
            while chunk := await asyncio.wait_for(s.read(), 20):
                back += chunk
            assert back == payload
            for _ in range(100):
                _, text = await http_get(w.wp.stats.address[1], "/metrics")
                if "istio_tcp_connections_closed_total{" in text:
                    break
                await asyncio.sleep(0.05)
            closed = [ln for ln in text.splitlines()
                      if ln.startswith("istio_tcp_connections_closed_total{")]
            assert closed and 'reporter="waypoint"' in closed[0]
            assert 'destination_service="db.shop.svc.cluster.local"' in closed[0]
            recv = [ln for ln in text.splitlines()
                    if ln.startswith("istio_tcp_received_bytes_total{")]
            assert recv[0].endswith(" 200000.0")

    run(main())


def test_unknown_destination_is_503() -> None:
    async def main() -> None:
        async with world() as w:
            with pytest.raises(HboneConnectError) as e:
                await w.tunnel("10.99.99.99:80")
            assert e.value.status == 503

    run(main())


def test_malformed_http1_gets_400_and_oversized_head_431() -> None:
    async def main() -> None:
        async with world() as w:
            s = await w.tunnel(VIP)
            await s.write(b"GET / HTTP/1.1\r\nhost: a\r\nbad header line\r\n\r\n")
            data = b""
            while chunk := await asyncio.wait_for(s.read(), 20):
                data += chunk
            assert data.startswith(b"HTTP/1.1 400")
            s2 = await w.tunnel(VIP)
            await s2.write(b"GET / HTTP/1.1\r\nhost: a\r\nx-big: " + b"a" * 70_000)
            data = b""
            while chunk := await asyncio.wait_for(s2.read(), 20):
                data += chunk
            assert data.startswith(b"HTTP/1.1 431")
            # The waypoint is fine afterwards.
            assert (await H1(await w.tunnel(VIP)).request("GET", "/x")).status == 200

    run(main())


def test_h2_protocol_error_gets_goaway() -> None:
    async def main() -> None:
        async with world() as w:
            s = await w.tunnel(VIP)
            # Preface, then a DATA frame on stream 0 (a connection error).
            settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
            data_on_stream_0 = b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x"
            await s.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + settings + data_on_stream_0)
            client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            client.initiate_connection()
            events = []
            while data := await asyncio.wait_for(s.read(), 20):
                try:
                    events += client.receive_data(data)
                except h2.exceptions.ProtocolError:
                    break
            assert any(isinstance(e, h2.events.ConnectionTerminated) and e.error_code == 1
                       for e in events), events

    run(main())


class _Boom:
    name = "boom"

    def on_request(self, req, headers):
        if req.path == "/boom":
            raise RuntimeError("filter bug")
        return FilterResult.CONTINUE


def test_filters_modify_block_and_fail_only_their_request() -> None:
    async def main() -> None:
        async with world(filters=[_Boom(), AddHeader()]) as w:
            c = H1(await w.tunnel(VIP))
            ok = await c.request("GET", "/tagged")
            assert ok.json()["headers"]["x-ambient-filter"] == "add-header"
            assert ok.headers["x-ambient-filter"] == "add-header"  # on_response
            blocked = await c.request("GET", "/tagged", headers=[("x-ambient-block", "true")])
            assert blocked.status == 403
            boom = await c.request("GET", "/boom")
            assert boom.status == 500
            assert (await c.request("GET", "/after")).status == 200

    run(main())


def test_metrics_labels_and_access_log_line() -> None:
    async def main() -> None:
        async with world() as w:
            c = H1(await w.tunnel(VIP))
            await c.request("GET", "/admin")
            await c.request("GET", "/ok")
            _, text = await http_get(w.wp.stats.address[1], "/stats/prometheus")
            reqs = [ln for ln in text.splitlines() if ln.startswith("istio_requests_total{")]
            denied = [ln for ln in reqs if 'response_code="403"' in ln]
            assert denied, reqs
            for want in ('reporter="waypoint"', f'source_principal="{CLIENT_ID}"',
                         'source_workload_namespace="shop"', 'source_app="frontend"',
                         'destination_service="reviews.shop.svc.cluster.local"',
                         'destination_service_name="reviews"', 'response_flags="-"',
                         'connection_security_policy="mutual_tls"', 'request_protocol="http"'):
                assert want in denied[0], (want, denied[0])
            ok = [ln for ln in reqs if 'response_code="200"' in ln][0]
            assert 'destination_workload_namespace="shop"' in ok
            assert 'destination_principal="spiffe://cluster.local/ns/shop/sa/reviews"' in ok
            assert 'destination_version="v1"' in ok
            assert "istio_request_duration_milliseconds_bucket{" in text
            assert "istio_request_bytes_bucket{" in text and "istio_response_bytes_sum{" in text
            from ztunnel.accesslog import IstioFormatter

            recs = [r for r in w.access if r.getMessage() == "request complete"]
            plain = IstioFormatter("plain").format(recs[0])
            assert "http.status=403" in plain and 'http.path="/admin"' in plain
            assert "rbac_access_denied_matched_policy" in plain
            js = json.loads(IstioFormatter("json").format(recs[1]))
            assert js["http.status"] == 200 and js["src.identity"] == str(CLIENT_ID)

    run(main())


def test_readiness_and_config_dump() -> None:
    async def main() -> None:
        async with world() as w:
            status, body = await http_get(w.wp.ready_srv.address[1], "/healthz/ready")
            assert status == 200
            status, body = await http_get(w.wp.admin.address[1], "/config_dump")
            dump = json.loads(body)
            assert dump["waypoint"]["identity"] == str(WP_ID)
            assert "reviews" in json.dumps(dump["l7"])
            assert any(s["hostname"] == "reviews.shop.svc.cluster.local"
                       for s in dump["services"])

    run(main())


def test_idle_downstream_does_not_block_others(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with world() as w:
            idle = await w.tunnel(VIP)  # sends nothing
            c = H1(await w.tunnel(VIP))
            assert (await c.request("GET", "/x")).status == 200
            idle.abort()

    caplog.set_level(logging.WARNING)
    run(main())


async def _forwarder(w, authority: str) -> asyncio.Server:
    """A local TCP -> HBONE forwarder (what a source ztunnel does), for real HTTP clients."""
    from ambient.hbone.aio import relay

    async def handle(r: asyncio.StreamReader, wr: asyncio.StreamWriter) -> None:
        stream = await w.tunnel(authority)
        await relay(stream, r, wr)

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def _run(*argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(errors="replace")


@pytest.mark.skipif(not __import__("shutil").which("nghttp"),
                    reason="nghttp2-client is not installed (scripts/bootstrap.sh installs it)")
def test_nghttp_and_h2load_through_the_waypoint() -> None:
    async def main() -> None:
        async with world() as w:
            fwd = await _forwarder(w, VIP)
            port = fwd.sockets[0].getsockname()[1]
            try:
                rc, out = await _run("nghttp", "-n", "-s", f"http://127.0.0.1:{port}/split")
                assert rc == 0, out
                rc, out = await _run("nghttp", f"http://127.0.0.1:{port}/admin")
                assert rc == 0 and "RBAC: access denied" in out, out
                rc, out = await _run("h2load", "-n", "60", "-c", "2", "-m", "4",
                                     f"http://127.0.0.1:{port}/split")
                assert rc == 0 and "60 succeeded" in out and "60 2xx" in out, out
                rc, out = await _run("h2load", "--h1", "-n", "20", "-c", "2",
                                     f"http://127.0.0.1:{port}/split")
                assert rc == 0 and "20 succeeded" in out and "20 2xx" in out, out
            finally:
                fwd.close()
            v2 = w.hits["reviews-v2"].by_path.get("/split", 0)
            v1 = w.hits["reviews-v1"].by_path.get("/split", 0)
            assert v1 + v2 >= 81 and v1 > v2

    run(main())


@pytest.mark.parametrize(("prefix", "want"), [
    (b"", None), (b"PRI * HTTP/2", None), (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "h2"),
    (b"GET / HTTP/1.1\r\n", "http/1.1"), (b"P", None), (b"POST /", "http/1.1"),
    (b"PRI * HTTP/1.1", "http/1.1"),
])
def test_sniff_protocol_table(prefix: bytes, want: str | None) -> None:
    from waypoint.proxy import sniff_protocol

    assert sniff_protocol(prefix) == want


@pytest.mark.parametrize(("header", "want"), [
    ('for="10.0.0.1:4444"', ("10.0.0.1", 4444)),
    ('for="[fd00::1]:80"', ("fd00::1", 80)),
    ("for=10.0.0.2", ("10.0.0.2", 0)),
    ('for="unknown"', None), (None, None), ("", None),
    ('for="10.0.0.3:1";host=reviews.shop.svc.cluster.local', ("10.0.0.3", 1)),
])
def test_forwarded_for_table(header: str | None, want: tuple[str, int] | None) -> None:
    from waypoint.proxy import parse_forwarded_for

    assert parse_forwarded_for(header) == want


@pytest.mark.parametrize(("port", "want"), [
    ({"name": "http"}, "http"), ({"name": "http-web"}, "http"), ({"name": "http2"}, "http2"),
    ({"name": "grpc-api"}, "grpc"), ({"name": "https"}, "tcp"), ({"name": "tcp"}, "tcp"),
    ({}, "tcp"), ({"name": "tcp", "appProtocol": "http"}, "http"),
    ({"name": "http", "appProtocol": "tcp"}, "tcp"),
    ({"appProtocol": "kubernetes.io/h2c"}, "http2"), ({"name": "HTTP"}, "http"),
])
def test_port_protocol_table(port: dict, want: str) -> None:
    from waypoint.state import port_protocol

    assert port_protocol(port) == want
