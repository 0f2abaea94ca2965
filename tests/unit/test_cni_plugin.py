"""The chained CNI plugin's core (`cni.plugin.run`), table-driven, with a recording agent."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from cni.events import AgentReply, AgentUnreachable, FrameError, PluginEvent
from cni.plugin import convert_result, parse_cni_args, run

PREV_1 = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "cni0", "mac": "aa:bb:cc:00:00:01"},
        {"name": "veth1234", "mac": "aa:bb:cc:00:00:02"},
        {"name": "eth0", "mac": "aa:bb:cc:00:00:03", "sandbox": "/var/run/netns/p1"},
    ],
    "ips": [{"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 2},
            {"address": "fd00::5/64", "interface": 2}],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {"nameservers": ["10.96.0.10"]},
}
ARGS = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=p1;K8S_POD_UID=u-1;" \
       "K8S_POD_INFRA_CONTAINER_ID=c0ffee"


def env(cmd: str = "ADD", **over: str) -> dict[str, str]:
    e = {"CNI_COMMAND": cmd, "CNI_CONTAINERID": "c0ffee", "CNI_NETNS": "/var/run/netns/p1",
         "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin", "CNI_ARGS": ARGS}
    e.update(over)
    return {k: v for k, v in e.items() if v is not None}


def conf(version: str = "1.0.0", prev: dict[str, Any] | None = PREV_1, **fields: Any) -> bytes:
    c: dict[str, Any] = {"cniVersion": version, "name": "pods", "type": "ambient-cni",
                         "cni_agent_run_dir": "/run/amb-test", **fields}
    if prev is not None:
        c["prevResult"] = prev
    return json.dumps(c).encode()


class Agent:
    """Records events; answers with ``reply`` or raises ``error``."""

    def __init__(self, reply: AgentReply | None = None,
                 error: Exception | None = None) -> None:
        self.reply = reply or AgentReply(ok=True, enrolled=True, message="captured")
        self.error = error
        self.events: list[PluginEvent] = []

    def __call__(self, event: PluginEvent) -> AgentReply:
        self.events.append(event)
        if self.error is not None:
            raise self.error
        return self.reply


def invoke(e: dict[str, str], stdin: bytes, agent: Agent | None = None) -> tuple[int, Any, str]:
    log = io.StringIO()
    code, out = run(e, stdin, agent or Agent(), log)
    parsed = json.loads(out) if out else None
    return code, parsed, log.getvalue()


# ------------------------------------------------------------------ VERSION


@pytest.mark.parametrize("stdin, want", [
    (b'{"cniVersion":"1.0.0"}', "1.0.0"),
    (b'{"cniVersion":"0.3.1"}', "0.3.1"),
    (b'{"cniVersion":"9.9.9"}', "1.0.0"),
    (b"", "1.0.0"),
    (b"not json", "1.0.0"),
])
def test_version(stdin: bytes, want: str) -> None:
    agent = Agent()
    code, out, _ = invoke({"CNI_COMMAND": "VERSION"}, stdin, agent)
    assert code == 0
    assert out == {"cniVersion": want, "supportedVersions": ["0.3.1", "0.4.0", "1.0.0"]}
    assert agent.events == []


# ------------------------------------------------------------------ ADD


def test_add_sends_event_and_passes_prev_result_through() -> None:
    agent = Agent()
    code, out, _ = invoke(env(), conf(), agent)
    assert code == 0
    assert out == PREV_1
    assert agent.events == [PluginEvent(
        cmd="add", container_id="c0ffee", netns="/var/run/netns/p1", ifname="eth0",
        pod_name="p1", pod_namespace="default", pod_uid="u-1", ips=["10.1.0.5", "fd00::5"],
        interfaces=["eth0"])]


def test_add_output_is_byte_identical_json_of_prev_result() -> None:
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24"}], "zzz": {"b": 1, "a": 2},
            "interfaces": []}
    _, out = run(env(), conf(prev=prev), Agent())
    assert out.rstrip(b"\n") == json.dumps(prev).encode()


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0"])
def test_add_accepts_supported_versions(version: str) -> None:
    prev = {"cniVersion": version, "ips": [{"version": "4", "address": "10.0.0.2/24"}]}
    if version == "1.0.0":
        prev["ips"][0].pop("version")
    code, out, _ = invoke(env(), conf(version, prev))
    assert code == 0
    assert out == prev


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0", "0.3.0", "1.1.0", "2.0.0", ""])
def test_unsupported_versions_refused_with_code_1(version: str) -> None:
    agent = Agent()
    code, out, _ = invoke(env(), conf(version), agent)
    assert code != 0
    assert out["code"] == 1
    assert agent.events == []


def test_missing_cni_version_is_code_1() -> None:
    code, out, _ = invoke(env(), json.dumps({"name": "x", "prevResult": PREV_1}).encode())
    assert (code, out["code"]) == (1, 1)
    assert "cniVersion" in out["msg"]


def test_prev_result_converted_to_config_version() -> None:
    old = {"cniVersion": "0.4.0", "ips": [{"version": "4", "address": "10.0.0.2/24"},
                                          {"version": "6", "address": "fd00::2/64"}]}
    code, out, _ = invoke(env(), conf("1.0.0", old))
    assert code == 0
    assert out == {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24"},
                                                  {"address": "fd00::2/64"}]}
    code, out, _ = invoke(env(), conf("0.3.1", PREV_1))
    assert code == 0
    assert out["cniVersion"] == "0.3.1"
    assert [ip["version"] for ip in out["ips"]] == ["4", "6"]
    assert out["interfaces"] == PREV_1["interfaces"]


def test_convert_result_is_identity_for_same_version() -> None:
    assert convert_result(PREV_1, "1.0.0") is PREV_1


def test_add_without_prev_result_is_an_error() -> None:
    agent = Agent()
    code, out, _ = invoke(env(), conf(prev=None), agent)
    assert (code, out["code"]) == (1, 7)
    assert "chained" in out["details"]
    assert agent.events == []


@pytest.mark.parametrize("fields, args", [
    ({"exclude_namespaces": ["default"]}, ARGS),
    ({}, ARGS.replace("=default;", "=kube-system;")),
    ({}, ARGS.replace("=default;", "=istio-system;")),
    ({"ambient_enabled": False}, ARGS),
    ({}, ""),  # not a Kubernetes pod
])
def test_add_passes_through_without_agent(fields: dict[str, Any], args: str) -> None:
    agent = Agent(error=AgentUnreachable("must not be called"))
    code, out, _ = invoke(env(CNI_ARGS=args), conf(**fields), agent)
    assert (code, out) == (0, PREV_1)
    assert agent.events == []


def test_add_fails_closed_when_agent_refuses() -> None:
    agent = Agent(AgentReply(ok=False, enrolled=True, code=0, message="iptables-restore failed"))
    code, out, log = invoke(env(), conf(), agent)
    assert code == 1
    assert out["code"] == 100
    assert out["details"] == "iptables-restore failed"
    assert "default/p1" in out["msg"]
    assert "iptables-restore failed" in log
    agent.reply = AgentReply(ok=False, code=11, message="ztunnel not connected yet")
    code, out, _ = invoke(env(), conf(), agent)
    assert (code, out["code"]) == (1, 11)


def test_add_unreachable_agent_is_try_again_later() -> None:
    agent = Agent(error=AgentUnreachable("/run/amb-test/pluginevent.sock: Connection refused"))
    code, out, _ = invoke(env(), conf(), agent)
    assert code == 1
    assert out["code"] == 11
    assert "/run/amb-test/pluginevent.sock" in out["msg"]
    assert "DaemonSet" in out["details"]
    assert out["cniVersion"] == "1.0.0"


def test_add_garbage_reply_is_plugin_error() -> None:
    code, out, _ = invoke(env(), conf(), Agent(error=FrameError("frame length 0")))
    assert (code, out["code"]) == (1, 101)


# ------------------------------------------------------------------ env and stdin


@pytest.mark.parametrize("cmd, missing", [
    ("ADD", "CNI_CONTAINERID"), ("ADD", "CNI_NETNS"), ("ADD", "CNI_IFNAME"),
    ("CHECK", "CNI_CONTAINERID"), ("CHECK", "CNI_NETNS"), ("DEL", "CNI_CONTAINERID"),
])
def test_missing_env_is_code_4(cmd: str, missing: str) -> None:
    e = env(cmd)
    del e[missing]
    agent = Agent()
    code, out, _ = invoke(e, conf(), agent)
    assert (code, out["code"]) == (1, 4)
    assert missing in out["msg"]
    assert agent.events == []


def test_missing_or_unknown_command_is_code_4() -> None:
    e = env()
    del e["CNI_COMMAND"]
    code, out, _ = invoke(e, conf())
    assert (code, out["code"]) == (1, 4)
    code, out, _ = invoke(env("GC"), conf())
    assert (code, out["code"]) == (1, 4)
    assert "GC" in out["msg"]


def test_bad_cni_args_is_code_4() -> None:
    code, out, _ = invoke(env(CNI_ARGS="K8S_POD_NAME=p;garbage"), conf())
    assert (code, out["code"]) == (1, 4)
    assert parse_cni_args(ARGS).extra == {"IgnoreUnknown": "1"}


@pytest.mark.parametrize("stdin", [b"", b"{", b"[1,2]", b'"str"', b"\xff\xfe", b"null"])
@pytest.mark.parametrize("cmd", ["ADD", "DEL", "CHECK"])
def test_bad_stdin_is_code_6(cmd: str, stdin: bytes) -> None:
    code, out, _ = invoke(env(cmd), stdin)
    assert (code, out["code"]) == (1, 6)


@pytest.mark.parametrize("fields, name", [
    ({"exclude_namespaces": "kube-system"}, "exclude_namespaces"),
    ({"exclude_namespaces": [1]}, "exclude_namespaces"),
    ({"ambient_enabled": "yes"}, "ambient_enabled"),
    ({"agent_timeout_s": 0}, "agent_timeout_s"),
    ({"agent_timeout_s": True}, "agent_timeout_s"),
    ({"cni_agent_run_dir": "relative/dir"}, "cni_agent_run_dir"),
    ({"plugin_log_level": "loud"}, "plugin_log_level"),
    ({"prev": [1]}, "prevResult"),
])
def test_invalid_config_is_code_7(fields: dict[str, Any], name: str) -> None:
    code, out, _ = invoke(env(), conf(**fields))
    assert (code, out["code"]) == (1, 7)
    assert name in out["msg"]


def test_unknown_fields_ignored_and_native_nftables_accepted() -> None:
    code, out, _ = invoke(env(), conf(native_nftables=True, enablement_selectors=[{"x": 1}],
                                      runtimeConfig={"portMappings": []}))
    assert (code, out) == (0, PREV_1)


def test_log_level_controls_stderr() -> None:
    _, _, log = invoke(env(), conf(plugin_log_level="none"),
                       Agent(AgentReply(ok=False, message="nope")))
    assert log == ""
    _, _, log = invoke(env(), conf(plugin_log_level="debug"))
    assert "agent ok" in log


# ------------------------------------------------------------------ DEL


@pytest.mark.parametrize("agent", [
    Agent(),
    Agent(AgentReply(ok=False, message="capture removal failed")),
    Agent(error=AgentUnreachable("no socket")),
    Agent(error=FrameError("garbage")),
])
@pytest.mark.parametrize("netns, prev", [
    ("/var/run/netns/p1", PREV_1), ("", None), ("/proc/999999999/ns/net", None),
])
def test_del_always_succeeds(agent: Agent, netns: str, prev: dict[str, Any] | None) -> None:
    agent.events.clear()
    e = env("DEL", CNI_NETNS=netns)
    code, out = run(e, conf(prev=prev), agent, io.StringIO())
    assert (code, out) == (0, b"")
    assert len(agent.events) == 1
    ev = agent.events[0]
    assert (ev.cmd, ev.netns, ev.pod_uid) == ("del", netns, "u-1")
    assert ev.ips == (["10.1.0.5", "fd00::5"] if prev else [])


def test_del_without_netns_env_and_for_excluded_pods() -> None:
    e = env("DEL")
    del e["CNI_NETNS"]
    del e["CNI_IFNAME"]
    agent = Agent()
    assert run(e, conf(prev=None), agent, io.StringIO()) == (0, b"")
    assert [ev.cmd for ev in agent.events] == ["del"]
    agent.events.clear()
    assert run(env("DEL"), conf(exclude_namespaces=["default"]), agent, io.StringIO()) == (0, b"")
    assert agent.events == []


# ------------------------------------------------------------------ CHECK


def test_check_ok_and_drift() -> None:
    agent = Agent()
    code, out, _ = invoke(env("CHECK"), conf(), agent)
    assert (code, out) == (0, None)
    assert agent.events[0].cmd == "check"
    agent.reply = AgentReply(ok=False, enrolled=True, code=0, message="rule 3 missing")
    code, out, _ = invoke(env("CHECK"), conf(), agent)
    assert (code, out["code"]) == (1, 100)
    assert out["details"] == "rule 3 missing"
    agent.error = AgentUnreachable("gone")
    code, out, _ = invoke(env("CHECK"), conf(), agent)
    assert (code, out["code"]) == (1, 11)


def test_check_needs_prev_result_and_version_040() -> None:
    agent = Agent()
    code, out, _ = invoke(env("CHECK"), conf(prev=None), agent)
    assert (code, out["code"]) == (1, 7)
    code, out, _ = invoke(env("CHECK"), conf("0.3.1"), agent)
    assert (code, out["code"]) == (1, 1)
    assert out["cniVersion"] == "0.3.1"
    code, _, _ = invoke(env("CHECK"), conf("0.4.0", {"cniVersion": "0.4.0", "ips": []}), agent)
    assert code == 0
    assert len(agent.events) == 1


def test_check_skips_excluded() -> None:
    agent = Agent(error=AgentUnreachable("must not be called"))
    code, out, _ = invoke(env("CHECK"), conf(ambient_enabled=False), agent)
    assert (code, out) == (0, None)
