"""The chained CNI plugin ``ambient-cni``: tells the node agent about pod sandboxes.

Role: the container runtime runs this after the primary CNI (bridge, Calico, ...) has wired a
pod; we hand the pod's netns, IPs and interfaces to the node agent, which captures the pod's
traffic for ztunnel, and then print the primary plugin's result unchanged.  The plugin itself
changes nothing in the pod.

Config fields (our entry in the conflist's ``plugins[]``, like Istio's ``PluginConf``):

==========================  ==============================  ======================================
field                       default                         meaning
==========================  ==============================  ======================================
``type``                    ``"ambient-cni"``               the binary name in the CNI bin dir
``name``                    (network name)                  set by the runtime for chained plugins
``cniVersion``              (required)                      0.3.1, 0.4.0 or 1.0.0
``plugin_log_level``        ``"info"``                      debug, info, warn, error or none;
                                                            logs go to stderr
``cni_agent_run_dir``       ``"/var/run/ambient-cni"``      holds the agent's ``pluginevent.sock``
``ambient_enabled``         ``true``                        false: pass through, never ask agent
``exclude_namespaces``      ``["istio-system",              pods in these namespaces pass through
                            "kube-system"]``
``pod_namespace``           ``""``                          namespace the mesh runs in (info only)
``native_nftables``         ``false``                       accepted; the agent decides the backend
``agent_timeout_s``         ``30``                          how long to wait for the agent
==========================  ==============================  ======================================

Unknown fields (``enablement_selectors``, ``runtimeConfig``, ``args``, ...) are ignored.

Behaviour (CNI spec 1.0.0, with 0.3.1/0.4.0 configs accepted):

- ADD needs ``prevResult`` (we only run chained).  A pod without Kubernetes ``CNI_ARGS``, in an
  excluded namespace, or with ``ambient_enabled: false`` passes through without contacting the
  agent.  Otherwise the agent decides: ok -> print ``prevResult``; refused -> CNI error (fail
  closed: the pod must not start uncaptured); unreachable -> code 11, "try again later".
- DEL always succeeds and prints nothing: a missing netns, prevResult or agent is logged only.
- CHECK (0.4.0+) asks the agent and fails when it reports drift.
- VERSION prints the supported versions.

Invariants: ``run`` is pure apart from calling ``send`` and writing logs; ``prevResult`` is
printed as given (only converted when the config's cniVersion differs); this module imports
nothing heavy (no protobuf, grpc or asyncio): it runs for every pod sandbox.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from cni.enroll import DEFAULT_EXCLUDED
from cni.events import (
    SOCKET_NAME,
    AgentReply,
    AgentUnreachable,
    Command,
    FrameError,
    PluginEvent,
    encode_frame,
    send_event,
)

PLUGIN_TYPE = "ambient-cni"
SUPPORTED_VERSIONS = ("0.3.1", "0.4.0", "1.0.0")
LATEST_VERSION = "1.0.0"
# Result formats we can read in a prevResult: 0.3.x/0.4.0 carry ips[].version, 1.x does not.
_OLD_RESULT_VERSIONS = ("0.3.0", "0.3.1", "0.4.0")
_NEW_RESULT_VERSIONS = ("1.0.0", "1.1.0")

# CNI well-known error codes (spec "Error" section); 100+ are ours.
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_DECODING = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN_LATER = 11
ERR_AGENT_REFUSED = 100
ERR_AGENT_PROTOCOL = 101
ERR_INTERNAL = 102

DEFAULT_RUN_DIR = "/var/run/ambient-cni"
DEFAULT_EXCLUDE = DEFAULT_EXCLUDED  # the agent's default too (cni.enroll)
LOG_LEVELS = {"debug": 10, "info": 20, "warn": 30, "warning": 30, "error": 40, "none": 100}

Sender = Callable[[PluginEvent], AgentReply]


class PluginError(Exception):
    """Ends the invocation with a CNI error JSON on stdout and a non-zero exit code."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


