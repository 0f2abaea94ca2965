"""Parsers of the load tools' output (pure; table-tested on recorded samples).

- iperf3 ``-J``: received bits/s of the whole test (the receiver's view: what got through).
- wrk: ``Requests/sec:`` and the request/error counts (socket errors and non-2xx/3xx are
  reported so a run that mostly failed is not taken for a fast one).
- h2load: the summary's request counts, and ``--log-file`` lines
  ``<start µs since epoch>\\t<status>\\t<elapsed µs>`` giving per-request latencies.

Invariant: a parser either returns a complete result or raises :class:`ToolOutputError`
naming the tool and quoting what it printed; it never returns a partial figure.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass


class ToolOutputError(ValueError):
    """A load tool's output does not carry the figure asked for (the tool failed)."""


def _quote(text: str, limit: int = 400) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


# ------------------------------------------------------------------------------- iperf3


def parse_iperf3(text: str) -> float:
    """Gbit/s received, from ``iperf3 -J`` output."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ToolOutputError(f"iperf3 printed no JSON: {_quote(text)}") from e
    if not isinstance(doc, dict):
        raise ToolOutputError(f"iperf3 printed unexpected JSON: {_quote(text)}")
    if doc.get("error"):
        raise ToolOutputError(f"iperf3 failed: {doc['error']}")
    try:
        bps = float(doc["end"]["sum_received"]["bits_per_second"])
    except (KeyError, TypeError, ValueError) as e:
        raise ToolOutputError(f"iperf3 JSON has no end.sum_received: {_quote(text)}") from e
    return bps / 1e9


# ---------------------------------------------------------------------------------- wrk


@dataclass(frozen=True)
class WrkResult:
    requests: int
    rps: float
    socket_errors: int  # connect + read + write + timeout
    bad_status: int  # non-2xx/3xx responses


_WRK_RPS = re.compile(r"^Requests/sec:\s+([0-9.]+)\s*$", re.M)
_WRK_REQS = re.compile(r"^\s*(\d+) requests in ", re.M)
_WRK_SOCK = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def parse_wrk(text: str) -> WrkResult:
    rps, reqs = _WRK_RPS.search(text), _WRK_REQS.search(text)
    if rps is None or reqs is None:
        raise ToolOutputError(f"wrk printed no Requests/sec: {_quote(text)}")
    sock = _WRK_SOCK.search(text)
    non2xx = _WRK_NON2XX.search(text)
    return WrkResult(
        requests=int(reqs.group(1)), rps=float(rps.group(1)),
        socket_errors=sum(int(g) for g in sock.groups()) if sock else 0,
        bad_status=int(non2xx.group(1)) if non2xx else 0,
    )


# ------------------------------------------------------------------------------- h2load


@dataclass(frozen=True)
class H2loadSummary:
    total: int
    succeeded: int
    failed: int
    errored: int
    timeout: int
    rps: float


_H2_REQS = re.compile(
    r"^requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout", re.M)
_H2_FINISHED = re.compile(r"^finished in [0-9.]+(?:us|ms|s), ([0-9.]+) req/s", re.M)


def parse_h2load(text: str) -> H2loadSummary:
    reqs, fin = _H2_REQS.search(text), _H2_FINISHED.search(text)
    if reqs is None or fin is None:
        raise ToolOutputError(f"h2load printed no summary: {_quote(text)}")
    total, ok, failed, errored, timeout = (int(g) for g in reqs.groups())
    return H2loadSummary(total, ok, failed, errored, timeout, float(fin.group(1)))


def parse_h2load_log(text: str) -> list[float]:
    """Latencies in milliseconds of the successful (2xx) requests in an h2load log file."""
    out: list[float] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise ToolOutputError(f"h2load log line {n} is not '<start>\\t<status>\\t<us>': "
                                  f"{line!r}")
        try:
            status, elapsed_us = int(parts[1]), int(parts[2])
        except ValueError as e:
            raise ToolOutputError(f"h2load log line {n} has non-numeric fields: {line!r}") from e
        if 200 <= status < 300:
            out.append(elapsed_us / 1000.0)
    return out
