"""The HEADERS we send: our own normalisation (h2's outbound checks are off for speed), no
Huffman coding, and a raw ``h2`` peer that still reads every block we write."""

from __future__ import annotations

import re

import h2.config
import h2.connection
import h2.events
import hpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ambient.hbone.protocol import (
    HboneClientProtocol,
    HboneServerProtocol,
    StreamGone,
    build_request_headers,
    make_traceparent,
)


def _pair() -> tuple[HboneClientProtocol, h2.connection.H2Connection]:
    cli = HboneClientProtocol()
    cli.initiate()
    peer = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=False, header_encoding="utf-8"))
    peer.initiate_connection()
    peer.receive_data(cli.data_to_send())
    cli.receive_data(peer.data_to_send())
    return cli, peer


def _request(peer: h2.connection.H2Connection, data: bytes) -> list[tuple[str, str]]:
    [req] = [e for e in peer.receive_data(data) if isinstance(e, h2.events.RequestReceived)]
    return [(str(k), str(v)) for k, v in req.headers or []]


def test_connect_headers_reach_a_validating_h2_peer_unchanged() -> None:
    cli, peer = _pair()
    hdrs = build_request_headers("10.0.0.7:8080", forwarded_for="10.0.0.1:4000",
                                 baggage="k8s.namespace.name=a,service.name=b",
                                 traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-00")
    cli.connect("10.0.0.7:8080", hdrs)
    got = _request(peer, cli.data_to_send())
    assert got == [
        (":method", "CONNECT"), (":authority", "10.0.0.7:8080"),
        ("baggage", "k8s.namespace.name=a,service.name=b"),
        ("forwarded", 'for="10.0.0.1:4000"'),
        ("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-00"),
    ]


def test_header_strings_are_sent_without_huffman_coding() -> None:
    cli, _ = _pair()
    cli.connect("10.0.0.7:8080", [("baggage", "service.name=plain-text-on-the-wire")])
    assert b"service.name=plain-text-on-the-wire" in cli.data_to_send()


def test_a_second_connect_reuses_the_dynamic_table() -> None:
    cli, peer = _pair()
    bag = [("baggage", "k8s.cluster.name=Kubernetes,service.name=client,service.version=v1")]
    cli.connect("10.0.0.7:8080", bag)
    first = cli.data_to_send()
    _request(peer, first)
    cli.connect("10.0.0.7:8080", bag)
    second = cli.data_to_send()
    assert len(second) < len(first) - 40  # baggage went out as an index the second time
    assert ("baggage", bag[0][1]) in _request(peer, second)


def test_caller_fields_are_normalised_as_h2_did() -> None:
    cli, peer = _pair()
    cli.connect("10.0.0.7:80", [(":method", "GET"), (":authority", "x:1"),
                                ("X-Upper", "  padded\t"), ("te", "trailers")])
    got = _request(peer, cli.data_to_send())
    assert got == [(":method", "CONNECT"), (":authority", "10.0.0.7:80"),
                   ("x-upper", "padded"), ("te", "trailers")]


@pytest.mark.parametrize("name, value", [
    ("connection", "close"), ("Transfer-Encoding", "chunked"), ("upgrade", "h2c"),
    ("keep-alive", "1"), ("te", "gzip"), (":path", "/"),
])
def test_fields_http2_forbids_are_refused(name: str, value: str) -> None:
    cli, _ = _pair()
    with pytest.raises(StreamGone):
        cli.connect("10.0.0.7:80", [(name, value)])


def test_server_response_fields_are_normalised() -> None:
    srv = HboneServerProtocol()
    srv.initiate()
    cli = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding="utf-8"))
    cli.initiate_connection()
    srv.receive_data(cli.data_to_send())
    cli.receive_data(srv.data_to_send())
    sid = cli.get_next_available_stream_id()
    cli.send_headers(sid, [(":method", "CONNECT"), (":authority", "10.0.0.7:80")])
    srv.receive_data(cli.data_to_send())
    srv.respond(sid, 200, [("Baggage", " k8s.namespace.name=b ")])
    [resp] = [e for e in cli.receive_data(srv.data_to_send())
              if isinstance(e, h2.events.ResponseReceived)]
    assert [(str(k), str(v)) for k, v in resp.headers or []] == [
        (":status", "200"), ("baggage", "k8s.namespace.name=b")]
    with pytest.raises(StreamGone):
        srv.respond(sid + 2, 200, [("connection", "close")])


@given(st.lists(st.tuples(st.from_regex(r"[a-z][a-z0-9-]{0,15}", fullmatch=True),
                          st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E),
                                  max_size=40)),
                max_size=6))
def test_any_block_we_encode_decodes_to_what_we_meant(fields: list[tuple[str, str]]) -> None:
    fields = [(k, v) for k, v in fields
              if k not in ("connection", "keep-alive", "proxy-connection",
                           "transfer-encoding", "upgrade", "te", "host")]
    cli, peer = _pair()
    cli.connect("10.0.0.7:80", fields)
    assert _request(peer, cli.data_to_send())[2:] == fields


def test_plain_encoder_output_is_plain_hpack() -> None:
    cli, _ = _pair()
    enc = cli._h2.encoder
    block = enc.encode([("forwarded", 'for="10.0.0.1:1"')])
    assert hpack.Decoder().decode(block) == [("forwarded", 'for="10.0.0.1:1"')]
    assert b'for="10.0.0.1:1"' in block


def test_traceparent_is_w3c_version_00_with_nonzero_ids() -> None:
    seen = set()
    for _ in range(200):
        tp = make_traceparent()
        m = re.fullmatch(r"00-([0-9a-f]{32})-([0-9a-f]{16})-00", tp)
        assert m is not None, tp
        assert int(m[1], 16) and int(m[2], 16)
        seen.add(m[1])
    assert len(seen) == 200
    assert make_traceparent(sampled=True).endswith("-01")
