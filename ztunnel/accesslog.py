"""Process logging in ztunnel's format, RUST_LOG-style level filters, and the access log.

Role: ``configure_logging`` installs one handler on the root logger that writes lines the way
ztunnel does (``src/telemetry.rs``), plain or JSON (``LOG_FORMAT=json``), and a level filter
parsed from a ``RUST_LOG``-like directive string (``"info"``, ``"access=debug,info"``,
``"ztunnel.proxy=trace,warn"``). The admin ``/logging`` endpoint reads and changes it at run
time through ``get_log_level`` / ``set_log_level``.

Line formats (one line per record):
- plain: ``<RFC3339 µs UTC>\\t<level>\\t<target>\\t<message>\\t<k=v k=v ...>``; string values
  are quoted and escaped, numbers and addresses are bare.
- json: ``{"level": .., "time": .., "scope": <target>, "message": .., <fields in order>}``.

Structured fields travel on the log record as ``record.fields``: an ordered list of
``(key, value)``; a value wrapped in ``Bare`` prints unquoted (upstream's ``%display`` fields).
Targets are Python logger names; ``::`` in a directive is accepted and read as ``.``.

The access log (logger ``access``) gets one ``connection complete`` line per proxied connection,
written by ``ztunnel.result.ConnectionResult.close``; the field list is built here by
``access_fields`` so the text and JSON forms carry the same keys.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import IO, Any

__all__ = [
    "ACCESS",
    "TRACE",
    "Bare",
    "IstioFormatter",
    "LogLevelError",
    "access_logger",
    "configure_logging",
    "format_addr",
    "get_log_level",
    "access_fields",
    "emit",
    "parse_directives",
    "reset_logging",
    "set_log_level",
]

ACCESS = "access"
TRACE = 5
logging.addLevelName(TRACE, "TRACE")

_OFF = logging.CRITICAL + 10
_LEVELS = {
    "off": _OFF,
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": TRACE,
}
_LEVEL_NAMES = {v: k for k, v in _LEVELS.items()}
_TARGET_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:\-]*")
HELP = (
    "usage: GET /logging (list the current level); "
    "POST /logging?level=<level> (set the default level); "
    "POST /logging?level=<target>=<level>,<level> or POST /logging?<target>=<level> "
    "(set one target's level); POST /logging?reset (back to the startup levels). "
    "level: error|warn|info|debug|trace|off; target: a logger name such as access or "
    "ztunnel.proxy"
)


class LogLevelError(ValueError):
    """A log level directive that cannot be parsed; the message says which part and why."""


class Bare(str):
    """A field value written without quotes in the plain format (addresses, durations...)."""

    __slots__ = ()


def access_logger() -> logging.Logger:
    return logging.getLogger(ACCESS)


def format_addr(addr: tuple[str, int] | Sequence[Any] | str | None) -> str:
    """``ip:port``, with ``[v6]:port`` brackets, as Rust's ``SocketAddr`` displays."""
    if addr is None:
        return ""
    if isinstance(addr, str):
        return addr
    host, port = str(addr[0]), addr[1]
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


# ---------------------------------------------------------------------------------------------
# Level directives


def _parse_level(word: str, clause: str) -> int:
    level = _LEVELS.get(word.strip().lower())
    if level is None:
        raise LogLevelError(
            f"level {word!r} in {clause!r} is invalid; use one of "
            "error, warn, info, debug, trace, off"
        )
    return level


def parse_directives(spec: str) -> tuple[int | None, dict[str, int]]:
    """Parse ``"access=debug,info"`` into (default level or None, {target: level}).

    Later clauses win. A bare target without ``=level`` is refused (unlike tracing, which
    would read it as ``trace``): it is almost always a typo for a level.
    """
    default: int | None = None
    targets: dict[str, int] = {}
    for raw in spec.split(","):
        clause = raw.strip()
        if not clause:
            continue
        if "=" in clause:
            target, _, word = clause.partition("=")
            target = target.strip()
            if not _TARGET_RE.fullmatch(target):
                raise LogLevelError(f"target {target!r} in {clause!r} is not a logger name")
            targets[target.replace("::", ".")] = _parse_level(word, clause)
        else:
            default = _parse_level(clause, clause)
    return default, targets


