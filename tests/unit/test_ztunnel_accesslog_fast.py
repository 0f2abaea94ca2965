"""The access log's per-line shortcuts give exactly what the general path gives: the
timestamp cached per second, and quoting of plain strings without ``json.dumps``."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from ztunnel.accesslog import Bare, _plain_value, _timestamp


def _reference_ts(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_timestamp_matches_datetime(t: float) -> None:
    assert _timestamp(t) == _reference_ts(t)


def test_timestamp_same_second_then_next_second_then_back() -> None:
    for t in (1_700_000_000.25, 1_700_000_000.999_999_7, 1_700_000_001.0, 1_700_000_000.5,
              1_699_999_999.999_999_4, 0.0):
        assert _timestamp(t) == _reference_ts(t)


@given(st.text())
def test_plain_value_quotes_like_json(text: str) -> None:
    assert _plain_value(text) == json.dumps(text, ensure_ascii=False)


def test_plain_value_escapes_and_bare_values() -> None:
    assert _plain_value('a"b') == '"a\\"b"'
    assert _plain_value("a\\b") == '"a\\\\b"'
    assert _plain_value("line\nbreak") == '"line\\nbreak"'
    assert _plain_value("spiffe://cluster.local/ns/a/sa/b") == '"spiffe://cluster.local/ns/a/sa/b"'
    assert _plain_value(Bare("10.0.0.1:80")) == "10.0.0.1:80"
    assert _plain_value(True) == "true" and _plain_value(12) == "12"


def test_configured_logging_skips_caller_lookup_and_reset_restores_it() -> None:
    import io
    import logging

    from ztunnel import accesslog

    buf = io.StringIO()
    try:
        accesslog.configure_logging("info", "plain", buf)
        assert logging._srcfile is None  # type: ignore[attr-defined]
        assert not logging.logProcesses and not logging.logThreads
        accesslog.emit(logging.getLogger("access"), logging.INFO, "connection complete",
                       [("src.addr", Bare("10.0.0.1:5")), ("direction", "outbound")])
        line = buf.getvalue().strip().split("\t")
        assert line[1:] == ["info", "access", "connection complete",
                            'src.addr=10.0.0.1:5 direction="outbound"']
    finally:
        accesslog.reset_logging()
    assert logging._srcfile is not None  # type: ignore[attr-defined]
    assert logging.logProcesses and logging.logThreads
    records: list[logging.LogRecord] = []
    probe = logging.getLogger("test.accesslog.extras")
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    probe.addHandler(handler)
    try:
        probe.warning("where am I")
    finally:
        probe.removeHandler(handler)
    assert records[0].funcName.startswith("test_configured_logging_skips_caller")
