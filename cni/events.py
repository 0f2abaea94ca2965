"""The event channel between the chained CNI plugin and the node agent.

Role: the plugin (a short-lived process run by the container runtime) tells the node agent
(a long-lived process per node) about a pod sandbox being added, deleted or checked, and
waits for the agent's verdict.  The agent listens on ``<cni_agent_run_dir>/pluginevent.sock``
(a unix stream socket, mode 0600).

Wire format (ours; Istio uses HTTP+JSON on the same path, see contract c.1):

- a *frame* is a 4-byte big-endian unsigned length ``n`` followed by ``n`` bytes of msgpack
  encoding one map; ``1 <= n <= MAX_FRAME`` (64 KiB);
- the map has ``"v": 1`` (protocol version) and ``"kind"``: ``"event"`` (plugin -> agent,
  fields of :class:`PluginEvent`) or ``"reply"`` (agent -> plugin, fields of
  :class:`AgentReply`); unknown keys are ignored so either side may add fields;
- one reply per event, in order; a connection may carry several events.

Invariants:
- ``encode_frame``/``FrameDecoder`` are pure (no I/O): bytes in, typed messages out.  Whatever
  bytes are fed, the decoder raises nothing but :class:`FrameError`, and after an error it
  stays broken (the stream cannot be resynchronised; close the connection).
- This module is on the plugin's hot path: it imports nothing heavy at module level (asyncio
  only inside :func:`serve_events`, which only the agent calls).
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import msgpack  # type: ignore[import-untyped]

if TYPE_CHECKING:
    import asyncio

PROTOCOL_VERSION = 1
MAX_FRAME = 64 * 1024
HEADER = struct.Struct(">I")
SOCKET_NAME = "pluginevent.sock"
COMMANDS = ("add", "del", "check")

Command = Literal["add", "del", "check"]


class FrameError(ValueError):
    """Bytes on the event socket that are not a valid frame or message."""


class AgentUnreachable(OSError):
    """The node agent's socket is missing, refuses connections or did not answer in time."""


@dataclass(frozen=True)
class PluginEvent:
    """One CNI invocation, as the plugin reports it to the agent."""

    cmd: Command
    container_id: str
    netns: str
    ifname: str
    pod_name: str
    pod_namespace: str
    pod_uid: str
    ips: list[str] = field(default_factory=list)
    interfaces: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class AgentReply:
    """The agent's verdict.  ``ok`` false means: fail the CNI command with ``message``."""

    ok: bool
    enrolled: bool = False
    code: int = 0
    message: str = ""


Message = PluginEvent | AgentReply

_EVENT_STR_FIELDS = ("container_id", "netns", "ifname", "pod_name", "pod_namespace", "pod_uid")
_EVENT_LIST_FIELDS = ("ips", "interfaces")


def _to_map(msg: Message) -> dict[str, Any]:
    if isinstance(msg, PluginEvent):
        out: dict[str, Any] = {"v": PROTOCOL_VERSION, "kind": "event", "cmd": msg.cmd}
        for name in _EVENT_STR_FIELDS:
            out[name] = getattr(msg, name)
        for name in _EVENT_LIST_FIELDS:
            out[name] = list(getattr(msg, name))
        return out
    return {"v": PROTOCOL_VERSION, "kind": "reply", "ok": msg.ok, "enrolled": msg.enrolled,
            "code": msg.code, "message": msg.message}