class _LevelState:
    """The process's current filter: a default level and per-target levels."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.startup = "info"
        self.default = logging.INFO
        self.targets: dict[str, int] = {}

    def apply(self, default: int, targets: dict[str, int]) -> None:
        for name in set(self.targets) - set(targets):
            logging.getLogger(name).setLevel(logging.NOTSET)
        logging.getLogger().setLevel(default)
        for name, level in targets.items():
            logging.getLogger(name).setLevel(level)
        self.default, self.targets = default, dict(targets)

    def describe(self) -> str:
        parts = [f"{t}={_LEVEL_NAMES[lv]}" for t, lv in sorted(self.targets.items())]
        parts.append(_LEVEL_NAMES[self.default])
        return ",".join(parts)


_STATE = _LevelState()


def get_log_level() -> str:
    """The current filter as a directive string, targets first: ``"access=debug,info"``."""
    with _STATE.lock:
        return _STATE.describe()


def set_log_level(spec: str, *, reset: bool = False) -> str:
    """Apply ``spec`` on top of the current filter (or on the startup one with ``reset``).

    Raises ``LogLevelError`` without changing anything when any clause is bad. Returns the new
    filter string.
    """
    default, targets = parse_directives(spec)
    with _STATE.lock:
        if reset:
            base_default, base_targets = parse_directives(_STATE.startup)
            base_default = base_default if base_default is not None else logging.INFO
        else:
            base_default, base_targets = _STATE.default, dict(_STATE.targets)
        base_targets.update(targets)
        _STATE.apply(default if default is not None else base_default, base_targets)
        new = _STATE.describe()
    logging.getLogger("ztunnel.logging").info("new log filter is %s", new)
    return new


# ---------------------------------------------------------------------------------------------
# Formatting


# The last whole second formatted and its text; one tuple, replaced whole, so a thread never
# sees one second's number with another's text.
_second: tuple[int, str] = (-1, "")


def _timestamp(created: float) -> str:
    """RFC 3339 UTC with microseconds, as ``datetime`` formats ``created``; the part up to
    the second is formatted once per second (this runs for every access-log line)."""
    global _second
    sec = int(created)
    micros = round((created - sec) * 1e6)
    if micros >= 1_000_000 or sec < 0:
        return datetime.fromtimestamp(created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    cached = _second
    if cached[0] != sec:
        cached = _second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{cached[1]}.{micros:06d}Z"


def _level_name(levelno: int) -> str:
    if levelno >= logging.ERROR:
        return "error"
    if levelno >= logging.WARNING:
        return "warn"
    if levelno >= logging.INFO:
        return "info"
    if levelno >= logging.DEBUG:
        return "debug"
    return "trace"


def _plain_value(value: Any) -> str:
    if isinstance(value, Bare) or isinstance(value, bool | int | float):
        return str(value).lower() if isinstance(value, bool) else str(value)
    text = str(value)
    # Rust's Debug for str: double quotes, backslash escapes; json.dumps is the same shape,
    # and for printable text without quotes or backslashes it only adds the quotes.
    if text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    return json.dumps(text, ensure_ascii=False)


def _json_value(value: Any) -> Any:
    if isinstance(value, Bare):
        return str(value)
    if isinstance(value, bool | int | float) or value is None:
        return value
    return str(value)


class IstioFormatter(logging.Formatter):
    """Formats any record in ztunnel's plain or JSON layout (see the module docstring)."""

    def __init__(self, fmt: str = "plain"):
        super().__init__()
        if fmt not in ("plain", "json"):
            raise ValueError(f"log format must be 'plain' or 'json', not {fmt!r}")
        self.json = fmt == "json"

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        fields: list[tuple[str, Any]] = list(getattr(record, "fields", None) or ())
        if record.exc_text:
            fields.append(("exception", record.exc_text))
        ts, level = _timestamp(record.created), _level_name(record.levelno)
        if self.json:
            obj: dict[str, Any] = {
                "level": level,
                "time": ts,
                "scope": record.name,
                "message": message,
            }
            for key, value in fields:
                obj[key] = _json_value(value)
            return json.dumps(obj, ensure_ascii=False)
        kv = " ".join(f"{key}={_plain_value(value)}" for key, value in fields)
        line = f"{ts}\t{level}\t{record.name}\t{message}"
        return f"{line}\t{kv}" if kv else line


