"""Map key/value layouts: the Python packers, the loader's expectations and capture.c agree."""

from __future__ import annotations

import re
import struct

import pytest

from ambient.bpfmap import pack_addr, pack_conn_key, unpack_addr
from bpf import loader
from cni.capture.ebpf import pack_pod, uid_hash, unpack_pod

_SIZES = {"__u64": 8, "__u32": 4, "__u16": 2}
_TYPES = {"hash": 1, "lru_hash": 9}


def _c_source() -> str:
    with open(loader.SOURCE) as f:
        return f.read()


def _struct_sizes(src: str) -> dict[str, int]:
    sizes = {}
    for name, body in re.findall(r"struct (amb_\w+) \{(.*?)\};", src, re.S):
        sizes[f"struct {name}"] = sum(_SIZES[t] for t in re.findall(r"(__u\d+) \w+;", body))
    return {**sizes, "__u64": 8}


def test_capture_c_maps_match_loader_layout():
    src = _c_source()
    sizes = _struct_sizes(src)
    decls = re.findall(r'BPF_TABLE_PINNED\("(\w+)", ([\w ]+?), ([\w ]+?), (\w+), \d+,\s*'
                       r'"AMB_PIN_DIR/(\w+)"\)', src)
    assert {d[3] for d in decls} == set(loader.MAP_LAYOUT)
    for mtype, key, value, name, pin in decls:
        assert pin == name
        assert loader.MAP_LAYOUT[name] == (_TYPES[mtype], sizes[key], sizes[value]), name


@pytest.mark.parametrize(("cookie", "ip", "port", "expected"), [
    (1, "10.0.0.1", 8080, struct.pack("=Q", 1) + bytes([10, 0, 0, 1, 0x1F, 0x90, 0, 0])),
    (2**64 - 1, "255.255.255.255", 65535, b"\xff" * 8 + b"\xff" * 6 + b"\0\0"),
    (0x0102030405060708, "127.0.0.1", 1, struct.pack("=Q", 0x0102030405060708)
     + bytes([127, 0, 0, 1, 0, 1, 0, 0])),
])
def test_conn_key_packing(cookie, ip, port, expected):
    key = pack_conn_key(cookie, ip, port)
    assert key == expected
    assert len(key) == loader.MAP_LAYOUT["amb_origdst"][1]


@pytest.mark.parametrize(("ip", "port"), [("10.99.0.9", 8080), ("0.0.0.0", 0),
                                          ("192.168.1.254", 65535)])
def test_addr_roundtrip(ip, port):
    raw = pack_addr(ip, port)
    assert len(raw) == loader.MAP_LAYOUT["amb_origdst"][2]
    assert raw[4:6] == port.to_bytes(2, "big")  # network order, as the programs store it
    assert unpack_addr(raw) == (ip, port)


def test_pod_value_packing():
    raw = pack_pod("10.77.0.2", "uid-1")
    assert len(raw) == loader.MAP_LAYOUT["amb_enrolled"][2]
    assert raw[:4] == bytes([10, 77, 0, 2])
    assert unpack_pod(raw) == ("10.77.0.2", uid_hash("uid-1"))
    assert unpack_pod(pack_pod(None, "x"))[0] == "0.0.0.0"  # no IPv4: programs use 127.0.0.1


def test_uid_hash_is_stable_and_distinct():
    assert uid_hash("a") == uid_hash("a")
    assert uid_hash("a") != uid_hash("b")
    assert 0 <= uid_hash("a") < 2**64
