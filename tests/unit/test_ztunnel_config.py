"""ztunnel settings from the environment: valid values, named errors, and fuzzing."""

# Case tables are kept one case per line for readability.
# ruff: noqa: E501

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ambient.hbone.protocol import CONNECTION_WINDOW, HboneSettings
from ambient.identity import DEFAULT_TRUST_DOMAIN
from ztunnel.config import Settings, SettingsError, from_env, termination_deadline

LOCAL = {"LOCAL_XDS_PATH": "/etc/ztunnel/local.yaml"}


def test_defaults():
    s = from_env({})
    assert s == Settings()
    assert s.trust_domain == DEFAULT_TRUST_DOMAIN
    assert s.cluster_id == "Kubernetes"
    assert s.pool_max_streams == 100
    assert s.pool_unused_release_s == 300.0
    assert s.termination_deadline_s == 5.0
    assert s.packet_mark == 1337
    assert s.inpod_port_reuse is True
    assert s.log_format == "plain"
    assert s.admin_addr == ("127.0.0.1", 15000)


# (id, env, attribute, expected)
VALID = [
    ("trust domain", {"TRUST_DOMAIN": "example.org"}, "trust_domain", "example.org"),
    ("empty trust domain is the default", {"TRUST_DOMAIN": ""}, "trust_domain", DEFAULT_TRUST_DOMAIN),
    ("cluster id", {"CLUSTER_ID": "c1"}, "cluster_id", "c1"),
    ("istio meta cluster id", {"ISTIO_META_CLUSTER_ID": "c2"}, "cluster_id", "c2"),
    ("CLUSTER_ID wins over ISTIO_META_CLUSTER_ID", {"CLUSTER_ID": "c1", "ISTIO_META_CLUSTER_ID": "c2"}, "cluster_id", "c1"),
    ("max streams", {"POOL_MAX_STREAMS_PER_CONNECTION": "7"}, "pool_max_streams", 7),
    ("max streams hex", {"POOL_MAX_STREAMS_PER_CONNECTION": "0x10"}, "pool_max_streams", 16),
    ("release 5m", {"POOL_UNUSED_RELEASE_TIMEOUT": "5m"}, "pool_unused_release_s", 300.0),
    ("release 30s", {"POOL_UNUSED_RELEASE_TIMEOUT": "30s"}, "pool_unused_release_s", 30.0),
    ("release bare seconds", {"POOL_UNUSED_RELEASE_TIMEOUT": "300"}, "pool_unused_release_s", 300.0),
    ("release 1h", {"POOL_UNUSED_RELEASE_TIMEOUT": "1h"}, "pool_unused_release_s", 3600.0),
    ("release 250ms", {"POOL_UNUSED_RELEASE_TIMEOUT": "250ms"}, "pool_unused_release_s", 0.25),
    ("release 1.5m", {"POOL_UNUSED_RELEASE_TIMEOUT": "1.5m"}, "pool_unused_release_s", 90.0),
    ("release zero", {"POOL_UNUSED_RELEASE_TIMEOUT": "0"}, "pool_unused_release_s", 0.0),
    ("packet mark", {"PACKET_MARK": "42"}, "packet_mark", 42),
    ("port reuse false", {"INPOD_PORT_REUSE": "false"}, "inpod_port_reuse", False),
    ("port reuse 0", {"INPOD_PORT_REUSE": "0"}, "inpod_port_reuse", False),
    ("port reuse TRUE", {"INPOD_PORT_REUSE": "TRUE"}, "inpod_port_reuse", True),
    ("port reuse off with spaces", {"INPOD_PORT_REUSE": " off "}, "inpod_port_reuse", False),
    ("port reuse empty is default", {"INPOD_PORT_REUSE": ""}, "inpod_port_reuse", True),
    ("orig src no", {"ENABLE_ORIG_SRC": "no"}, "enable_orig_src", False),
    ("log format json", {"LOG_FORMAT": "json"}, "log_format", "json"),
    ("log format JSON", {"LOG_FORMAT": "JSON"}, "log_format", "json"),
    ("log format plain", {"LOG_FORMAT": "plain"}, "log_format", "plain"),
    ("log level RUST_LOG", {"RUST_LOG": "debug", "LOG_LEVEL": "warn"}, "log_level", "debug"),
    ("log level LOG_LEVEL", {"LOG_LEVEL": "warn"}, "log_level", "warn"),
    ("secret ttl 1h", {"SECRET_TTL": "1h"}, "secret_ttl_s", 3600.0),
    ("secret ttl seconds", {"SECRET_TTL": "60"}, "secret_ttl_s", 60.0),
    ("admin addr", {"ADMIN_ADDR": "0.0.0.0:16000"}, "admin_addr", ("0.0.0.0", 16000)),
    ("admin addr ipv6", {"ADMIN_ADDR": "[::1]:15000"}, "admin_addr", ("::1", 15000)),
    ("admin addr empty host is default host", {"ADMIN_ADDR": ":15555"}, "admin_addr", ("127.0.0.1", 15555)),
    ("stats addr", {"STATS_ADDR": "127.0.0.1:9000"}, "stats_addr", ("127.0.0.1", 9000)),
    ("readiness addr", {"READINESS_ADDR": "10.0.0.1:9001"}, "readiness_addr", ("10.0.0.1", 9001)),
    ("local xds path", LOCAL, "local_xds_path", "/etc/ztunnel/local.yaml"),
    ("manifests path", {"LOCAL_MANIFESTS_PATH": "/m.yaml"}, "local_manifests_path", "/m.yaml"),
    ("inline local xds", {"LOCAL_XDS": "workloads: []"}, "local_xds", "workloads: []"),
    ("xds address", {"XDS_ADDRESS": "https://istiod.istio-system.svc:15012"}, "xds_address", "https://istiod.istio-system.svc:15012"),
    ("xds root ca", {"XDS_ROOT_CA": "SYSTEM"}, "xds_root_ca", "SYSTEM"),
    ("alt xds hostname", {"ALT_XDS_HOSTNAME": "istiod.x.svc"}, "alt_xds_hostname", "istiod.x.svc"),
    ("auth token", {"AUTH_TOKEN": "/t/istio-token"}, "auth_token", "/t/istio-token"),
    ("xds headers", {"XDS_HEADER_X_TENANT": "a", "XDS_HEADER_ZONE": "b"}, "xds_headers", (("x_tenant", "a"), ("zone", "b"))),
    ("instance ip", {"INSTANCE_IP": "10.1.2.3"}, "instance_ip", "10.1.2.3"),
    ("fake ca with ca dir", {"FAKE_CA": "true", "CA_DIR": "/ca"}, "ca_dir", "/ca"),
    ("ca dir alone implies fake ca", {"CA_DIR": "/ca"}, "fake_ca", True),
    ("ca address with fake ca", {"CA_ADDRESS": "istiod:15012", "FAKE_CA": "1", "CA_DIR": "/ca"}, "fake_ca", True),
    ("ca address", {"CA_ADDRESS": "https://istiod.istio-system.svc:15012"}, "ca_address", "https://istiod.istio-system.svc:15012"),
    ("ca address alone is no fake ca", {"CA_ADDRESS": "istiod:15012"}, "fake_ca", False),
    ("ca root ca", {"CA_ROOT_CA": "/etc/root.pem"}, "ca_root_ca", "/etc/root.pem"),
    ("alt ca hostname", {"ALT_CA_HOSTNAME": "istiod.x.svc"}, "alt_ca_hostname", "istiod.x.svc"),
    ("ca headers", {"CA_HEADER_X_TENANT": "a"}, "ca_headers", (("x_tenant", "a"),)),
    ("zds socket", {"INPOD_UDS": "/var/run/ztunnel/ztunnel.sock"}, "inpod_uds", "/var/run/ztunnel/ztunnel.sock"),
    ("zds socket unset", {}, "inpod_uds", None),
    ("zds socket empty is unset", {"INPOD_UDS": ""}, "inpod_uds", None),
    ("network", {"NETWORK": "net1"}, "network", "net1"),
    ("root namespace", {"ROOT_NAMESPACE": "mesh"}, "root_namespace", "mesh"),
    ("http2 windows and frame size", {"HTTP2_STREAM_WINDOW_SIZE": "1048576", "HTTP2_FRAME_SIZE": "65536"}, "hbone", HboneSettings(stream_window=1 << 20, max_frame_size=1 << 16, connection_window=CONNECTION_WINDOW)),
    ("http2 connection window", {"HTTP2_CONNECTION_WINDOW_SIZE": "33554432"}, "hbone", HboneSettings(connection_window=32 << 20)),
]  # fmt: skip


