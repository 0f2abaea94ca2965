"""Pure parts of the kernel splice (ambient/splicemap.py): TCP_INFO counters, byte-count
arithmetic, map layout checks."""

from __future__ import annotations

import struct

import pytest

from ambient.splicemap import (
    MAP_TYPE_SOCKHASH,
    TCP_INFO_MIN,
    TcpCounters,
    check_map,
    parse_tcp_info,
    received_base,
)


def tcp_info(state: int, acked: int, received: int, size: int = 232) -> bytes:
    raw = bytearray(size)
    raw[0] = state
    struct.pack_into("=QQ", raw, 120, acked, received)
    return bytes(raw)


@pytest.mark.parametrize(("state", "acked", "received"), [
    (1, 0, 0),
    (8, 1, 67108877),
    (1, 2**64 - 1, 2**40),
])
def test_parse_tcp_info_reads_state_and_both_counters(state: int, acked: int,
                                                      received: int) -> None:
    assert parse_tcp_info(tcp_info(state, acked, received)) == TcpCounters(state, acked,
                                                                           received)


def test_parse_tcp_info_accepts_the_shortest_struct_with_the_counters() -> None:
    assert parse_tcp_info(tcp_info(1, 5, 7, TCP_INFO_MIN)).bytes_received == 7
    with pytest.raises(ValueError, match="Linux >= 4.1"):
        parse_tcp_info(tcp_info(1, 5, 7, TCP_INFO_MIN)[:-1])


@pytest.mark.parametrize(("received", "queued", "pending", "base"), [
    (0, 0, 0, 0),  # nothing yet
    (11, 6, 5, 0),  # 5 read into pending, 6 still queued: all part of the splice
    (100, 0, 0, 100),  # 100 consumed before (not ours to count)
    (100, 10, 40, 50),
])
def test_received_base(received: int, queued: int, pending: int, base: int) -> None:
    assert received_base(received, queued, pending) == base


def test_received_base_refuses_pending_that_never_arrived() -> None:
    with pytest.raises(ValueError, match="pending"):
        received_base(6, 6, 1)


@pytest.mark.parametrize(("info", "max_entries", "problem"), [
    ((MAP_TYPE_SOCKHASH, 8, 4, 64), None, None),
    ((MAP_TYPE_SOCKHASH, 8, 8, 64), 64, None),
    ((15, 8, 4, 64), None, "not a sockhash"),
    ((MAP_TYPE_SOCKHASH, 4, 4, 64), None, "key/value sizes 4/4"),
    ((MAP_TYPE_SOCKHASH, 8, 16, 64), None, "key/value sizes 8/16"),
    ((MAP_TYPE_SOCKHASH, 8, 4, 64), 128, "holds 64 entries, not 128"),
])
def test_check_map(info: tuple[int, int, int, int], max_entries: int | None,
                   problem: str | None) -> None:
    why = check_map("amb_splice", info, max_entries)
    if problem is None:
        assert why is None
    else:
        assert why is not None and problem in why