def encode_frame(msg: Message) -> bytes:
    """The frame carrying ``msg``; raises FrameError when it would exceed MAX_FRAME."""
    try:
        body = msgpack.packb(_to_map(msg), use_bin_type=True)
    except (UnicodeEncodeError, ValueError, TypeError, OverflowError) as exc:
        # e.g. a lone surrogate from a non-UTF-8 environment variable or JSON "\udcff"
        raise FrameError(f"message cannot be encoded (text must be valid UTF-8): {exc}") from None
    if len(body) > MAX_FRAME:
        raise FrameError(f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte frame limit")
    return HEADER.pack(len(body)) + body


def _field(m: dict[Any, Any], name: str, kind: type, default: Any) -> Any:
    val = m.get(name, default)
    # bool is an int subclass: keep an int field from accepting True and vice versa.
    if not isinstance(val, kind) or (kind is int and isinstance(val, bool)):
        raise FrameError(f"field {name!r} must be {kind.__name__}, got {type(val).__name__}")
    return val


def _str_list(m: dict[Any, Any], name: str) -> list[str]:
    val = _field(m, name, list, [])
    if not all(isinstance(x, str) for x in val):
        raise FrameError(f"field {name!r} must be a list of strings")
    return list(val)


def message_from_map(m: Any) -> Message:
    """Validate a decoded msgpack object and build the typed message (FrameError if invalid)."""
    if not isinstance(m, dict):
        raise FrameError(f"frame must hold a map, got {type(m).__name__}")
    version = _field(m, "v", int, None) if "v" in m else None
    if version != PROTOCOL_VERSION:
        raise FrameError(f"unsupported event protocol version {version!r} "
                         f"(this side speaks {PROTOCOL_VERSION}); upgrade the plugin and the "
                         "node agent together")
    kind = m.get("kind")
    if kind == "event":
        cmd = m.get("cmd")
        if cmd not in COMMANDS:
            raise FrameError(f"unknown event cmd {cmd!r}; expected one of {COMMANDS}")
        strs = {name: _field(m, name, str, "") for name in _EVENT_STR_FIELDS}
        return PluginEvent(cmd=cmd, ips=_str_list(m, "ips"),
                           interfaces=_str_list(m, "interfaces"), **strs)
    if kind == "reply":
        return AgentReply(ok=_field(m, "ok", bool, None), enrolled=_field(m, "enrolled", bool,
                                                                          False),
                          code=_field(m, "code", int, 0), message=_field(m, "message", str, ""))
    raise FrameError(f"unknown message kind {kind!r}; expected 'event' or 'reply'")


class FrameDecoder:
    """Sans-I/O decoder: ``feed(bytes)`` returns the complete messages seen so far."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame
        self._broken: FrameError | None = None

    @property
    def pending(self) -> int:
        """Bytes buffered towards an incomplete frame (0 at a frame boundary)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Message]:
        if self._broken is not None:
            raise self._broken
        self._buf += data
        out: list[Message] = []
        try:
            while len(self._buf) >= HEADER.size:
                (n,) = HEADER.unpack_from(self._buf)
                if n == 0 or n > self._max:
                    raise FrameError(f"frame length {n} outside 1..{self._max}")
                if len(self._buf) < HEADER.size + n:
                    break
                body = bytes(self._buf[HEADER.size:HEADER.size + n])
                del self._buf[:HEADER.size + n]
                out.append(message_from_map(_unpack(body)))
        except FrameError as exc:
            self._broken = exc
            self._buf = bytearray()  # a broken stream holds nothing (it may have been 10 MB)
            raise
        return out


def _unpack(body: bytes) -> Any:
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises many types for garbage; all mean "bad frame"
        raise FrameError(f"frame is not valid msgpack: {type(exc).__name__}: {exc}") from None


# ---------------------------------------------------------------- plugin side (blocking)


def send_event(socket_path: str, event: PluginEvent, timeout: float) -> AgentReply:
    """Send ``event`` to the agent at ``socket_path`` and wait for its reply.

    Raises AgentUnreachable when the socket is missing, refuses, or the whole exchange takes
    longer than ``timeout`` seconds; FrameError when the agent answers with garbage.
    """
    deadline = time.monotonic() + timeout
    frame = encode_frame(event)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path)
            sock.sendall(frame)
            decoder = FrameDecoder()
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no reply within {timeout:g}s")
                sock.settimeout(left)
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionResetError("the agent closed the connection without a reply")
                for msg in decoder.feed(chunk):
                    if not isinstance(msg, AgentReply):
                        raise FrameError("the agent sent an event where a reply was expected")
                    return msg
        except OSError as exc:
            raise AgentUnreachable(f"{socket_path}: {exc.strerror or exc}") from exc
    finally:
        sock.close()


# ---------------------------------------------------------------- agent side (asyncio)

Handler = Callable[[PluginEvent], Awaitable[AgentReply]]


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead agent; refuse to clobber a live one or a non-socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; remove it by hand if it is "
                              "not needed")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: stale
        return
    finally:
        probe.close()
    raise FileExistsError(f"another node agent is already listening on {path}; stop it first")


async def serve_events(path: str, handler: Handler, *,
                       idle_timeout: float = 60.0) -> asyncio.Server:
    """Listen on ``path`` (mode 0600) and answer every event with ``handler``'s reply.

    A handler exception becomes ``AgentReply(ok=False, code=100, ...)`` (the pod fails closed).
    A malformed frame or ``idle_timeout`` seconds without a frame closes that connection.
    """
    import asyncio

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder()
        try:
            while True:
                chunk = await asyncio.wait_for(reader.read(65536), idle_timeout)
                if not chunk:
                    return
                for msg in decoder.feed(chunk):
                    if not isinstance(msg, PluginEvent):
                        raise FrameError("a reply was sent to the agent")
                    try:
                        reply = await handler(msg)
                    except Exception as exc:  # noqa: BLE001 - reported to the plugin
                        reply = AgentReply(ok=False, code=100,
                                           message=f"node agent failed on {msg.cmd}: {exc}")
                    writer.write(encode_frame(reply))
                    await writer.drain()
        except (FrameError, OSError, TimeoutError):
            return
        finally:
            writer.close()

    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        # Before listen() nobody can connect, so there is no window with a wider mode.
        os.chmod(path, 0o600)
        return await asyncio.start_unix_server(on_conn, sock=sock)
    except BaseException:
        sock.close()
        raise
