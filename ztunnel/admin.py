"""ztunnel's three observability ports, each its own tiny HTTP server (as upstream keeps them
apart so a slow admin request can never fail a readiness probe):

- admin, ``127.0.0.1:15000`` (localhost only; it can shut the process down): ``/`` index,
  ``/config_dump`` (JSON from a callable), ``/logging`` (GET lists; POST ``?level=<directives>``,
  ``?<target>=<level>``, ``?reset``), ``/quitquitquit`` (POST: graceful shutdown),
  ``/connections`` (live connections, an addition of ours), ``/tap`` (a stream of connection
  events, newline-delimited JSON, see ``ztunnel.tap``; also ours);
- stats, ``0.0.0.0:15020``: ``/metrics`` and ``/stats/prometheus``;
- readiness, ``0.0.0.0:15021``: ``/healthz/ready``: ``200 ready`` once every task registered with
  ``Readiness`` is done, else ``500 not ready, pending: a, b`` (upstream's status and text).

Texts and status codes follow istio/ztunnel's ``admin.rs``, ``readiness/server.rs`` and
``metrics/server.rs``. Unknown paths are 404, wrong methods 405.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import enum
import html
import ipaddress
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ztunnel import accesslog
from ztunnel.httpserve import HttpServer, Request, Response, text
from ztunnel.metrics import Metrics
from ztunnel.result import ConnectionTracker
from ztunnel.tap import TapHub

__all__ = [
    "ADMIN_ADDR",
    "NOT_READY_STATUS",
    "READINESS_ADDR",
    "STATS_ADDR",
    "AdminServer",
    "Readiness",
    "ReadinessServer",
    "ReadyToken",
    "StatsServer",
    "to_jsonable",
]

ADMIN_ADDR = ("127.0.0.1", 15000)
STATS_ADDR = ("0.0.0.0", 15020)
READINESS_ADDR = ("0.0.0.0", 15021)
NOT_READY_STATUS = 500  # upstream answers 500 (any status >= 400 fails a kubelet probe)

log = logging.getLogger("ztunnel.admin")


# ---------------------------------------------------------------------------------------------
# Readiness


class ReadyToken:
    """One registered readiness task; ``done()`` (idempotent) or leave a ``with`` block."""

    def __init__(self, parent: Readiness, name: str):
        self._parent = parent
        self.name = name
        self.is_done = False

    def done(self) -> None:
        if not self.is_done:
            self.is_done = True
            self._parent._complete(self)

    def __enter__(self) -> ReadyToken:
        return self

    def __exit__(self, *exc: object) -> None:
        self.done()


class Readiness:
    """The set of startup tasks that must finish before ``/healthz/ready`` says ready.

    Upstream's tasks: "state manager", "proxy", "dns proxy", "workload proxy manager". Nothing
    registered means ready.
    """

    def __init__(self) -> None:
        self._pending: dict[str, int] = {}
        self._changed = asyncio.Event()  # binds to a loop lazily, on first wait

    def register(self, task_name: str) -> ReadyToken:
        self._pending[task_name] = self._pending.get(task_name, 0) + 1
        return ReadyToken(self, task_name)

    def _complete(self, token: ReadyToken) -> None:
        left = self._pending.get(token.name, 0) - 1
        if left > 0:
            self._pending[token.name] = left
        else:
            self._pending.pop(token.name, None)
        if self._pending:
            log.info("task %r complete, still awaiting %d tasks", token.name, len(self._pending))
        else:
            log.info("task %r complete, marking server ready", token.name)
            self._changed.set()

    @property
    def ready(self) -> bool:
        return not self._pending

    @property
    def pending(self) -> list[str]:
        return sorted(self._pending)

    async def wait(self) -> None:
        """Return once every registered task is done (call it from one event loop only)."""
        while not self.ready:
            self._changed.clear()
            await self._changed.wait()


# ---------------------------------------------------------------------------------------------
# JSON for config dumps


def to_jsonable(obj: Any) -> Any:
    """``json.dumps`` default: model objects (``to_json``), dataclasses, enums, IPs, bytes..."""
    to_json = getattr(obj, "to_json", None)
    if callable(to_json):
        return to_json()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Mapping):
        return {str(k): v for k, v in obj.items()}
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    if isinstance(obj, bytes):
        return base64.b64encode(obj).decode()
    if isinstance(obj, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(obj)
    return str(obj)


async def _maybe_await(value: Any) -> Any:
    if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
        return await value
    return value


# ---------------------------------------------------------------------------------------------
# Servers


class _Server:
    name = "server"

    def __init__(self, read_timeout: float = 10.0):
        self.http = HttpServer(self.handle, name=self.name, read_timeout=read_timeout)

    async def start(
        self, host: str | None = None, port: int | None = None, *, sock: socket.socket | None = None
    ) -> tuple[str, int]:
        """Listen on ``sock``, or host:port (defaults: the upstream address for this port)."""
        dh, dp = self.default_addr
        return await self.http.start(host or dh, dp if port is None else port, sock=sock)

    default_addr: tuple[str, int] = ("127.0.0.1", 0)

    @property
    def address(self) -> tuple[str, int]:
        return self.http.address

    async def close(self) -> None:
        await self.http.close()

    async def handle(self, req: Request) -> Response:
        raise NotImplementedError


def _method_not_allowed(allowed: str) -> Response:
    return Response(405, f"method not allowed; use {allowed}\n", headers={"Allow": allowed})


def _read_only(req: Request) -> Response | None:
    return None if req.method in ("GET", "HEAD") else _method_not_allowed("GET")


ConfigDumpFn = Callable[[], Mapping[str, Any] | Awaitable[Mapping[str, Any]]]
ShutdownFn = Callable[[], Any]
ConnectionsSource = ConnectionTracker | Callable[[], list[dict[str, Any]]]

_ENDPOINTS = (
    ("config_dump", "dump the current Ztunnel configuration"),
    ("connections", "list the connections this ztunnel is proxying now"),
    ("tap", "stream connection open/close events (newline-delimited JSON)"),
    ("logging", "query/changing logging levels"),
    ("quitquitquit", "shut down the server"),
)


class AdminServer(_Server):
    """The admin port. ``config_dump`` returns the dump dict (keys such as ``workloads``,
    ``services``, ``policies``, ``certificates``, ``workloadState``, ``staticConfig``,
    ``config``, ``version``); ``shutdown`` starts a graceful shutdown (it runs after the
    response is sent; it may be a coroutine function)."""

    name = "admin"
    default_addr = ADMIN_ADDR

    def __init__(
        self,
        config_dump: ConfigDumpFn | None = None,
        shutdown: ShutdownFn | None = None,
        connections: ConnectionsSource | None = None,
        *,
        tap: TapHub | None = None,
        read_timeout: float = 10.0,
    ):
        super().__init__(read_timeout)
        self.config_dump = config_dump
        self.shutdown = shutdown
        self.connections = connections
        if tap is None and isinstance(connections, ConnectionTracker):
            tap = TapHub(connections)
        self.tap = tap

    async def handle(self, req: Request) -> Response:
        route = {
            "/": self._index,
            "/config_dump": self._config_dump,
            "/connections": self._connections,
            "/tap": self._tap,
            "/logging": self._logging,
            "/quitquitquit": self._quit,
        }.get(req.path)
        if route is None:
            return text(404, f"not found: {req.path}")
        return await route(req)

    async def _index(self, req: Request) -> Response:
        if (bad := _read_only(req)) is not None:
            return bad
        rows = "\n".join(
            f'<tr><td><a href="{p}">{p}</a></td><td>{html.escape(d)}</td></tr>'
            for p, d in _ENDPOINTS
        )
        page = (
            "<!DOCTYPE html><html><head><title>ztunnel admin</title></head><body>"
            f"<h1>ztunnel admin</h1><table>\n{rows}\n</table></body></html>\n"
        )
        return Response(200, page, "text/html; charset=utf-8")

    async def _config_dump(self, req: Request) -> Response:
        if (bad := _read_only(req)) is not None:
            return bad
        dump = await _maybe_await(self.config_dump()) if self.config_dump is not None else {}
        body = json.dumps(dump, indent=2, default=to_jsonable)
        return Response(200, body, "application/json")

    async def _connections(self, req: Request) -> Response:
        if (bad := _read_only(req)) is not None:
            return bad
        src = self.connections
        if src is None:
            conns: list[dict[str, Any]] = []
        elif isinstance(src, ConnectionTracker):
            conns = src.list()
        else:
            conns = src()
        return Response(200, json.dumps(conns, indent=2, default=to_jsonable), "application/json")

    async def _tap(self, req: Request) -> Response:
        if req.method != "GET":
            return _method_not_allowed("GET")
        if self.tap is None:
            return text(503, "tap is not wired up in this process (no connection tracker)")
        return Response(200, b"", "application/x-ndjson", stream=self.tap.stream())

    async def _logging(self, req: Request) -> Response:
        if req.method not in ("GET", "HEAD", "POST"):
            return _method_not_allowed("GET, POST")
        if req.method == "POST":
            reset = "reset" in req.query
            clauses = [v for v in req.query.get("level", []) if v]
            # ?access=debug is shorthand for ?level=access=debug.
            clauses += [
                f"{k}={vs[-1]}" for k, vs in req.query.items() if k not in ("level", "reset")
            ]
            spec = ",".join(clauses)
            if spec or reset:
                try:
                    accesslog.set_log_level(spec, reset=reset)
                except accesslog.LogLevelError as e:
                    return text(400, f"Invalid level provided: {spec}\n{e}\n{accesslog.HELP}")
        return text(200, f"current log level is {accesslog.get_log_level()}")

    async def _quit(self, req: Request) -> Response:
        if req.method != "POST":
            return _method_not_allowed("POST")
        if self.shutdown is None:
            return text(503, "shutdown is not wired up in this process")
        log.info("shutdown requested through the admin API")
        return Response(200, "shutdown now\n", after=self.shutdown)


class StatsServer(_Server):
    """The Prometheus port: ``/metrics`` and ``/stats/prometheus``."""

    name = "stats"
    default_addr = STATS_ADDR

    def __init__(self, metrics: Metrics, *, read_timeout: float = 10.0):
        super().__init__(read_timeout)
        self.metrics = metrics

    async def handle(self, req: Request) -> Response:
        if req.path not in ("/metrics", "/stats/prometheus"):
            return text(404, f"not found: {req.path}; metrics are at /metrics")
        if (bad := _read_only(req)) is not None:
            return bad
        body, content_type = self.metrics.exposition(req.headers.get("accept"))
        return Response(200, body, content_type)


class ReadinessServer(_Server):
    """The readiness port: ``/healthz/ready``."""

    name = "readiness"
    default_addr = READINESS_ADDR

    def __init__(self, readiness: Readiness, *, read_timeout: float = 10.0):
        super().__init__(read_timeout)
        self.readiness = readiness

    async def handle(self, req: Request) -> Response:
        if req.path != "/healthz/ready":
            return text(404, f"not found: {req.path}; readiness is at /healthz/ready")
        if (bad := _read_only(req)) is not None:
            return bad
        pending = self.readiness.pending
        if not pending:
            return text(200, "ready")
        return text(NOT_READY_STATUS, f"not ready, pending: {', '.join(pending)}")