_HANDLER_MARK = "_ambient_istio_handler"


def configure_logging(
    level: str | None = None, fmt: str | None = None, stream: IO[str] | None = None
) -> logging.Handler:
    """Set up process-wide logging once (calling again replaces our handler).

    ``level`` defaults to ``$RUST_LOG`` or ``info``; ``fmt`` to ``$LOG_FORMAT`` or ``plain``;
    ``stream`` to stdout. A bad ``level`` raises ``LogLevelError`` before anything changes.
    """
    spec = level if level is not None else os.environ.get("RUST_LOG", "info")
    fmt = fmt if fmt is not None else os.environ.get("LOG_FORMAT", "plain")
    if fmt not in ("plain", "json"):
        raise ValueError(f"LOG_FORMAT must be 'plain' or 'json', not {fmt!r}")
    default, targets = parse_directives(spec)
    handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(IstioFormatter(fmt))
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False):
            root.removeHandler(old)
    root.addHandler(handler)
    _record_extras(False)
    with _STATE.lock:
        _STATE.startup = spec
        _STATE.apply(default if default is not None else logging.INFO, targets)
    return handler


def _record_extras(on: bool) -> None:
    """Whether log records collect their caller, thread and process (Python's logging HOWTO,
    "Optimization"). Our formatter prints none of them, and with one access-log record per
    proxied connection the stack walk and the ``getpid``/thread lookups are ~10% of closing
    a connection's result."""
    srcfile = os.path.normcase(logging.addLevelName.__code__.co_filename)  # as logging sets it
    logging._srcfile = srcfile if on else None  # type: ignore[attr-defined]
    logging.logThreads = on
    logging.logProcesses = on
    logging.logMultiprocessing = on


# ---------------------------------------------------------------------------------------------
# Access log helpers


def emit(logger: logging.Logger, level: int, message: str, fields: Sequence[tuple[str, Any]]):
    """Write one structured record if ``logger`` is enabled for ``level``."""
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={"fields": list(fields)})


def access_fields(
    *,
    src: tuple[str, int],
    dst: tuple[str, int],
    direction: str,
    src_workload: str | None = None,
    src_namespace: str | None = None,
    src_identity: str | None = None,
    src_cluster: str | None = None,
    hbone_addr: str | None = None,
    dst_service: str | None = None,
    dst_workload: str | None = None,
    dst_namespace: str | None = None,
    dst_identity: str | None = None,
    dst_cluster: str | None = None,
    bytes_sent: int | None = None,
    bytes_recv: int | None = None,
    duration_ms: int | None = None,
    error: str | None = None,
) -> list[tuple[str, Any]]:
    """The access-log fields in upstream's order; ``None`` values are left out, as upstream
    leaves out empty ``Option`` fields."""
    fields: list[tuple[str, Any]] = [
        ("src.addr", Bare(format_addr(src))),
        ("src.workload", src_workload),
        ("src.namespace", src_namespace),
        ("src.identity", src_identity),
        ("src.cluster", src_cluster),
        ("dst.addr", Bare(format_addr(dst))),
        ("dst.hbone_addr", Bare(hbone_addr) if hbone_addr else None),
        ("dst.service", dst_service),
        ("dst.workload", dst_workload),
        ("dst.namespace", dst_namespace),
        ("dst.identity", dst_identity),
        ("dst.cluster", dst_cluster),
        ("direction", direction),
        ("bytes_sent", bytes_sent),
        ("bytes_recv", bytes_recv),
        ("duration", f"{duration_ms}ms" if duration_ms is not None else None),
        ("error", error),
    ]
    return [(k, v) for k, v in fields if v is not None and v != ""]


def reset_logging() -> None:
    """Undo ``configure_logging``: remove our handler and per-target levels (for tests)."""
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False):
            root.removeHandler(old)
    _record_extras(True)
    with _STATE.lock:
        _STATE.startup = "info"
        _STATE.apply(logging.WARNING, {})  # Python's own default
