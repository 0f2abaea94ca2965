"""The access log line a ConnectionResult writes (plain and JSON), and RUST_LOG-style levels."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest

from ambient.identity import SpiffeId
from ambient.model import Service, Workload
from ztunnel import accesslog
from ztunnel.metrics import Metrics
from ztunnel.result import ConnectionResult, Failure

FRONTEND = Workload(
    uid="u1",
    name="frontend-1",
    namespace="shop",
    service_account="frontend",
    canonical_name="frontend",
    workload_name="frontend",
    cluster_id="",
)
BACKEND = Workload(
    uid="u2",
    name="backend-1",
    namespace="shop",
    service_account="backend",
    canonical_name="backend",
    workload_name="backend",
    cluster_id="",
)
SVC = Service(name="backend", namespace="shop", hostname="backend.shop.svc.cluster.local")


@pytest.fixture
def logs():
    """Configure process logging into a buffer; yield a reader of its lines."""
    state: dict[str, io.StringIO] = {}

    def setup(level: str = "info", fmt: str = "plain"):
        state["buf"] = io.StringIO()
        accesslog.configure_logging(level, fmt, state["buf"])
        return lambda: state["buf"].getvalue().splitlines()

    yield setup
    accesslog.reset_logging()


def _outbound(**kw) -> ConnectionResult:
    base = dict(
        reporter="source",
        src=("10.244.1.2", 41234),
        dst=("10.244.2.3", 15008),
        hbone_target="10.244.2.3:8080",
        src_workload=FRONTEND,
        dst_workload=BACKEND,
        dst_service=SVC,
        src_identity=SpiffeId("cluster.local", "shop", "frontend"),
        security_policy="mutual_tls",
    )
    base.update(kw)
    return ConnectionResult.open(Metrics(), **base)


TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"


def test_plain_line_format(logs):
    lines = logs("info")
    r = _outbound()
    r.close(12, 34)
    assert len(lines()) == 1  # "connection opened" is debug: filtered out
    line = lines()[0]
    ts, level, target, message, fields = line.split("\t")
    assert re.fullmatch(TS, ts)
    assert (level, target, message) == ("info", "access", "connection complete")
    assert re.fullmatch(
        r'src\.addr=10\.244\.1\.2:41234 src\.workload="frontend-1" src\.namespace="shop" '
        r'src\.identity="spiffe://cluster\.local/ns/shop/sa/frontend" '
        r"dst\.addr=10\.244\.2\.3:15008 dst\.hbone_addr=10\.244\.2\.3:8080 "
        r'dst\.service="backend\.shop\.svc\.cluster\.local" dst\.workload="backend-1" '
        r'dst\.namespace="shop" dst\.identity="spiffe://cluster\.local/ns/shop/sa/backend" '
        r'direction="outbound" bytes_sent=12 bytes_recv=34 duration="\d+ms"',
        fields,
    ), fields


def test_failed_line_is_error_level_with_error_field(logs):
    lines = logs("info")
    r = _outbound()
    r.close(0, 0, error=Failure("DENY", 'allow policies exist, but none "allowed"'))
    (line,) = lines()
    assert line.split("\t")[1] == "error"
    assert line.endswith(r'error="allow policies exist, but none \"allowed\""')


def test_inbound_bytes_are_from_the_local_workload(logs):
    lines = logs("info")
    r = _outbound(reporter="destination")
    r.close(bytes_sent=12, bytes_recv=34)  # 12 request bytes, 34 response bytes
    (line,) = lines()
    assert 'direction="inbound" bytes_sent=34 bytes_recv=12' in line


def test_plaintext_omits_identities(logs):
    lines = logs("info")
    _outbound(security_policy="unknown", hbone_target=None, dst_service=None).close(1, 1)
    (line,) = lines()
    assert "identity" not in line and "hbone_addr" not in line and "dst.service" not in line
    assert 'src.workload="frontend-1"' in line


def test_opened_line_at_debug(logs):
    lines = logs("access=debug,info")
    _outbound().close(1, 2)
    assert [ln.split("\t")[3] for ln in lines()] == ["connection opened", "connection complete"]
    assert "bytes_sent" not in lines()[0]


def test_json_line_has_same_keys(logs):
    lines = logs("info", "json")
    r = _outbound()
    r.close(12, 34, error="upstream reset")
    (line,) = lines()
    obj = json.loads(line)
    assert list(obj)[:4] == ["level", "time", "scope", "message"]
    assert obj["level"] == "error" and obj["scope"] == "access"
    assert obj["message"] == "connection complete"
    assert re.fullmatch(TS, obj["time"])
    assert obj["src.addr"] == "10.244.1.2:41234"
    assert obj["dst.hbone_addr"] == "10.244.2.3:8080"
    assert obj["src.identity"] == "spiffe://cluster.local/ns/shop/sa/frontend"
    assert obj["direction"] == "outbound"
    assert obj["bytes_sent"] == 12 and obj["bytes_recv"] == 34  # numbers, not strings
    assert re.fullmatch(r"\d+ms", obj["duration"])
    assert obj["error"] == "upstream reset"
    assert list(obj)[4:] == [
        "src.addr",
        "src.workload",
        "src.namespace",
        "src.identity",
        "dst.addr",
        "dst.hbone_addr",
        "dst.service",
        "dst.workload",
        "dst.namespace",
        "dst.identity",
        "direction",
        "bytes_sent",
        "bytes_recv",
        "duration",
        "error",
    ]


def test_ipv6_addresses_are_bracketed(logs):
    lines = logs("info")
    _outbound(src=("fd00::2", 5000), dst=("fd00::3", 15008)).close()
    assert "\tsrc.addr=[fd00::2]:5000 " in lines()[0]
    assert " dst.addr=[fd00::3]:15008 " in lines()[0]


def test_other_loggers_use_same_format(logs):
    lines = logs("info")
    logging.getLogger("ztunnel.proxy").warning("port %d busy", 15008)
    logging.getLogger("ztunnel.proxy").debug("hidden")
    (line,) = lines()
    assert line.split("\t")[1:] == ["warn", "ztunnel.proxy", "port 15008 busy"]


@pytest.mark.parametrize(
    "spec,default,targets",
    [
        ("info", logging.INFO, {}),
        ("access=debug,info", logging.INFO, {"access": logging.DEBUG}),
        ("ztunnel::proxy=trace , warn", logging.WARNING, {"ztunnel.proxy": accesslog.TRACE}),
        ("access=off", None, {"access": logging.CRITICAL + 10}),
        ("", None, {}),
        ("debug,error", logging.ERROR, {}),
    ],
)
def test_parse_directives(spec, default, targets):
    assert accesslog.parse_directives(spec) == (default, targets)


@pytest.mark.parametrize("spec", ["loud", "access=loud", "access", "=debug", "a b=info"])
def test_parse_directives_rejects(spec):
    with pytest.raises(accesslog.LogLevelError):
        accesslog.parse_directives(spec)


def test_set_and_reset_levels(logs):
    logs("access=debug,info")
    assert accesslog.get_log_level() == "access=debug,info"
    assert accesslog.set_log_level("warn") == "access=debug,warn"
    assert accesslog.set_log_level("ztunnel.proxy=trace") == "access=debug,ztunnel.proxy=trace,warn"
    assert logging.getLogger("ztunnel.proxy.inbound").isEnabledFor(accesslog.TRACE)
    with pytest.raises(accesslog.LogLevelError):
        accesslog.set_log_level("access=nope")
    assert accesslog.get_log_level() == "access=debug,ztunnel.proxy=trace,warn"  # unchanged
    assert accesslog.set_log_level("", reset=True) == "access=debug,info"
    assert logging.getLogger("ztunnel.proxy").level == logging.NOTSET


def test_configure_rejects_bad_format():
    with pytest.raises(ValueError):
        accesslog.configure_logging("info", "xml", io.StringIO())
