"""Every fuzz target of ``tests/fuzz/targets.py`` under Hypothesis, as ``make test`` runs them.

The same harnesses run a million inputs each in ``make fuzz`` (atheris); here each gets its
valid seeds, raw bytes, and seeds with a few byte edits (structured inputs mutated), enough
to catch a regression in the error handling of any parser of untrusted input.
"""

from __future__ import annotations

import logging

import pytest
from fuzz.hypo import fuzz_settings
from fuzz.targets import TARGETS
from hypothesis import given
from hypothesis import strategies as st

NAMES = sorted(TARGETS)
_SEEDS: dict[str, list[bytes]] = {}


def _seeds(name: str) -> list[bytes]:
    if name not in _SEEDS:
        _SEEDS[name] = TARGETS[name].seeds()
    return _SEEDS[name]


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.CRITICAL)  # rejected inputs are logged by design
    yield
    logging.disable(logging.NOTSET)


@pytest.mark.parametrize("name", NAMES)
def test_seeds_are_accepted(name: str) -> None:
    for seed in _seeds(name):
        TARGETS[name].run(seed)


@pytest.mark.parametrize("name", NAMES)
@fuzz_settings(60)
@given(data=st.binary(max_size=600))
def test_raw_bytes(name: str, data: bytes) -> None:
    TARGETS[name].run(data)


@st.composite
def _edits(draw: st.DrawFn, seed: bytes) -> bytes:
    buf = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.integers(0, 3))
        at = draw(st.integers(0, max(0, len(buf) - 1)))
        if op == 0 and buf:
            buf[at] = draw(st.integers(0, 255))
        elif op == 1:
            buf[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == 2:
            del buf[at : at + draw(st.integers(1, 16))]
        else:
            buf[at:at] = buf[at : at + draw(st.integers(1, 64))]  # duplicate a run of bytes
    return bytes(buf)


@pytest.mark.parametrize("name", NAMES)
@fuzz_settings(80)
@given(data=st.data())
def test_mutated_seeds(name: str, data: st.DataObject) -> None:
    seed = data.draw(st.sampled_from(_seeds(name)))
    TARGETS[name].run(data.draw(_edits(seed)))


def test_every_parser_of_the_issue_has_a_target() -> None:
    entries = " ".join(t.entry for t in TARGETS.values())
    for needle in ("HboneServerProtocol", "HboneClientProtocol", "parse_authority", "zds",
                   "cni.plugin.run", "FrameDecoder", "handle_response", "from_proto",
                   "handle_request", "NodeId.parse", "translate_manifests",
                   "parse_local_config", "local_source", "validate_csr", "sign_csr",
                   "verify_chain", "SpiffeId.parse"):
        assert needle in entries, needle