@dataclass(frozen=True)
class PluginConf:
    """Our entry of the network config, validated."""

    cni_version: str
    name: str = ""
    type: str = PLUGIN_TYPE
    plugin_log_level: str = "info"
    cni_agent_run_dir: str = DEFAULT_RUN_DIR
    ambient_enabled: bool = True
    exclude_namespaces: tuple[str, ...] = DEFAULT_EXCLUDE
    pod_namespace: str = ""
    native_nftables: bool = False
    agent_timeout_s: float = 30.0
    prev_result: dict[str, Any] | None = None

    @property
    def socket_path(self) -> str:
        return os.path.join(self.cni_agent_run_dir, SOCKET_NAME)


@dataclass(frozen=True)
class K8sArgs:
    """The Kubernetes identity of the sandbox, from ``CNI_ARGS``."""

    pod_name: str = ""
    pod_namespace: str = ""
    pod_uid: str = ""
    infra_container_id: str = ""
    extra: dict[str, str] = field(default_factory=dict)


class Log:
    """Leveled logging to a stream (stderr: the runtime captures it)."""

    def __init__(self, level: str = "info", stream: TextIO | None = None) -> None:
        self.threshold = LOG_LEVELS.get(level, 20)
        self.stream = stream if stream is not None else sys.stderr
        self.context = ""

    def _emit(self, level: int, tag: str, msg: str) -> None:
        if level >= self.threshold:
            print(f"ambient-cni {tag} {self.context}{msg}", file=self.stream)

    def debug(self, msg: str) -> None:
        self._emit(10, "debug", msg)

    def info(self, msg: str) -> None:
        self._emit(20, "info", msg)

    def warn(self, msg: str) -> None:
        self._emit(30, "warn", msg)

    def error(self, msg: str) -> None:
        self._emit(40, "error", msg)


# ------------------------------------------------------------------ parsing (pure)


