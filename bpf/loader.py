"""Compile and load the capture programs (bcc), and the node-level plumbing around them.

Role: one ``Programs`` per agent process: it compiles ``bpf/capture.c`` against the uapi-only
kernel-source stand-in (``bpf/kernel_src.py``), loads every program with its type and expected
attach type, and creates or re-opens the pinned maps.  Helpers here also mount bpffs when it is
missing and read a netns's cookie.

Invariants:
- Maps are pinned under ``pin_dir`` (``BPF_TABLE_PINNED``): a restarted agent re-opens the same
  maps, so enrolled pods stay enrolled and ztunnel's lookups keep working across the restart.
- Programs are not pinned: they live while this process holds them or while they are attached
  (cgroup attachments and tc filters keep them alive after a crash; see ``bpf/cgroup.py``).
- ``pin_dir`` must be a plain absolute path on a bpffs mount (it is substituted into C).
- bcc is imported lazily, so importing this module works without bcc (``unavailable_reason``
  can then say what is missing).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import socket
from dataclasses import dataclass
from typing import Any

from ambient.bpfmap import map_info, netns_cookie, obj_get
from ambient.netns import socket_in_netns
from bpf import kernel_src

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "capture.c")
BPFFS = "/sys/fs/bpf"

# attach types (enum bpf_attach_type)
CGROUP_SOCK_OPS = 3
CGROUP_INET4_CONNECT = 10
CGROUP_INET4_GETPEERNAME = 29
# program types (enum bpf_prog_type)
PROG_SCHED_CLS = 3
PROG_SOCK_OPS = 13
PROG_CGROUP_SOCK_ADDR = 18

PROG_CONNECT4 = "amb_connect4"
PROG_GETPEER4 = "amb_getpeer4"
PROG_SOCKOPS = "amb_sockops"
PROG_TC_IN = "amb_tc_in"
PROG_TC_LO = "amb_tc_lo"
# virtual interfaces (ingress): devices with an Ethernet header / L3 devices (tun)
PROG_TC_VIRT_L2 = "amb_tc_vin"
PROG_TC_VIRT_L3 = "amb_tc_vin3"


@dataclass(frozen=True)
class CgroupProg:
    name: str
    prog_type: int
    attach_type: int


CGROUP_PROGS = (
    CgroupProg(PROG_CONNECT4, PROG_CGROUP_SOCK_ADDR, CGROUP_INET4_CONNECT),
    CgroupProg(PROG_GETPEER4, PROG_CGROUP_SOCK_ADDR, CGROUP_INET4_GETPEERNAME),
    CgroupProg(PROG_SOCKOPS, PROG_SOCK_OPS, CGROUP_SOCK_OPS),
)
CGROUP_ATTACH_TYPES = [p.attach_type for p in CGROUP_PROGS]
TC_PROGS = (PROG_TC_IN, PROG_TC_LO, PROG_TC_VIRT_L2, PROG_TC_VIRT_L3)
OUR_NAMES = frozenset([p.name for p in CGROUP_PROGS] + list(TC_PROGS))
# name -> (map type, key size, value size): must match bpf/capture.c and ambient/bpfmap.py
MAP_LAYOUT = {
    "amb_enrolled": (1, 8, 16),  # BPF_MAP_TYPE_HASH
    "amb_pending": (9, 8, 8),  # BPF_MAP_TYPE_LRU_HASH
    "amb_origdst": (9, 16, 8),
}
MAPS = tuple(MAP_LAYOUT)
_PIN_DIR_RE = re.compile(r"^/[A-Za-z0-9_./-]+$")


def bcc_missing() -> str | None:
    if importlib.util.find_spec("bcc") is None:
        return ("the bcc Python bindings are not importable: install Debian's python3-bpfcc "
                "and use a Python that sees it (see notes/platform.md, 'Which Python sees bcc')")
    return None


def check_pin_dir(pin_dir: str) -> None:
    if not _PIN_DIR_RE.match(pin_dir) or ".." in pin_dir:
        raise ValueError(f"pin dir {pin_dir!r} must be a plain absolute path "
                         "(letters, digits, '_', '-', '.', '/')")


def fs_type_at(path: str, mountinfo: str) -> str | None:
    """Filesystem type of the mount holding ``path`` (longest mount-point prefix).  Pure."""
    best, fstype = "", None
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mnt = fields[4]
        inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best):
            best, fstype = mnt, right.split(" ", 1)[0]
    return fstype


def _mountinfo() -> str:
    with open("/proc/self/mountinfo") as f:
        return f.read()


def bpffs_mounted(path: str = BPFFS) -> bool:
    """True when ``path`` is (inside) a bpf filesystem mount."""
    return fs_type_at(path, _mountinfo()) == "bpf"


def on_cgroup2(path: str) -> bool:
    """True when ``path`` is a directory of a cgroup v2 hierarchy."""
    return os.path.isdir(path) and fs_type_at(os.path.realpath(path), _mountinfo()) == "cgroup2"


def ensure_bpffs(pin_dir: str) -> None:
    """Mount bpffs at /sys/fs/bpf if needed and create ``pin_dir``."""
    if not bpffs_mounted(pin_dir):
        if not pin_dir.startswith(BPFFS + "/"):
            raise RuntimeError(f"{pin_dir} is not on a bpf filesystem; put it under {BPFFS}")
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"bpf", BPFFS.encode(), b"bpf", 0, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount -t bpf bpf {BPFFS} failed: {os.strerror(err)}; mount "
                          "bpffs on the node (or in the agent's container) and retry")
    os.makedirs(pin_dir, mode=0o700, exist_ok=True)


def netns_cookie_of(netns: str | int) -> int:
    """The netns cookie of ``netns`` (path, name or fd), as programs see it."""
    s = socket_in_netns(netns, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        return netns_cookie(s)
    finally:
        s.close()


def map_layout(fd: int) -> tuple[int, int, int]:
    """(type, key size, value size) of the map behind ``fd``."""
    mtype, _, key, value, _ = map_info(fd)
    return mtype, key, value


def drop_incompatible_pins(pin_dir: str) -> list[str]:
    """Unpin maps whose layout is not the one ``capture.c`` declares (an older agent's).

    bcc would otherwise fail to re-open them.  Their entries are lost; the agent re-applies
    every pod on start.  Returns the names dropped.
    """
    dropped = []
    for name, want in MAP_LAYOUT.items():
        path = os.path.join(pin_dir, name)
        if not os.path.exists(path):
            continue
        fd = obj_get(path)
        try:
            have = map_layout(fd)
        finally:
            os.close(fd)
        if have != want:
            os.unlink(path)
            dropped.append(name)
    return dropped


def render_source(pin_dir: str, source: str | None = None) -> str:
    check_pin_dir(pin_dir)
    with open(source or SOURCE) as f:
        return f.read().replace("AMB_PIN_DIR", pin_dir.rstrip("/"))


class Programs:
    """The compiled capture module: program fds by name; maps pinned under ``pin_dir``."""

    def __init__(self, pin_dir: str, kernel_src_dir: str = kernel_src.DEFAULT_DIR) -> None:
        ensure_bpffs(pin_dir)
        drop_incompatible_pins(pin_dir)
        if not os.environ.get("BCC_KERNEL_SOURCE"):  # an operator's own tree wins
            os.environ["BCC_KERNEL_SOURCE"] = kernel_src.ensure(kernel_src_dir)
        from bcc import BPF  # lazy: see module docstring

        self.pin_dir = pin_dir
        self._bpf: Any = BPF(text=render_source(pin_dir).encode())
        self._fds: dict[str, int] = {}
        try:
            for p in CGROUP_PROGS:
                self._fds[p.name] = self._bpf.load_func(p.name.encode(), p.prog_type,
                                                        attach_type=p.attach_type).fd
            for name in TC_PROGS:
                self._fds[name] = self._bpf.load_func(name.encode(), PROG_SCHED_CLS).fd
        except Exception:
            self.close()
            raise

    def fd(self, name: str) -> int:
        return self._fds[name]

    def close(self) -> None:
        """Release our fds (attached programs stay alive through their attachment)."""
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
        self._fds.clear()
