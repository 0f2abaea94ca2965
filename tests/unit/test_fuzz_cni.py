"""Structured property tests for the node-side parsers: the CNI plugin's stdin and
environment, the plugin<->agent event frames, and the ZDS session rules (the byte-level ZDS
codec properties live in ``test_zds_codec.py``).
"""

from __future__ import annotations

import io
import json
from typing import Any

from fuzz.hypo import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from ambient import zds
from cni import events, plugin

# ---------------------------------------------------------------------------- event frames

text = st.text(max_size=30)  # includes lone surrogates: they must be refused, not crash
plugin_events = st.builds(events.PluginEvent, st.sampled_from(events.COMMANDS), text, text,
                          text, text, text, text, st.lists(text, max_size=3),
                          st.lists(text, max_size=3))
replies = st.builds(events.AgentReply, st.booleans(), st.booleans(),
                    st.integers(-(2**63), 2**64 - 1), text)
messages = st.one_of(plugin_events, replies)


def _encodable(msg: events.Message) -> bytes | None:
    try:
        return events.encode_frame(msg)
    except events.FrameError:
        return None


@fuzz_settings(300)
@given(st.lists(messages, min_size=1, max_size=5), st.lists(st.integers(1, 50), min_size=1))
def test_frames_decode_the_same_at_any_read_boundary(msgs: list[events.Message],
                                                     cuts: list[int]) -> None:
    frames = [(m, f) for m in msgs if (f := _encodable(m)) is not None]
    blob = b"".join(f for _, f in frames)
    dec = events.FrameDecoder()
    got: list[events.Message] = []
    pos, i = 0, 0
    while pos < len(blob):
        step = cuts[i % len(cuts)]
        got += dec.feed(blob[pos : pos + step])
        pos, i = pos + step, i + 1
    assert got == [m for m, _ in frames]
    assert dec.pending == 0


@fuzz_settings(200)
@given(st.dictionaries(st.sampled_from(["v", "kind", "cmd", "ok", "code", "message", "ips",
                                        "netns", "enrolled", "pod_name"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5),
                                 st.binary(max_size=5), st.lists(st.integers(), max_size=2),
                                 st.sampled_from(["event", "reply", "add", "del"]))))
def test_message_maps_only_raise_frame_error(m: dict[str, Any]) -> None:
    try:
        msg = events.message_from_map({"v": 1, **m} if "v" not in m else m)
    except events.FrameError:
        return
    assert events.FrameDecoder().feed(events.encode_frame(msg)) == [msg]


# ---------------------------------------------------------------------------- the plugin

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
              st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
CONF_KEYS = ["cniVersion", "name", "type", "prevResult", "plugin_log_level", "cni_agent_run_dir",
             "ambient_enabled", "exclude_namespaces", "agent_timeout_s", "pod_namespace",
             "native_nftables", "runtimeConfig"]
RESULT_KEYS = ["cniVersion", "ips", "interfaces", "routes", "dns", "address", "sandbox", "name"]


@st.composite
def configs(draw: st.DrawFn) -> dict[str, Any]:
    conf: dict[str, Any] = {"cniVersion": "1.0.0", "name": "net", "type": "ambient-cni",
                            "prevResult": {"cniVersion": "1.0.0",
                                           "ips": [{"address": "10.0.0.5/24"}]}}
    for key in draw(st.lists(st.sampled_from(CONF_KEYS), max_size=4)):
        conf[key] = draw(json_values)
    if isinstance(conf.get("prevResult"), dict):
        for key in draw(st.lists(st.sampled_from(RESULT_KEYS), max_size=3)):
            conf["prevResult"][key] = draw(st.one_of(
                json_values, st.lists(st.dictionaries(st.sampled_from(RESULT_KEYS), json_values,
                                                      max_size=3), max_size=3)))
    return conf


env_text = st.one_of(st.sampled_from(["", "abc", "/var/run/netns/x", "eth0"]), st.text(max_size=20))
cni_args = st.lists(st.tuples(st.sampled_from(["K8S_POD_NAME", "K8S_POD_NAMESPACE",
                                               "K8S_POD_UID", "IgnoreUnknown", ""]),
                              st.text(max_size=10)), max_size=4).map(
    lambda kvs: ";".join(f"{k}={v}" for k, v in kvs))


@fuzz_settings(300)
@given(configs(), st.sampled_from(["ADD", "DEL", "CHECK", "VERSION", "", "GET"]), env_text,
       env_text, st.one_of(cni_args, st.text(max_size=30)),
       st.sampled_from(["ok", "refused", "unreachable", "garbage"]), st.booleans())
def test_plugin_run_never_raises_and_prints_json(conf: dict[str, Any], command: str, netns: str,
                                                 ifname: str, args: str, agent: str,
                                                 raw_json: bool) -> None:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c1", "CNI_NETNS": netns,
           "CNI_IFNAME": ifname, "CNI_ARGS": args}

    def send(event: events.PluginEvent) -> events.AgentReply:
        events.encode_frame(event)  # only what the wire can carry reaches the agent
        if agent == "unreachable":
            raise events.AgentUnreachable("no agent")
        if agent == "garbage":
            raise events.FrameError("garbage")
        return events.AgentReply(ok=agent == "ok", code=7, message="because")

    stdin = json.dumps(conf).encode()
    if raw_json:
        stdin = stdin[: len(stdin) // 2]
    code, out = plugin.run(env, stdin, send, io.StringIO())
    assert code in (0, 1)
    if code == 1:
        err = json.loads(out)
        assert isinstance(err["code"], int) and err["msg"]
    elif out:
        json.loads(out)


@fuzz_settings(300)
@given(st.text(max_size=60))
def test_cni_args_parse_or_refuse(args: str) -> None:
    try:
        k = plugin.parse_cni_args(args)
    except plugin.PluginError as e:
        assert e.code == plugin.ERR_INVALID_ENV
        return
    assert all("=" not in key for key in k.extra)


# ---------------------------------------------------------------------------- ZDS sessions

uids = st.sampled_from(["a", "b", "c"])
requests = st.one_of(
    st.builds(zds.Add, uids, st.one_of(st.none(), st.just(zds.WorkloadInfo("n", "ns", "sa")))),
    st.builds(zds.Keep, uids), st.builds(zds.Del, uids), st.just(zds.SnapshotSent()))


@fuzz_settings(300)
@given(st.lists(requests, max_size=12))
def test_ztunnel_session_any_order(seq: list[zds.Request]) -> None:
    """ztunnel's side judges any message order with ZdsProtocolError only; the uids it
    keeps after the snapshot are ones the snapshot named."""
    s = zds.ZtunnelSession()
    s.hello_sent()
    named: set[str] = set()
    for req in seq:
        try:
            keep = s.receive(req)
        except zds.ZdsProtocolError:
            return
        if isinstance(req, zds.Add | zds.Keep):
            named.add(req.uid)
        if keep is not None:
            assert keep <= named


@fuzz_settings(300)
@given(st.lists(st.one_of(requests, st.sampled_from(["", "nack"]), st.integers(0, 3)),
                max_size=12))
def test_agent_session_any_order(seq: list[Any]) -> None:
    """The agent's side: sends, acks and hellos in any order fail only with
    ZdsProtocolError."""
    s = zds.AgentSession()
    now = 0.0
    for item in seq:
        now += 1.0
        try:
            if isinstance(item, int):
                s.hello(item)
            elif isinstance(item, str):
                s.acked(item)
            else:
                s.sending(item, now)
        except zds.ZdsProtocolError:
            continue