@pytest.mark.parametrize("env,attr,want", [c[1:] for c in VALID], ids=[c[0] for c in VALID])
def test_valid(env, attr, want):
    assert getattr(from_env(env), attr) == want


# (id, env, expected termination deadline)
DEADLINES = [
    ("default", {}, 5.0),
    ("explicit deadline", {"CONNECTION_TERMINATION_DEADLINE": "12s"}, 12.0),
    ("explicit deadline bare", {"CONNECTION_TERMINATION_DEADLINE": "3"}, 3.0),
    ("deadline wins over grace period", {"CONNECTION_TERMINATION_DEADLINE": "2s", "TERMINATION_GRACE_PERIOD_SECONDS": "60"}, 2.0),
    ("grace 30 minus 5", {"TERMINATION_GRACE_PERIOD_SECONDS": "30"}, 25.0),
    ("grace 11 minus 5", {"TERMINATION_GRACE_PERIOD_SECONDS": "11"}, 6.0),
    ("grace 10 minus 1", {"TERMINATION_GRACE_PERIOD_SECONDS": "10"}, 9.0),
    ("grace 3 minus 1", {"TERMINATION_GRACE_PERIOD_SECONDS": "3"}, 2.0),
    ("grace 0 stays 0", {"TERMINATION_GRACE_PERIOD_SECONDS": "0"}, 0.0),
    ("grace 0.5 never negative", {"TERMINATION_GRACE_PERIOD_SECONDS": "0.5"}, 0.0),
    ("empty deadline falls to grace", {"CONNECTION_TERMINATION_DEADLINE": "", "TERMINATION_GRACE_PERIOD_SECONDS": "20"}, 15.0),
]  # fmt: skip


