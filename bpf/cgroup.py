"""Cgroup program attachments through the raw ``bpf(2)`` syscall: attach, detach, query.

Role: bcc 0.26 can attach and detach the programs it loaded, but cannot list what is attached
to a cgroup or detach a program it did not load.  A crashed agent leaves its programs attached
(cgroup attachments outlive the loader), so the next agent must find them by name and detach
them: that needs ``BPF_PROG_QUERY``, ``BPF_PROG_GET_FD_BY_ID`` and ``BPF_OBJ_GET_INFO_BY_FD``.

Invariants:
- We attach with ``BPF_F_ALLOW_MULTI`` so other programs on the same cgroup (another mesh, a
  CNI) keep running, and our own old and new programs can overlap during a takeover.
- A program is "ours" when its name is one of the names the caller passes (``amb_*``).
- Every fd opened here is closed here.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from ambient.bpfmap import (
    BPF_PROG_DETACH,
    BPF_PROG_GET_FD_BY_ID,
    attr,
    bpf,
    prog_query,
)
from ambient.bpfmap import prog_info as bpfmap_prog_info

BPF_PROG_ATTACH = 8
BPF_F_ALLOW_MULTI = 2
_MAX_QUERY = 256


@dataclass(frozen=True)
class Attached:
    attach_type: int
    prog_id: int
    name: str


def open_cgroup(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"cgroup directory {path} does not exist; create "
                                "it under the cgroup2 mount or fix the configured path") from None


def attach(cgroup_fd: int, prog_fd: int, attach_type: int) -> None:
    bpf(BPF_PROG_ATTACH, attr((0, "=I", cgroup_fd), (4, "=I", prog_fd),
                              (8, "=I", attach_type), (12, "=I", BPF_F_ALLOW_MULTI)))


def detach(cgroup_fd: int, prog_fd: int, attach_type: int) -> None:
    bpf(BPF_PROG_DETACH, attr((0, "=I", cgroup_fd), (4, "=I", prog_fd),
                              (8, "=I", attach_type)))


def query(cgroup_fd: int, attach_type: int) -> list[int]:
    """IDs of the programs attached directly to this cgroup for ``attach_type``."""
    return prog_query(cgroup_fd, attach_type, _MAX_QUERY)


def prog_fd_by_id(prog_id: int) -> int:
    return bpf(BPF_PROG_GET_FD_BY_ID, attr((0, "=I", prog_id)))


def prog_info(prog_fd: int) -> tuple[int, str]:
    """(id, name) of a loaded program."""
    info = bpfmap_prog_info(prog_fd)
    return info.prog_id, info.name


def attached(cgroup_fd: int, attach_types: list[int], names: frozenset[str]) -> list[Attached]:
    """Our programs (by name) attached to the cgroup for any of ``attach_types``."""
    out = []
    for at in attach_types:
        for pid in query(cgroup_fd, at):
            try:
                fd = prog_fd_by_id(pid)
            except OSError as e:
                if e.errno == errno.ENOENT:  # detached and freed meanwhile
                    continue
                raise
            try:
                _, name = prog_info(fd)
            finally:
                os.close(fd)
            if name in names:
                out.append(Attached(at, pid, name))
    return out


def detach_id(cgroup_fd: int, prog_id: int, attach_type: int) -> bool:
    """Detach the program with ``prog_id``; False when it was no longer attached."""
    try:
        fd = prog_fd_by_id(prog_id)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    try:
        detach(cgroup_fd, fd, attach_type)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    finally:
        os.close(fd)
    return True


def prog_id_of(prog_fd: int) -> int:
    return prog_info(prog_fd)[0]
