"""Live connection events for ``GET /tap`` on the admin port (``ambientctl tap``).

Role: turn every connection open and close seen by the ``ConnectionTracker`` into a JSON event
and fan it out to the current subscribers, each of which streams newline-delimited JSON to
one HTTP client.

Invariants:
- The data path never waits for a tap reader: publishing is a ``put_nowait`` into each
  subscriber's bounded queue; when a queue is full the event is dropped for that subscriber
  and counted (``Subscriber.dropped``, ``TapHub.dropped_total``). The stream reports the drops
  to its reader as ``{"event": "dropped", "count": n}`` once it catches up.
- With no subscriber, publishing costs one truthiness check: events are only built when
  someone listens.
- A subscriber is removed when its stream ends (client gone, server closing), also on error.

Event fields (camelCase, stable): ``event`` (open|close), ``time`` (RFC 3339 UTC), ``id``,
``reporter``, ``direction``, ``src``/``dst`` (addresses), ``hboneTarget``, ``srcWorkload``,
``srcNamespace``, ``srcIdentity``, ``dstWorkload``, ``dstNamespace``, ``dstService``,
``dstIdentity``, ``securityPolicy``, ``policy`` (``{decision, policy, reason}`` when L4
authorization ran, else null), and on close ``bytesSent``, ``bytesRecv``, ``durationMs``,
``responseFlags``, ``error``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from ztunnel.result import ConnectionResult, ConnectionTracker

__all__ = ["DEFAULT_QUEUE", "HEARTBEAT_S", "Subscriber", "TapHub", "event_for"]

DEFAULT_QUEUE = 1024  # events buffered per subscriber before dropping
HEARTBEAT_S = 15.0  # an empty line this often lets the stream notice a vanished client


def _ns(workload: Any) -> str | None:
    ns = getattr(workload, "namespace", None)
    return str(ns) if ns else None


def event_for(kind: str, result: ConnectionResult) -> dict[str, Any]:
    """The tap event for ``result`` (``kind`` is ``open`` or ``close``); pure."""
    snap = result.snapshot()
    ev: dict[str, Any] = {
        "event": kind,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "id": snap["id"],
        "reporter": snap["reporter"],
        "direction": snap["direction"],
        "src": snap["src"],
        "dst": snap["dst"],
        "hboneTarget": snap["hboneTarget"],
        "srcWorkload": snap["srcWorkload"],
        "srcNamespace": _ns(result.src_workload),
        "srcIdentity": snap["srcIdentity"],
        "dstWorkload": snap["dstWorkload"],
        "dstNamespace": _ns(result.dst_workload),
        "dstService": snap["dstService"],
        "dstIdentity": snap["dstIdentity"],
        "securityPolicy": snap["securityPolicy"],
        "policy": None,
    }
    if result.authz_reason is not None:
        ev["policy"] = {
            "decision": "allow" if result.authz_allowed else "deny",
            "policy": result.authz_policy,
            "reason": result.authz_reason,
        }
    if kind == "close":
        ev.update(
            bytesSent=result.bytes_sent,
            bytesRecv=result.bytes_recv,
            durationMs=result.duration_ms,
            responseFlags=result.response_flags,
            error=result.error,
        )
    return ev


class Subscriber:
    """One tap reader: a bounded queue of events and a count of what it missed."""

    def __init__(self, maxsize: int = DEFAULT_QUEUE) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=maxsize)
        self.dropped = 0
        self.reported = 0  # drops already announced to the reader

    def offer(self, event: dict[str, Any]) -> bool:
        try:
            self.queue.put_nowait(event)
            return True
        except asyncio.QueueFull:
            self.dropped += 1
            return False


class TapHub:
    """Fan-out of connection events; attach it to a tracker with ``TapHub(tracker)``."""

    def __init__(self, tracker: ConnectionTracker | None = None, *,
                 queue_size: int = DEFAULT_QUEUE, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.subscribers: set[Subscriber] = set()
        self.queue_size = queue_size
        self.heartbeat_s = heartbeat_s
        self.dropped_total = 0
        self.published = 0
        if tracker is not None:
            tracker.observers.append(self.publish)

    def publish(self, kind: str, result: ConnectionResult) -> None:
        """Called by the tracker on every open/close; never blocks."""
        if not self.subscribers:
            return
        ev = event_for(kind, result)
        self.published += 1
        for sub in self.subscribers:
            if not sub.offer(ev):
                self.dropped_total += 1

    def subscribe(self) -> Subscriber:
        sub = Subscriber(self.queue_size)
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    async def stream(self) -> AsyncIterator[bytes]:
        """NDJSON lines for a new subscriber, until the consumer stops iterating.

        The subscription starts when iteration does (a stream never started holds nothing);
        the first line, ``{"event": "subscribed"}``, tells the reader that every later
        connection event will reach it.
        """
        sub = self.subscribe()
        try:
            yield b'{"event": "subscribed"}\n'
            while True:
                try:
                    ev = await asyncio.wait_for(sub.queue.get(), self.heartbeat_s)
                except TimeoutError:
                    yield b"\n"
                    continue
                if sub.dropped > sub.reported:
                    missed, sub.reported = sub.dropped - sub.reported, sub.dropped
                    yield json.dumps({"event": "dropped", "count": missed}).encode() + b"\n"
                yield json.dumps(ev).encode() + b"\n"
        finally:
            self.unsubscribe(sub)