def parse_stdin(stdin: bytes) -> dict[str, Any]:
    """The network config object from stdin (ERR_DECODING when it is not a JSON object)."""
    try:
        conf = json.loads(stdin.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nesting
        raise PluginError(ERR_DECODING, "the network config on stdin is not valid JSON",
                          str(exc)) from None
    if not isinstance(conf, dict):
        raise PluginError(ERR_DECODING, "the network config on stdin must be a JSON object",
                          f"got {type(conf).__name__}")
    return conf


def check_version(raw: dict[str, Any]) -> str:
    version = raw.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise PluginError(ERR_INCOMPATIBLE_VERSION,
                          "the network config has no cniVersion",
                          f"set cniVersion to one of {', '.join(SUPPORTED_VERSIONS)}")
    if version not in SUPPORTED_VERSIONS:
        raise PluginError(ERR_INCOMPATIBLE_VERSION,
                          f"cniVersion {version} is not supported by ambient-cni",
                          f"supported: {', '.join(SUPPORTED_VERSIONS)}")
    return version


def _typed(raw: dict[str, Any], key: str, kinds: tuple[type, ...], default: Any) -> Any:
    val = raw.get(key, default)
    if val is None and default is None:
        return None
    if not isinstance(val, kinds) or (bool not in kinds and isinstance(val, bool)):
        want = " or ".join(k.__name__ for k in kinds)
        raise PluginError(ERR_INVALID_CONFIG, f"config field {key!r} must be {want}",
                          f"got {json.dumps(val)}")
    return val


def parse_conf(raw: dict[str, Any]) -> PluginConf:
    """Validate our fields (ERR_INVALID_CONFIG naming the field when one is wrong)."""
    version = check_version(raw)
    level = _typed(raw, "plugin_log_level", (str,), "info").lower()
    if level not in LOG_LEVELS:
        raise PluginError(ERR_INVALID_CONFIG, f"plugin_log_level {level!r} is not one of "
                          f"{', '.join(sorted(LOG_LEVELS))}")
    run_dir = _typed(raw, "cni_agent_run_dir", (str,), DEFAULT_RUN_DIR)
    if not os.path.isabs(run_dir):
        raise PluginError(ERR_INVALID_CONFIG, "cni_agent_run_dir must be an absolute path",
                          f"got {run_dir!r}")
    excl = _typed(raw, "exclude_namespaces", (list,), list(DEFAULT_EXCLUDE))
    if not all(isinstance(x, str) for x in excl):
        raise PluginError(ERR_INVALID_CONFIG, "exclude_namespaces must be a list of strings",
                          f"got {json.dumps(excl)}")
    timeout = _typed(raw, "agent_timeout_s", (int, float), 30)
    if not 0 < timeout <= 600:
        raise PluginError(ERR_INVALID_CONFIG, "agent_timeout_s must be in (0, 600] seconds",
                          f"got {timeout}")
    prev = _typed(raw, "prevResult", (dict,), None)
    return PluginConf(
        cni_version=version,
        name=_typed(raw, "name", (str,), ""),
        type=_typed(raw, "type", (str,), PLUGIN_TYPE),
        plugin_log_level=level,
        cni_agent_run_dir=run_dir,
        ambient_enabled=_typed(raw, "ambient_enabled", (bool,), True),
        exclude_namespaces=tuple(excl),
        pod_namespace=_typed(raw, "pod_namespace", (str,), ""),
        native_nftables=_typed(raw, "native_nftables", (bool,), False),
        agent_timeout_s=float(timeout),
        prev_result=prev,
    )


def parse_cni_args(args: str) -> K8sArgs:
    """``K=V;K=V`` from CNI_ARGS (ERR_INVALID_ENV on a pair without ``=``)."""
    pairs: dict[str, str] = {}
    for item in args.split(";"):
        if not item:
            continue
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise PluginError(ERR_INVALID_ENV, f"CNI_ARGS has an invalid pair {item!r}",
                              "expected K=V pairs separated by ';'")
        pairs[key] = val
    known = ("K8S_POD_NAME", "K8S_POD_NAMESPACE", "K8S_POD_UID", "K8S_POD_INFRA_CONTAINER_ID")
    return K8sArgs(pod_name=pairs.get("K8S_POD_NAME", ""),
                   pod_namespace=pairs.get("K8S_POD_NAMESPACE", ""),
                   pod_uid=pairs.get("K8S_POD_UID", ""),
                   infra_container_id=pairs.get("K8S_POD_INFRA_CONTAINER_ID", ""),
                   extra={k: v for k, v in pairs.items() if k not in known})


def _result_version(result: dict[str, Any], default: str) -> str:
    version = result.get("cniVersion", default)
    return version if isinstance(version, str) else default


def convert_result(result: dict[str, Any], to_version: str) -> dict[str, Any]:
    """``result`` in the format of ``to_version``; the same object when no change is needed."""
    src = _result_version(result, to_version)
    if src == to_version:
        return result
    if src not in _OLD_RESULT_VERSIONS + _NEW_RESULT_VERSIONS:
        raise PluginError(ERR_INCOMPATIBLE_VERSION,
                          f"prevResult has cniVersion {src}, which ambient-cni cannot convert "
                          f"to {to_version}")
    out = dict(result)
    out["cniVersion"] = to_version
    to_old = to_version in _OLD_RESULT_VERSIONS
    if (src in _OLD_RESULT_VERSIONS) != to_old and isinstance(result.get("ips"), list):
        ips = []
        for ipc in result["ips"]:
            ipc = dict(ipc) if isinstance(ipc, dict) else ipc
            if isinstance(ipc, dict):
                if to_old:
                    addr = str(ipc.get("address", ""))
                    ipc = {"version": "6" if ":" in addr else "4", **ipc}
                else:
                    ipc.pop("version", None)
            ips.append(ipc)
        out["ips"] = ips
    return out


def result_ips(result: dict[str, Any] | None) -> list[str]:
    """Pod addresses (without prefix length) from a prevResult, in order."""
    out: list[str] = []
    ips = (result or {}).get("ips")
    for ipc in ips if isinstance(ips, list) else []:  # prevResult is the runtime's JSON
        if isinstance(ipc, dict) and isinstance(ipc.get("address"), str):
            out.append(ipc["address"].split("/")[0])
    return out


def result_interfaces(result: dict[str, Any] | None, ifname: str) -> list[str]:
    """The pod-side interfaces (those with a ``sandbox``) from a prevResult; else ``ifname``."""
    out: list[str] = []
    itfs = (result or {}).get("interfaces")
    for itf in itfs if isinstance(itfs, list) else []:
        if isinstance(itf, dict) and itf.get("sandbox") and isinstance(itf.get("name"), str):
            out.append(itf["name"])
    if not out and ifname:
        out.append(ifname)
    return out


# ------------------------------------------------------------------ commands


def _require_env(env: Mapping[str, str], *names: str) -> None:
    for name in names:
        if not env.get(name):
            raise PluginError(ERR_INVALID_ENV, f"{name} is not set",
                              "the container runtime must set it (CNI spec, Parameters)")


def _skip_reason(conf: PluginConf, k8s: K8sArgs) -> str:
    """Why this sandbox needs no agent at all ('' when it does)."""
    if not conf.ambient_enabled:
        return "ambient_enabled is false"
    if not k8s.pod_namespace or not k8s.pod_name:
        return "no K8S_POD_NAMESPACE/K8S_POD_NAME in CNI_ARGS (not a Kubernetes pod)"
    if k8s.pod_namespace in conf.exclude_namespaces:
        return f"namespace {k8s.pod_namespace} is excluded"
    return ""


def _event(cmd: Command, env: Mapping[str, str], conf: PluginConf, k8s: K8sArgs) -> PluginEvent:
    ifname = env.get("CNI_IFNAME", "")
    return PluginEvent(cmd=cmd, container_id=env.get("CNI_CONTAINERID", ""),
                       netns=env.get("CNI_NETNS", ""), ifname=ifname, pod_name=k8s.pod_name,
                       pod_namespace=k8s.pod_namespace, pod_uid=k8s.pod_uid,
                       ips=result_ips(conf.prev_result),
                       interfaces=result_interfaces(conf.prev_result, ifname))


def _ask_agent(send: Sender, event: PluginEvent, conf: PluginConf) -> AgentReply:
    try:
        encode_frame(event)
    except FrameError as exc:  # our side's problem: do not blame the agent for it
        raise PluginError(ERR_DECODING, "the pod's CNI parameters cannot be sent to the node agent",
                          f"{exc}; CNI_ARGS, the CNI_* variables and prevResult must be valid "
                          "UTF-8") from None
    try:
        return send(event)
    except AgentUnreachable as exc:
        raise PluginError(
            ERR_TRY_AGAIN_LATER,
            f"the ambient node agent is not reachable on {conf.socket_path}",
            f"{exc}; check that the node agent DaemonSet pod runs on this node "
            "(kubectl -n <mesh namespace> get pods -o wide) and that cni_agent_run_dir "
            "matches its run dir") from None
    except FrameError as exc:
        raise PluginError(ERR_AGENT_PROTOCOL,
                          f"the node agent on {conf.socket_path} sent an invalid reply",
                          f"{exc}; are the plugin and the node agent the same version?"
                          ) from None


def _refused(reply: AgentReply, what: str) -> PluginError:
    code = reply.code if reply.code > 0 else ERR_AGENT_REFUSED
    return PluginError(code, f"the ambient node agent refused {what}",
                       reply.message or "no reason given; see the node agent's log")


def cmd_add(env: Mapping[str, str], conf: PluginConf, k8s: K8sArgs, send: Sender,
            log: Log) -> bytes:
    _require_env(env, "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME")
    if conf.prev_result is None:
        raise PluginError(ERR_INVALID_CONFIG, "ADD without prevResult",
                          "ambient-cni only runs chained after a primary CNI plugin: put it "
                          "last in the plugins list of a .conflist")
    out = convert_result(conf.prev_result, conf.cni_version)
    reason = _skip_reason(conf, k8s)
    if reason:
        log.info(f"pass through: {reason}")
        return _dump(out)
    reply = _ask_agent(send, _event("add", env, conf, k8s), conf)
    if not reply.ok:
        raise _refused(reply, f"pod {k8s.pod_namespace}/{k8s.pod_name}")
    log.info(f"agent ok (enrolled={reply.enrolled}) {reply.message}".rstrip())
    return _dump(out)


def cmd_del(env: Mapping[str, str], conf: PluginConf, k8s: K8sArgs, send: Sender,
            log: Log) -> bytes:
    _require_env(env, "CNI_CONTAINERID")
    reason = _skip_reason(conf, k8s)
    if reason:
        log.debug(f"DEL pass through: {reason}")
        return b""
    try:
        reply = _ask_agent(send, _event("del", env, conf, k8s), conf)
    except PluginError as exc:
        log.warn(f"DEL not reported to the agent (ignored): {exc.msg}: {exc.details}")
        return b""
    if not reply.ok:
        log.warn(f"agent reported a DEL problem (ignored): {reply.message}")
    return b""


def cmd_check(env: Mapping[str, str], conf: PluginConf, k8s: K8sArgs, send: Sender,
              log: Log) -> bytes:
    _require_env(env, "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME")
    if conf.cni_version in ("0.3.0", "0.3.1"):
        raise PluginError(ERR_INCOMPATIBLE_VERSION,
                          f"CHECK is not defined for cniVersion {conf.cni_version}",
                          "CHECK needs cniVersion 0.4.0 or later")
    if conf.prev_result is None:
        raise PluginError(ERR_INVALID_CONFIG, "CHECK without prevResult",
                          "the runtime must pass the cached ADD result")
    reason = _skip_reason(conf, k8s)
    if reason:
        log.debug(f"CHECK pass through: {reason}")
        return b""
    reply = _ask_agent(send, _event("check", env, conf, k8s), conf)
    if not reply.ok:
        raise _refused(reply, f"CHECK of pod {k8s.pod_namespace}/{k8s.pod_name} (drift)")
    return b""


def _dump(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _error(code: int, msg: str, details: str, version: str) -> bytes:
    return _dump({"cniVersion": version, "code": code, "msg": msg, "details": details})


def _version_info(stdin: bytes) -> bytes:
    version = LATEST_VERSION
    try:
        req = json.loads(stdin or b"{}")
        if isinstance(req, dict) and req.get("cniVersion") in SUPPORTED_VERSIONS:
            version = req["cniVersion"]
    except (ValueError, RecursionError):
        pass
    return _dump({"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)})


_COMMANDS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check}


def run(env: Mapping[str, str], stdin: bytes, send: Sender,
        log_stream: TextIO | None = None) -> tuple[int, bytes]:
    """One invocation: the exit code and what to print on stdout."""
    log = Log("info", log_stream)
    version = LATEST_VERSION
    command = env.get("CNI_COMMAND", "")
    try:
        if not command:
            raise PluginError(ERR_INVALID_ENV, "CNI_COMMAND is not set",
                              "expected ADD, DEL, CHECK or VERSION")
        if command == "VERSION":
            return 0, _version_info(stdin)
        handler = _COMMANDS.get(command)
        if handler is None:
            raise PluginError(ERR_INVALID_ENV, f"unknown CNI_COMMAND {command!r}",
                              "expected ADD, DEL, CHECK or VERSION")
        raw = parse_stdin(stdin)
        version = check_version(raw)
        conf = parse_conf(raw)
        log = Log(conf.plugin_log_level, log_stream)
        k8s = parse_cni_args(env.get("CNI_ARGS", ""))
        log.context = (f"{command} {env.get('CNI_CONTAINERID', '')[:12]} "
                       f"{k8s.pod_namespace}/{k8s.pod_name}: ")
        return 0, handler(env, conf, k8s, send, log)
    except PluginError as exc:
        log.error(f"code {exc.code}: {exc.msg}" + (f" ({exc.details})" if exc.details else ""))
        return 1, _error(exc.code, exc.msg, exc.details, version)


def _sender(stdin: bytes) -> Sender:
    """Sends to the socket named by the config; only called once ``run`` validated it."""
    def send(event: PluginEvent) -> AgentReply:
        conf = parse_conf(parse_stdin(stdin))
        return send_event(conf.socket_path, event, conf.agent_timeout_s)
    return send


def main() -> int:
    stdin = sys.stdin.buffer.read()
    try:
        code, out = run(os.environ, stdin, _sender(stdin))
    except Exception as exc:  # a bug must still produce a CNI error, never a bare traceback
        print(f"ambient-cni error internal: {exc!r}", file=sys.stderr)
        code, out = 1, _error(ERR_INTERNAL, f"ambient-cni internal error: {exc!r}",
                              "please report this with the plugin's stderr", LATEST_VERSION)
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
