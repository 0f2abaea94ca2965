"""``ambientctl tap``: live connection events merged from one or more ztunnels.

Each ztunnel streams newline-delimited JSON from ``GET :15000/tap`` (``ztunnel.tap``); this
module reads every stream concurrently, tags each event with the node it came from, filters
(``--namespace``, ``--workload``, ``--denied``) and prints one line per event (or the JSON).

Pure parts: ``event_matches`` (the filter) and ``format_event`` (one line). The edge
(``run_tap``) is bounded by ``count`` events and/or ``duration`` seconds; a ztunnel that cannot
be reached is reported and the others keep streaming; a stream that drops events (its
reader was too slow) is reported with the number lost.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from ambient.ops.targets import AdminTarget, TargetError, open_stream

__all__ = ["TapFilter", "event_matches", "format_event", "run_tap", "tap_events"]


@dataclass(frozen=True)
class TapFilter:
    namespace: str | None = None
    workload: str | None = None  # a pod name, or ns/name
    denied: bool = False
    closed_only: bool = False


def _is_denied(ev: Mapping[str, Any]) -> bool:
    pol = ev.get("policy") or {}
    return ev.get("responseFlags") == "DENY" or pol.get("decision") == "deny"


def event_matches(ev: Mapping[str, Any], f: TapFilter) -> bool:
    """Whether a connection event passes the filter (non-connection events never do)."""
    if ev.get("event") not in ("open", "close"):
        return False
    if f.closed_only and ev.get("event") != "close":
        return False
    if f.denied and not (ev.get("event") == "close" and _is_denied(ev)):
        return False
    if f.namespace and f.namespace not in (ev.get("srcNamespace"), ev.get("dstNamespace")):
        return False
    if f.workload:
        names = set()
        for side in ("src", "dst"):
            wl, ns = ev.get(f"{side}Workload"), ev.get(f"{side}Namespace")
            if wl:
                names |= {str(wl), f"{ns}/{wl}"}
        if f.workload not in names:
            return False
    return True


def _who(ev: Mapping[str, Any], side: str) -> str:
    wl, ns = ev.get(f"{side}Workload"), ev.get(f"{side}Namespace")
    addr = ev.get(side) or "?"
    name = f"{ns}/{wl}" if wl and ns else (wl or "")
    return f"{name}[{addr}]" if name else str(addr)


def format_event(ev: Mapping[str, Any]) -> str:
    """One human line for an event; pure."""
    when = str(ev.get("time", ""))[11:19] or "--:--:--"
    node = ev.get("node") or "-"
    kind = str(ev.get("event", "?"))
    line = (f"{when} {node:<10} {kind:<5} {str(ev.get('direction', '')):<8} "
            f"{_who(ev, 'src')} -> {_who(ev, 'dst')}")
    if ev.get("securityPolicy") == "mutual_tls":
        line += f" mtls src={ev.get('srcIdentity') or '?'}"
    else:
        line += " plaintext"
    pol = ev.get("policy")
    if isinstance(pol, Mapping):
        line += f" policy={str(pol.get('decision', '?')).upper()}"
        if pol.get("policy"):
            line += f"({pol['policy']})"
    if kind == "close":
        line += (f" flags={ev.get('responseFlags', '-')} sent={ev.get('bytesSent', 0)}B"
                 f" recv={ev.get('bytesRecv', 0)}B {ev.get('durationMs', 0)}ms")
        if ev.get("error"):
            line += f" error={ev['error']!r}"
    return line


async def _read(target: AdminTarget, out: asyncio.Queue[dict[str, Any]],
                errors: list[tuple[str, str]]) -> None:
    try:
        reader, writer = await open_stream(target, "/tap")
    except TargetError as e:
        errors.append((target.label, str(e)))
        return
    try:
        while True:
            line = await reader.readline()
            if not line:
                errors.append((target.label, "the tap stream ended (ztunnel restarted?)"))
                return
            if not line.strip():
                continue  # heartbeat
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict):
                ev["node"] = target.label
                await out.put(ev)
    finally:
        writer.close()


async def tap_events(targets: list[AdminTarget], f: TapFilter,
                     emit: Callable[[dict[str, Any]], None], *, count: int | None = None,
                     duration: float | None = None, warn: Callable[[str], None] = print,
                     on_subscribed: Callable[[int], None] | None = None) -> int:
    """Stream until ``count`` matching events were emitted, ``duration`` passed, or every
    stream ended. Returns the number of matching events. ``on_subscribed(n)`` is called as
    each stream confirms its subscription (n = how many have so far). Every target that
    failed, or had not confirmed its subscription when the tap ended, is passed to ``warn``."""
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=10000)
    errors: list[tuple[str, str]] = []  # (target label, what went wrong), in order
    tasks = [asyncio.create_task(_read(t, queue, errors)) for t in targets]
    deadline = None if duration is None else time.monotonic() + duration
    shown = 0
    subscribed: set[str] = set()
    reported = 0

    def report() -> None:
        nonlocal reported
        for label, what in errors[reported:]:
            warn(f"tap: {label}: {what}")
        reported = len(errors)

    try:
        while count is None or shown < count:
            report()
            if all(t.done() for t in tasks) and queue.empty():
                break
            timeout = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if timeout <= 0:
                break
            try:
                ev = await asyncio.wait_for(queue.get(), timeout)
            except TimeoutError:
                continue
            if ev.get("event") == "subscribed":
                subscribed.add(str(ev.get("node")))
                if on_subscribed is not None:
                    on_subscribed(len(subscribed))
                continue
            if ev.get("event") == "dropped":
                warn(f"tap: {ev.get('node')}: {ev.get('count')} events dropped (this reader "
                     "was too slow; filter more narrowly)")
                continue
            if event_matches(ev, f):
                emit(ev)
                shown += 1
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    # A target still connecting when the tap ended (count reached) is reported too.
    failed = {label for label, _ in errors}
    errors += [(t.label, "not reachable before the tap ended (no subscription confirmed)")
               for t in targets if t.label not in subscribed and t.label not in failed]
    report()
    return shown


def run_tap(targets: list[AdminTarget], f: TapFilter, output: str = "table", *,
            count: int | None = None, duration: float | None = None,
            out: TextIO = sys.stdout) -> int:
    """The CLI edge: prints events; exit status 1 when no ztunnel could be tapped."""
    def emit(ev: dict[str, Any]) -> None:
        out.write((json.dumps(ev) if output == "json" else format_event(ev)) + "\n")
        out.flush()

    def warn(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    started: list[int] = []

    def on_subscribed(n: int) -> None:
        started.append(n)
        if n == len(targets):
            warn(f"tap: streaming from {', '.join(t.label for t in targets)} (Ctrl-C to stop)")

    try:
        asyncio.run(tap_events(targets, f, emit, count=count, duration=duration, warn=warn,
                               on_subscribed=on_subscribed))
    except KeyboardInterrupt:
        return 0
    return 0 if started else 1
