"""DATA frames framed by our protocol core (not h2): a raw ``h2`` peer must parse them and
charge its windows exactly as ours were charged, END_STREAM must follow buffered data, the
payload memory is handed out without copies (mutable input is copied first), and the
WINDOW_UPDATE + RST_STREAM race that used to escape ``receive_data`` is handled."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from ambient.hbone.protocol import (
    HboneServerProtocol,
    HboneSettings,
    StreamReset,
    StreamWritable,
)

BIG = 16 * 1024 * 1024


def raw_client() -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None))
    c.initiate_connection()
    c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: BIG})
    c.increment_flow_control_window(BIG)
    return c


def open_tunnel(settings: HboneSettings | None = None):
    srv = HboneServerProtocol(settings)
    srv.initiate()
    cli = raw_client()
    cli.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
    srv.receive_data(cli.data_to_send())
    cli.receive_data(srv.data_to_send())
    srv.respond(1, 200)
    events = cli.receive_data(srv.data_to_send())
    assert any(isinstance(e, h2.events.ResponseReceived) for e in events)
    return srv, cli


def deliver(srv: HboneServerProtocol, cli: h2.connection.H2Connection) -> bytes:
    """Send what the server has to the raw client; return the DATA bytes it received."""
    got = bytearray()
    for e in cli.receive_data(srv.data_to_send()):
        if isinstance(e, h2.events.DataReceived):
            got += e.data
            cli.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
    return bytes(got)


@pytest.mark.parametrize("size", [1, 100, 16_375, 16_376, 200_000, 3 * 1024 * 1024])
def test_payload_round_trips_and_windows_match_h2(size: int) -> None:
    srv, cli = open_tunnel()
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    start = srv.available_window(1)
    srv.send_data(1, payload)
    got = bytearray()
    for _ in range(100):
        got += deliver(srv, cli)
        srv.receive_data(cli.data_to_send())  # WINDOW_UPDATEs
        if len(got) >= size:
            break
    assert bytes(got) == payload and srv.buffered(1) == 0
    # h2's window counters were charged as its own send_data would have: our send windows
    # equal the peer's receive windows, for the connection and the stream.
    assert srv._h2.outbound_flow_control_window == \
        cli._inbound_flow_control_window_manager.current_window_size
    assert srv._h2.streams[1].outbound_flow_control_window == \
        cli.streams[1]._inbound_window_manager.current_window_size
    assert start > 0


def test_buffers_beyond_the_window_and_resumes() -> None:
    srv, cli = open_tunnel(HboneSettings())
    window = srv.available_window(1)
    assert window > 0
    payload = b"z" * (window + 10_000)
    srv.send_data(1, payload)
    assert srv.buffered(1) == 10_000
    got = bytearray(deliver(srv, cli))
    events = srv.receive_data(cli.data_to_send())  # the client's WINDOW_UPDATEs
    assert any(isinstance(e, StreamWritable) and e.stream_id == 1 for e in events)
    got += deliver(srv, cli)
    assert bytes(got) == payload and srv.buffered(1) == 0


def test_end_stream_follows_buffered_data() -> None:
    srv, cli = open_tunnel()
    srv.send_data(1, b"a" * 70_000)
    srv.end_stream(1)
    data = srv.data_to_send()
    events = cli.receive_data(data)
    kinds = [type(e).__name__ for e in events]
    assert kinds[-1] == "StreamEnded"
    assert sum(len(e.data) for e in events if isinstance(e, h2.events.DataReceived)) == 70_000


def test_vec_output_keeps_payload_memory_and_order() -> None:
    srv, cli = open_tunnel()
    big = b"q" * 100_000
    srv.send_data(1, big)
    srv._h2.ping(b"12345678")  # an h2-framed frame queued after ours
    vec = srv.data_to_send_vec()
    assert any(isinstance(b, memoryview) and b.obj is big for b in vec)  # not copied
    events = cli.receive_data(b"".join(vec))
    kinds = [type(e).__name__ for e in events]
    assert kinds.index("DataReceived") < kinds.index("PingReceived")


def test_mutable_input_is_copied() -> None:
    srv, cli = open_tunnel()
    buf = bytearray(b"x" * 50_000)
    srv.send_data(1, buf)
    vec = srv.data_to_send_vec()
    buf[:] = b"y" * 50_000  # the caller reuses its buffer before the bytes are written
    got = b"".join(e.data for e in cli.receive_data(b"".join(vec))
                   if isinstance(e, h2.events.DataReceived))
    assert got == b"x" * 50_000


def test_window_update_and_reset_in_one_read() -> None:
    srv, cli = open_tunnel()
    window = srv.available_window(1)
    srv.send_data(1, b"w" * (window + 5))  # 5 bytes wait for window
    deliver(srv, cli)
    cli.increment_flow_control_window(1_000, stream_id=1)
    cli.reset_stream(1)
    events = srv.receive_data(cli.data_to_send())  # must not raise
    assert any(isinstance(e, StreamReset) for e in events)
    assert srv.buffered(1) == 0