@pytest.mark.parametrize("env,want", [c[1:] for c in DEADLINES], ids=[c[0] for c in DEADLINES])
def test_termination_deadline(env, want):
    assert termination_deadline(env) == want
    assert from_env(env).termination_deadline_s == want


# (id, env, the variable the message must name)
INVALID = [
    ("bad bool", {"INPOD_PORT_REUSE": "maybe"}, "INPOD_PORT_REUSE"),
    ("bad bool orig src", {"ENABLE_ORIG_SRC": "2"}, "ENABLE_ORIG_SRC"),
    ("bad bool fake ca", {"FAKE_CA": "yep", "CA_DIR": "/ca"}, "FAKE_CA"),
    ("bad int", {"POOL_MAX_STREAMS_PER_CONNECTION": "ten"}, "POOL_MAX_STREAMS_PER_CONNECTION"),
    ("int below minimum", {"POOL_MAX_STREAMS_PER_CONNECTION": "0"}, "POOL_MAX_STREAMS_PER_CONNECTION"),
    ("int float", {"PACKET_MARK": "1.5"}, "PACKET_MARK"),
    ("negative packet mark", {"PACKET_MARK": "-1"}, "PACKET_MARK"),
    ("bad duration", {"POOL_UNUSED_RELEASE_TIMEOUT": "5 minutes"}, "POOL_UNUSED_RELEASE_TIMEOUT"),
    ("unknown duration unit", {"POOL_UNUSED_RELEASE_TIMEOUT": "5d"}, "POOL_UNUSED_RELEASE_TIMEOUT"),
    ("negative duration", {"POOL_UNUSED_RELEASE_TIMEOUT": "-5"}, "POOL_UNUSED_RELEASE_TIMEOUT"),
    ("negative duration with unit", {"POOL_UNUSED_RELEASE_TIMEOUT": "-5s"}, "POOL_UNUSED_RELEASE_TIMEOUT"),
    ("secret ttl below minimum", {"SECRET_TTL": "0.5"}, "SECRET_TTL"),
    ("bad secret ttl", {"SECRET_TTL": "forever"}, "SECRET_TTL"),
    ("bad deadline", {"CONNECTION_TERMINATION_DEADLINE": "soon"}, "CONNECTION_TERMINATION_DEADLINE"),
    ("bad grace period", {"TERMINATION_GRACE_PERIOD_SECONDS": "x"}, "TERMINATION_GRACE_PERIOD_SECONDS"),
    ("negative grace period", {"TERMINATION_GRACE_PERIOD_SECONDS": "-30"}, "TERMINATION_GRACE_PERIOD_SECONDS"),
    ("xds path and manifests", {**LOCAL, "LOCAL_MANIFESTS_PATH": "/m.yaml"}, "LOCAL_MANIFESTS_PATH"),
    ("xds path and inline xds", {**LOCAL, "LOCAL_XDS": "workloads: []"}, "LOCAL_XDS"),
    ("xds address with a local source", {**LOCAL, "XDS_ADDRESS": "istiod:15012"}, "XDS_ADDRESS"),
    ("xds address without port", {"XDS_ADDRESS": "https://istiod"}, "XDS_ADDRESS"),
    ("xds address bad scheme", {"XDS_ADDRESS": "ftp://istiod:15012"}, "XDS_ADDRESS"),
    ("xds header bad key", {"XDS_HEADER_A B": "x"}, "XDS_HEADER_A B"),
    ("xds header grpc key", {"XDS_HEADER_GRPC-TIMEOUT": "1"}, "XDS_HEADER_GRPC-TIMEOUT"),
    ("fake ca without ca dir", {"FAKE_CA": "true"}, "CA_DIR"),
    ("ca address without port", {"CA_ADDRESS": "istiod"}, "CA_ADDRESS"),
    ("ca header grpc key", {"CA_HEADER_GRPC-TIMEOUT": "1"}, "CA_HEADER_GRPC-TIMEOUT"),
    ("bad log format", {"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
    ("admin addr without port", {"ADMIN_ADDR": "localhost"}, "ADMIN_ADDR"),
    ("admin addr port 0", {"ADMIN_ADDR": "127.0.0.1:0"}, "ADMIN_ADDR"),
    ("admin addr port too big", {"ADMIN_ADDR": "127.0.0.1:65536"}, "ADMIN_ADDR"),
    ("admin addr port not a number", {"ADMIN_ADDR": "127.0.0.1:http"}, "ADMIN_ADDR"),
    ("stats addr bad", {"STATS_ADDR": "nope"}, "STATS_ADDR"),
    ("readiness addr bad", {"READINESS_ADDR": "1.2.3.4:"}, "READINESS_ADDR"),
    ("http2 frame size too small", {"HTTP2_FRAME_SIZE": "1024"}, "HTTP2_FRAME_SIZE"),
    ("http2 frame size too large", {"HTTP2_FRAME_SIZE": "16777216"}, "HTTP2_FRAME_SIZE"),
    ("http2 window not a number", {"HTTP2_STREAM_WINDOW_SIZE": "big"}, "HTTP2_STREAM_WINDOW_SIZE"),
]  # fmt: skip


@pytest.mark.parametrize("env,name", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid(env, name):
    with pytest.raises(SettingsError) as ei:
        from_env(env)
    assert name in str(ei.value)


def test_xds_path_and_manifests_message_names_both():
    with pytest.raises(SettingsError, match="LOCAL_XDS_PATH.*LOCAL_MANIFESTS_PATH"):
        from_env({**LOCAL, "LOCAL_MANIFESTS_PATH": "/m.yaml"})


def test_settings_error_is_a_value_error():
    assert issubclass(SettingsError, ValueError)


def test_unrelated_bad_values_are_not_read():
    # A variable that does not apply to this implementation is never parsed.
    assert from_env({"ISTIO_META_DNS_CAPTURE": "banana"}) == Settings()


@pytest.mark.parametrize("name", ["ADMIN_ADDR", "STATS_ADDR", "READINESS_ADDR"])
def test_address_with_superscript_port_is_a_settings_error(name):
    with pytest.raises(SettingsError, match=name):
        from_env({name: "127.0.0.1:²"})


@pytest.mark.parametrize(
    "name",
    [
        "SECRET_TTL",
        "POOL_UNUSED_RELEASE_TIMEOUT",
        "CONNECTION_TERMINATION_DEADLINE",
        "TERMINATION_GRACE_PERIOD_SECONDS",
    ],
)
def test_nan_duration_is_a_settings_error(name):
    with pytest.raises(SettingsError, match=name):
        from_env({name: "nan"})


# -- fuzzing ---------------------------------------------------------------------------------

PARSED = [
    "TRUST_DOMAIN", "CLUSTER_ID", "ISTIO_META_CLUSTER_ID", "POOL_MAX_STREAMS_PER_CONNECTION",
    "POOL_UNUSED_RELEASE_TIMEOUT", "PACKET_MARK", "INPOD_PORT_REUSE", "ENABLE_ORIG_SRC",
    "LOG_FORMAT", "SECRET_TTL", "CONNECTION_TERMINATION_DEADLINE",
    "TERMINATION_GRACE_PERIOD_SECONDS", "LOCAL_XDS_PATH", "LOCAL_XDS", "LOCAL_MANIFESTS_PATH",
    "XDS_ADDRESS", "FAKE_CA", "CA_DIR", "CA_ADDRESS", "RUST_LOG", "LOG_LEVEL",
    "INPOD_UDS",
]  # fmt: skip
ADDRS = ["ADMIN_ADDR", "STATS_ADDR", "READINESS_ADDR"]
# Text biased towards the shapes the parsers look at: digits, units, signs, colons, brackets.
VALUE = st.one_of(
    st.text(max_size=12),
    st.text(alphabet="0123456789.-+:[]xXeEsmhnaif_ ²٣", max_size=10),
    st.sampled_from(["true", "false", "json", "plain", "5m", "30s", "300", "1.5h", "0x10"]),
)


def _parses_or_settings_error(env):
    try:
        s = from_env(env)
    except SettingsError as e:
        assert any(name in str(e) for name in env), str(e)
        return
    assert isinstance(s, Settings)
    assert s.pool_max_streams >= 1 and s.packet_mark >= 1
    assert s.log_format in ("plain", "json")


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(PARSED), VALUE, max_size=6))
def test_arbitrary_values_parse_or_raise_settings_error(env):
    _parses_or_settings_error(env)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(ADDRS), VALUE, max_size=3))
@example({"ADMIN_ADDR": "h:²"})
def test_arbitrary_addresses_parse_or_raise_settings_error(env):
    _parses_or_settings_error(env)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(ADDRS), st.from_regex(r"\A[0-9a-z.\[\]:]{0,20}\Z"))
def test_ascii_addresses_parse_or_raise_settings_error(name, value):
    _parses_or_settings_error({name: value})
