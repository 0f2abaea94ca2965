"""CPU time and memory of proxy processes, from /proc (their whole process trees).

A proxy may fork workers (one per core behind SO_REUSEPORT, say), so every figure covers the
process and its descendants at the time of reading (``/proc/<pid>/task/*/children``).
Readers never raise for a process that is gone: it contributes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

CLK_TCK = os.sysconf("SC_CLK_TCK")


def parse_stat_cpu_ticks(stat: str) -> int:
    """utime + stime (clock ticks) from the text of ``/proc/<pid>/stat``.  ``comm`` may hold
    spaces and parentheses, so fields are counted after the last ``)``."""
    fields = stat.rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(fields[11]) + int(fields[12])


def parse_status_kb(status: str, key: str) -> int | None:
    """A ``kB`` value such as VmRSS or VmHWM from the text of ``/proc/<pid>/status``."""
    for line in status.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def process_tree(pids: Iterable[int]) -> list[int]:
    """``pids`` and all their living descendants (each once)."""
    seen: list[int] = []
    todo = list(pids)
    while todo and len(seen) < 10_000:
        pid = todo.pop()
        if pid in seen or _read(f"/proc/{pid}/stat") is None:
            continue
        seen.append(pid)
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except (FileNotFoundError, ProcessLookupError):
            continue
        for tid in tids:
            kids = _read(f"/proc/{pid}/task/{tid}/children") or ""
            todo.extend(int(k) for k in kids.split())
    return seen


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds consumed so far by ``pids`` and their descendants."""
    ticks = 0
    for pid in process_tree(pids):
        stat = _read(f"/proc/{pid}/stat")
        if stat is not None:
            ticks += parse_stat_cpu_ticks(stat)
    return ticks / CLK_TCK


def memory_mb(pid: int, key: str = "VmHWM") -> float | None:
    """``key`` (VmHWM: peak RSS; VmRSS: current) in MB, summed over ``pid``'s process tree;
    None if the process is gone."""
    total, found = 0, False
    for p in process_tree([pid]):
        status = _read(f"/proc/{p}/status")
        kb = parse_status_kb(status, key) if status is not None else None
        if kb is not None:
            total, found = total + kb, True
    return total / 1024.0 if found else None
