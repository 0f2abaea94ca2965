"""Per-pod cgroup v2 directories and the processes the harness starts in them.

Role: a pod's processes live in ``<cgroup2>/ambient/<cluster>/<pod>`` (eBPF capture attaches
there later) and in the pod netns.

Invariants:
- The cgroup2 mount is found from ``/proc/self/mountinfo`` (``/sys/fs/cgroup/unified`` on the
  project machines; never hard-coded).  Nothing is ever done at the cgroup2 root.
- A process enters its cgroup *before* it execs the application (a tiny ``/bin/sh`` moves
  itself with ``echo 0 > cgroup.procs`` and then execs ``nsenter --net=<pod> argv``), so the
  PID we record is the application's and there is no window outside the cgroup.  No
  ``preexec_fn`` (unsafe in threaded programs).
- Removal signals only PIDs the harness started, identified by (pid, start time) so a recycled
  PID is never killed; the per-pod cgroup's ``cgroup.kill`` is used only as a last resort for
  descendants those processes left inside *our own* cgroup, then the directory is removed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass

from ambient.netns import netns_path

CGROUP_ROOT_NAME = "ambient"


def cgroup2_mount() -> str:
    """Mount point of the cgroup v2 hierarchy, from /proc/self/mountinfo."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                return left.split()[4]
    raise RuntimeError("no cgroup2 mount found in /proc/self/mountinfo; mount one "
                       "(mount -t cgroup2 none /sys/fs/cgroup/unified)")


def pod_cgroup_path(cluster: str, pod: str, node: str | None = None) -> str:
    """``<cgroup2>/ambient/<cluster>[/pods-<node>]/<pod>``: a node's pods share a parent, so
    per-node cgroup programs (eBPF capture) can be attached once per node."""
    base = os.path.join(cgroup2_mount(), CGROUP_ROOT_NAME, cluster)
    return os.path.join(base, f"pods-{node}", pod) if node else os.path.join(base, pod)


def create_cgroup(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def cgroup_pids(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def process_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may contain spaces and parens; fields after the last ')' are fixed.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])


def _alive(pid: int, start_time: int | None) -> bool:
    st = process_start_time(pid)
    if st is None:
        return False
    if start_time is not None and st != start_time:
        return False  # PID recycled: not ours
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except FileNotFoundError:
        return False


@dataclass
class PodProcess:
    pid: int
    start_time: int | None
    cgroup: str
    argv: list[str]
    popen: subprocess.Popen[bytes] | None = None

    def to_state(self) -> dict[str, object]:
        return {"pid": self.pid, "start_time": self.start_time, "cgroup": self.cgroup,
                "argv": self.argv}


NSENTER = "/usr/bin/nsenter"


def _in_pod_cmd(cgroup: str, netns: str, argv: list[str]) -> list[str]:
    """``argv`` wrapped to join ``cgroup`` and then enter only the network namespace.

    Unlike ``ip netns exec``, ``nsenter --net`` keeps the host's mounts: ``ip netns exec``
    remounts /sys, hiding the cgroup2 and bpffs mounts the node agent (eBPF capture) and
    ztunnel (pinned maps) need.
    """
    procs = os.path.join(cgroup, "cgroup.procs")
    return ["/bin/sh", "-c", 'echo 0 > "$0" && exec "$@"', procs,
            NSENTER, f"--net={netns_path(netns)}", "--", *argv]


def start_in_pod(cgroup: str, netns: str, argv: list[str], *, env: dict[str, str] | None = None,
                 log_path: str | None = None, cwd: str | None = None) -> PodProcess:
    """Start ``argv`` inside ``cgroup`` and the netns named ``netns``.  Use absolute paths."""
    cmd = _in_pod_cmd(cgroup, netns, argv)
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             env=env, cwd=cwd, start_new_session=True)
    finally:
        if log_path:
            out.close()  # type: ignore[union-attr]
    return PodProcess(p.pid, process_start_time(p.pid), cgroup, list(argv), p)


def run_in_pod(cgroup: str, netns: str, argv: list[str], *, env: dict[str, str] | None = None,
               timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run a short command inside ``cgroup`` and the netns ``netns``; wait for it (bounded)."""
    cmd = _in_pod_cmd(cgroup, netns, argv)
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


def stop_process(proc: PodProcess | dict[str, object], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``, one PID we started; idempotent."""
    start: int | None
    if isinstance(proc, dict):
        raw_start = proc.get("start_time")
        pid, popen = int(str(proc["pid"])), None
        start = int(str(raw_start)) if raw_start is not None else None
    else:
        pid, start, popen = proc.pid, proc.start_time, proc.popen
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
        if not _alive(pid, start):
            break
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if popen is not None and popen.poll() is not None:
                break
            if popen is None and not _alive(pid, start):
                break
            time.sleep(0.02)
    if popen is not None:
        try:
            popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass


def remove_cgroup(path: str, timeout: float = 5.0) -> None:
    """rmdir the cgroup (idempotent).  Leftover descendants of our processes are killed via
    this cgroup's own ``cgroup.kill`` first.  Parents (``ambient/<cluster>``) are removed by
    the caller with :func:`remove_empty_dir`."""
    if not os.path.isdir(path):
        return
    deadline = time.monotonic() + timeout
    killed = False
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() >= deadline:
                raise
        if cgroup_pids(path) and not killed:
            try:
                with open(os.path.join(path, "cgroup.kill"), "w") as f:
                    f.write("1")
            except OSError:
                pass
            killed = True
        time.sleep(0.02)


def remove_empty_dir(path: str) -> None:
    try:
        os.rmdir(path)
    except (FileNotFoundError, OSError):
        pass
