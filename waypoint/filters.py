"""The waypoint's extension hook: operator-supplied request filters, loaded by configuration.

Role: lets an operator add a header rewrite or a custom check without forking.  A filter is
any object with a ``name`` and ``on_request(req, headers) -> FilterResult`` (and optionally
``on_response(req, status, headers)``); it is named in ``WAYPOINT_FILTERS`` as
``package.module:Class`` (comma-separated, run in that order) and built with no arguments::

    class TagTeam:
        name = "tag-team"

        def on_request(self, req: Request, headers: MutableHeaders) -> FilterResult:
            if req.header("x-team") is None:
                return FilterResult.respond(400, b"x-team header required\\n")
            headers.set("x-team-seen", "1")
            return FilterResult.CONTINUE

``waypoint/examples/add_header.py`` is a complete example.

Safety (invariants): filters run after authorization, so they can only narrow what policy
allows; a filter that raises, or returns something that is not a ``FilterResult``, fails
*that request* (500, logged with the filter's name) and never the proxy; loading fails
early, at start-up, with an error naming the entry and what to fix.  Filters run on the
event loop: they must not block (no network or disk I/O).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable, Iterator, MutableSequence
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

from waypoint.l7request import Request

__all__ = [
    "FilterLoadError",
    "FilterResult",
    "MutableHeaders",
    "RequestFilter",
    "load_filters",
    "parse_filter_list",
    "run_request_filters",
    "run_response_filters",
]

log = logging.getLogger("waypoint.filters")

FILTER_ERROR_BODY = b"request filter failed\n"


class MutableHeaders:
    """A view over a list of ``(name, value)`` pairs that filters edit in place.

    Names are compared case-insensitively and stored lowercase; the underlying list (the
    proxy's own) sees every change."""

    def __init__(self, items: MutableSequence[tuple[str, str]] | None = None) -> None:
        self.items: MutableSequence[tuple[str, str]] = items if items is not None else []

    def get(self, name: str) -> str | None:
        name = name.lower()
        return next((v for n, v in self.items if n.lower() == name), None)

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self.items if n.lower() == name]

    def remove(self, name: str) -> None:
        name = name.lower()
        self.items[:] = [(n, v) for n, v in self.items if n.lower() != name]

    def set(self, name: str, value: str) -> None:
        self.remove(name)
        self.add(name, value)

    def add(self, name: str, value: str) -> None:
        if any(c in name + value for c in "\r\n\0") or not name or name.startswith(":"):
            raise ValueError(f"header {name!r} is not a valid header name/value for a filter")
        self.items.append((name.lower(), value))

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(list(self.items))

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class FilterResult:
    """``CONTINUE`` to go on, or ``respond(status, body, headers)`` to answer right away."""

    respond_status: int | None = None
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    filter_name: str = ""  # who answered (set by run_request_filters)

    CONTINUE: ClassVar[FilterResult]

    @property
    def is_continue(self) -> bool:
        return self.respond_status is None

    @classmethod
    def respond(cls, status: int, body: bytes = b"",
                headers: Iterable[tuple[str, str]] = ()) -> FilterResult:
        if not 200 <= status <= 599:
            raise ValueError(f"a filter can only answer with status 200..599, not {status}")
        return cls(respond_status=status, body=body, headers=tuple(headers))


FilterResult.CONTINUE = FilterResult()


@runtime_checkable
class RequestFilter(Protocol):
    """What a filter provides; ``on_response`` is optional (see the module docstring)."""

    name: str

    def on_request(self, req: Request, headers: MutableHeaders) -> FilterResult: ...


class FilterLoadError(ValueError):
    """A ``WAYPOINT_FILTERS`` entry could not be loaded; the message says which and why."""


def parse_filter_list(value: str) -> list[str]:
    """``"a.b:C, d:E"`` -> ``["a.b:C", "d:E"]`` (the ``WAYPOINT_FILTERS`` format)."""
    return [s.strip() for s in value.split(",") if s.strip()]


def _load_one(entry: str) -> RequestFilter:
    module_name, sep, attr = entry.partition(":")
    if not sep or not module_name or not attr:
        raise FilterLoadError(
            f"WAYPOINT_FILTERS entry {entry!r} is not of the form package.module:Class"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise FilterLoadError(
            f"WAYPOINT_FILTERS entry {entry!r}: cannot import module {module_name!r} "
            f"({type(e).__name__}: {e}); is it installed and on PYTHONPATH?"
        ) from e
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise FilterLoadError(
                f"WAYPOINT_FILTERS entry {entry!r}: module {module_name!r} has no {attr!r}"
            )
        target = getattr(target, part)
    try:
        obj = target() if isinstance(target, type) else target
    except Exception as e:
        raise FilterLoadError(
            f"WAYPOINT_FILTERS entry {entry!r}: constructing {attr} failed "
            f"({type(e).__name__}: {e}); a filter class must take no arguments"
        ) from e
    if not callable(getattr(obj, "on_request", None)):
        raise FilterLoadError(
            f"WAYPOINT_FILTERS entry {entry!r}: {attr} has no on_request(req, headers) method"
        )
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name:
        raise FilterLoadError(
            f"WAYPOINT_FILTERS entry {entry!r}: {attr} needs a non-empty string attribute 'name'"
        )
    return obj  # type: ignore[no-any-return]


def load_filters(spec: list[str]) -> list[RequestFilter]:
    """Load every ``module:Class`` entry in order; ``FilterLoadError`` on the first bad one."""
    filters = [_load_one(entry) for entry in spec]
    names = [f.name for f in filters]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise FilterLoadError(f"WAYPOINT_FILTERS: two filters are named {dup!r}; names must "
                              "be unique (they appear in logs)")
    return filters


def run_request_filters(filters: Iterable[RequestFilter], req: Request,
                        headers: MutableHeaders) -> FilterResult:
    """Run the filters in order until one answers; a failing filter answers 500 itself."""
    for f in filters:
        name = getattr(f, "name", type(f).__name__)
        try:
            result = f.on_request(req, headers)
        except Exception:
            log.exception("request filter %s failed on %s %s; answering 500", name,
                          req.method, req.path)
            return FilterResult(respond_status=500, body=FILTER_ERROR_BODY, filter_name=name)
        if not isinstance(result, FilterResult):
            log.error("request filter %s returned %r, not a FilterResult; answering 500",
                      name, type(result).__name__)
            return FilterResult(respond_status=500, body=FILTER_ERROR_BODY, filter_name=name)
        if not result.is_continue:
            return FilterResult(result.respond_status, result.body, result.headers, name)
    return FilterResult.CONTINUE


def run_response_filters(filters: Iterable[RequestFilter], req: Request, status: int,
                         headers: MutableHeaders) -> list[str]:
    """Run each filter's optional ``on_response`` (in reverse order, like unwinding); returns
    the names of filters that raised (logged; the response still goes out)."""
    failed = []
    for f in reversed(list(filters)):
        hook = getattr(f, "on_response", None)
        if hook is None:
            continue
        try:
            hook(req, status, headers)
        except Exception:
            name = getattr(f, "name", type(f).__name__)
            log.exception("response filter %s failed on %s %s", name, req.method, req.path)
            failed.append(name)
    return failed
