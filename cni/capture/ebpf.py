"""The eBPF capture backend: contract C.3 without netfilter (bcc programs from ``bpf/``).

Role: capture a pod's traffic with programs attached once per node to a cgroup (outbound:
connect4/sockops/getpeername4) and per pod to tc hooks (inbound SYNs handed to ztunnel's 15006
listener with ``bpf_sk_assign``; ztunnel's mark turned into 0x111 on ``lo``).  A pod is enrolled
by its network-namespace cookie in the pinned ``amb_enrolled`` map; the cgroup programs ignore
every other netns.  See ``bpf/capture.c`` for what each program does.  Outbound connections
are sent to POD_IP:15001 rather than 127.0.0.1:15001 so that the application's socket keeps
its pod IP as local address (as under iptables REDIRECT) and ztunnel sees the pod IP as peer.

Node state (``setup_node``/``teardown_node``): compiled programs, their cgroup attachments on
``cgroup_path`` (in Kubernetes the cgroup2 root; in the local cluster and tests a cgroup above
the pods': attachments are inherited by descendants), and the maps pinned under ``pin_dir``.

Per-pod state (``apply``/``remove``): the ``amb_enrolled`` entry (value: pod IPv4 + a hash of
the pod UID, so removal works when the netns is already gone), tc filters on the pod's
interfaces (ingress, ``amb_tc_in``) and on ``lo`` (ingress, ``amb_tc_lo``), the policy routing
of C.3, and the sysctls ``net.ipv4.tcp_fwmark_accept=1`` (the app's accepted socket inherits
the SYN's mark 0x111, so its replies to a spoofed client are routed back to ztunnel) and
``net.ipv4.tcp_migrate_req=1``.

Invariants:
- ``setup_node`` takes over from a crashed agent without a capture gap: the pinned maps are
  re-opened (enrolled pods stay enrolled), the new programs are attached first, and only then
  are older programs of ours (found by name on the cgroup) detached.
- ``teardown_node`` detaches every program of ours from the cgroup, also stale ones, and
  unpins the maps; after ``remove`` of every pod nothing of ours is left in the kernel.
- ``remove`` turns the tcp_fwmark_accept sysctl back to 0 and leaves tcp_migrate_req at 1
  (as the other backends do).
- Virtual interfaces (``istio.io/reroute-virtual-interfaces``): their TCP gets mark 0x111 at
  tc ingress (the C.3 policy rule then delivers it locally whatever its destination) and SYNs
  are assigned to the 15001 listener, which must have IP_TRANSPARENT to answer from the
  original (foreign) destination; ztunnel reads that destination from ``getsockname()``.
- Not built: DNS capture (udp/tcp 53 -> 15053; no DNS proxy yet) and IPv6 (an enrolled pod's
  IPv6 TCP is not captured).
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
from typing import ClassVar

from ambient.bpfmap import (
    PIN_DIR,
    map_delete,
    map_keys,
    map_lookup,
    map_update,
    netns_cookie,
    obj_get,
)
from bpf import cgroup, kernel_src, loader, tc
from cni.capture.base import CaptureError, PodCapture
from cni.capture.common import (
    MIGRATE_SYSCTL,
    apply_policy_routing,
    check_migrate_sysctl,
    check_policy_routing,
    read_sysctl,
    remove_policy_routing,
    set_sysctl,
)

FWMARK_ACCEPT_SYSCTL = "net/ipv4/tcp_fwmark_accept"
ENROLLED_MAP = "amb_enrolled"
_KEY = struct.Struct("=Q")
_POD = struct.Struct("=4sIQ")  # ip (network order), flags, uid hash


def uid_hash(uid: str) -> int:
    """A stable 64-bit tag of a pod UID (stored with its enrolled entry)."""
    return int.from_bytes(hashlib.sha256(uid.encode()).digest()[:8], "little")


def pack_pod(ip: str | None, uid: str) -> bytes:
    return _POD.pack(socket.inet_aton(ip or "0.0.0.0"), 0, uid_hash(uid))


def unpack_pod(raw: bytes) -> tuple[str, int]:
    ip, _, tag = _POD.unpack_from(raw)
    return socket.inet_ntoa(ip), int(tag)


def pod_ipv4(pod: PodCapture) -> str | None:
    for ip in pod.ips:
        try:
            socket.inet_aton(ip)
        except OSError:
            continue
        if ip.count(".") == 3:
            return ip
    return None


class EbpfBackend:
    """Capture with eBPF programs on ``cgroup_path`` and per-pod tc hooks."""

    name: ClassVar[str] = "ebpf"

    def __init__(self, cgroup_path: str, pin_dir: str = PIN_DIR,
                 kernel_src_dir: str = kernel_src.DEFAULT_DIR) -> None:
        self.cgroup_path = cgroup_path
        self.pin_dir = pin_dir
        self.kernel_src_dir = kernel_src_dir
        self._progs: loader.Programs | None = None

    # -- availability -------------------------------------------------------------------------

    def unavailable_reason(self) -> str | None:
        if os.geteuid() != 0:
            return "the eBPF backend needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)"
        missing = loader.bcc_missing()
        if missing:
            return missing
        try:
            loader.check_pin_dir(self.pin_dir)
        except ValueError as exc:
            return str(exc)
        if not loader.on_cgroup2(self.cgroup_path):
            return (f"{self.cgroup_path} is not a directory on a cgroup2 mount: mount cgroup2 "
                    "(mount -t cgroup2 none /sys/fs/cgroup) and point cgroup_path into it")
        if not os.path.isfile("/usr/include/linux/types.h"):
            return ("bcc cannot compile: no uapi headers in /usr/include/linux (apt-get install "
                    "linux-libc-dev) to build the kernel-source stand-in from")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                netns_cookie(s)
            except OSError:
                return ("the kernel has no SO_NETNS_COOKIE (Linux >= 5.14 needed for eBPF "
                        "capture)")
        return None

    # -- node ---------------------------------------------------------------------------------

    def setup_node(self) -> None:
        reason = self.unavailable_reason()
        if reason:
            raise CaptureError(f"eBPF capture unavailable: {reason}")
        if self._progs is None:
            try:
                self._progs = loader.Programs(self.pin_dir, self.kernel_src_dir)
            except Exception as exc:  # bcc raises bare Exceptions
                raise CaptureError(f"compiling/loading the eBPF capture programs failed: {exc}"
                                   " (run with BCC debug, or check dmesg for verifier output)"
                                   ) from exc
        progs = self._progs
        cg = cgroup.open_cgroup(self.cgroup_path)
        try:
            before = cgroup.attached(cg, loader.CGROUP_ATTACH_TYPES, loader.OUR_NAMES)
            mine = {}
            for p in loader.CGROUP_PROGS:
                pid = cgroup.prog_id_of(progs.fd(p.name))
                mine[pid] = p
                if not any(a.prog_id == pid for a in before):
                    try:
                        cgroup.attach(cg, progs.fd(p.name), p.attach_type)
                    except OSError as exc:
                        raise CaptureError(f"attaching {p.name} to cgroup {self.cgroup_path} "
                                           f"failed: {exc}") from exc
            for a in before:  # a crashed agent's programs: replaced above, now detach
                if a.prog_id not in mine:
                    cgroup.detach_id(cg, a.prog_id, a.attach_type)
        finally:
            os.close(cg)

    def teardown_node(self) -> list[str]:
        errors: list[str] = []
        try:
            cg = cgroup.open_cgroup(self.cgroup_path)
        except FileNotFoundError:
            cg = -1
        if cg >= 0:
            try:
                for a in cgroup.attached(cg, loader.CGROUP_ATTACH_TYPES, loader.OUR_NAMES):
                    try:
                        cgroup.detach_id(cg, a.prog_id, a.attach_type)
                    except OSError as exc:
                        errors.append(f"detaching {a.name} (id {a.prog_id}) from "
                                      f"{self.cgroup_path}: {exc}")
            except OSError as exc:
                errors.append(f"querying programs on {self.cgroup_path}: {exc}")
            finally:
                os.close(cg)
        if self._progs is not None:
            self._progs.close()
            self._progs = None
        for m in loader.MAPS:
            try:
                os.unlink(os.path.join(self.pin_dir, m))
            except FileNotFoundError:
                pass
            except OSError as exc:
                errors.append(f"unpinning {m}: {exc}")
        try:
            os.rmdir(self.pin_dir)
        except FileNotFoundError:
            pass
        except OSError as exc:
            errors.append(f"removing {self.pin_dir}: {exc} (something else is pinned there)")
        return errors

    # -- pods ---------------------------------------------------------------------------------

    def _enrolled_fd(self) -> int:
        return obj_get(os.path.join(self.pin_dir, ENROLLED_MAP))

    def apply(self, pod: PodCapture) -> None:
        if not os.path.exists(pod.netns):
            raise CaptureError(f"pod {pod.namespace}/{pod.name}: netns {pod.netns} does not "
                               "exist (was the pod deleted?)")
        self.setup_node()
        progs = self._progs
        assert progs is not None
        where = f"pod {pod.namespace}/{pod.name}"
        step = "sysctls"
        try:
            set_sysctl(pod.netns, FWMARK_ACCEPT_SYSCTL, "1")
            set_sysctl(pod.netns, MIGRATE_SYSCTL, "1")
            step = "policy routing"
            apply_policy_routing(pod.netns)
            step = "tc on lo"
            tc.attach(pod.netns, "lo", tc.INGRESS, progs.fd(loader.PROG_TC_LO), loader.PROG_TC_LO)
            for ifname in pod.interfaces:
                step = f"tc on {ifname}"
                if pod.inbound_capture:
                    tc.attach(pod.netns, ifname, tc.INGRESS, progs.fd(loader.PROG_TC_IN),
                              loader.PROG_TC_IN)
                else:
                    tc.detach(pod.netns, ifname)
            for ifname in pod.virtual_interfaces:
                step = f"tc on virtual interface {ifname}"
                vin = self._virtual_prog(pod, ifname)
                tc.attach(pod.netns, ifname, tc.INGRESS, progs.fd(vin), vin)
            step = "enrolling the netns"
            cookie = loader.netns_cookie_of(pod.netns)
            fd = self._enrolled_fd()
            try:
                map_update(fd, _KEY.pack(cookie), pack_pod(pod_ipv4(pod), pod.uid))
            finally:
                os.close(fd)
        except CaptureError:
            raise
        except Exception as exc:  # pyroute2 raises NetlinkError (not OSError) among others
            raise CaptureError(f"{where}: eBPF capture, {step}: {exc}") from exc

    @staticmethod
    def _virtual_prog(pod: PodCapture, ifname: str) -> str:
        if tc.has_ethernet_header(pod.netns, ifname):
            return loader.PROG_TC_VIRT_L2
        return loader.PROG_TC_VIRT_L3

    def remove(self, pod: PodCapture) -> list[str]:
        errors: list[str] = []
        errors += self._unenroll(pod)
        if not os.path.exists(pod.netns):
            return errors
        for ifname in (*pod.interfaces, *pod.virtual_interfaces, "lo"):
            try:
                tc.detach(pod.netns, ifname)
            except Exception as exc:  # noqa: BLE001 - collected for the operator
                errors.append(f"removing tc programs from {ifname}: {exc}")
        errors += remove_policy_routing(pod.netns)
        try:
            set_sysctl(pod.netns, FWMARK_ACCEPT_SYSCTL, "0")
        except CaptureError as exc:
            errors.append(str(exc))
        return errors

    def _unenroll(self, pod: PodCapture) -> list[str]:
        try:
            fd = self._enrolled_fd()
        except FileNotFoundError:
            return []  # node state already gone
        except OSError as exc:
            return [f"opening {ENROLLED_MAP}: {exc}"]
        try:
            cookies: list[bytes] = []
            if os.path.exists(pod.netns):
                try:
                    cookies.append(_KEY.pack(loader.netns_cookie_of(pod.netns)))
                except OSError:
                    pass
            tag = uid_hash(pod.uid)
            for k in map_keys(fd, _KEY.size):  # also entries of this pod whose netns is gone
                raw = map_lookup(fd, k, _POD.size)
                if raw is not None and unpack_pod(raw)[1] == tag and k not in cookies:
                    cookies.append(k)
            for k in cookies:
                map_delete(fd, k)
        except OSError as exc:
            return [f"removing {pod.namespace}/{pod.name} from {ENROLLED_MAP}: {exc}"]
        finally:
            os.close(fd)
        return []

    def check(self, pod: PodCapture) -> list[str]:
        if not os.path.exists(pod.netns):
            return [f"pod netns {pod.netns} does not exist"]
        findings: list[str] = []
        findings += self._check_node()
        try:
            cookie = loader.netns_cookie_of(pod.netns)
            fd = self._enrolled_fd()
            try:
                raw = map_lookup(fd, _KEY.pack(cookie), _POD.size)
            finally:
                os.close(fd)
            want = (pod_ipv4(pod) or "0.0.0.0", uid_hash(pod.uid))
            if raw is None:
                findings.append(f"netns {pod.netns} is not in {ENROLLED_MAP}: outbound "
                                "traffic is not captured")
            elif unpack_pod(raw) != want:
                findings.append(f"{ENROLLED_MAP} entry is {unpack_pod(raw)[0]}, expected "
                                f"{want[0]} for this pod")
        except OSError as exc:
            findings.append(f"cannot read {ENROLLED_MAP}: {exc}")
        findings += self._check_tc(pod)
        findings += check_policy_routing(pod.netns)
        findings += check_migrate_sysctl(pod.netns)
        try:
            value = read_sysctl(pod.netns, FWMARK_ACCEPT_SYSCTL)
            if value != "1":
                findings.append(f"sysctl net.ipv4.tcp_fwmark_accept is {value}, expected 1 "
                                "(replies to spoofed sources would leave the pod)")
        except OSError as exc:
            findings.append(f"cannot read {FWMARK_ACCEPT_SYSCTL}: {exc}")
        return findings

    def _check_tc(self, pod: PodCapture) -> list[str]:
        expect: dict[str, dict[int, str]] = {"lo": {tc.INGRESS: loader.PROG_TC_LO}}
        if pod.inbound_capture:
            expect.update({i: {tc.INGRESS: loader.PROG_TC_IN} for i in pod.interfaces})
        findings = []
        for ifname in pod.virtual_interfaces:
            try:
                expect[ifname] = {tc.INGRESS: self._virtual_prog(pod, ifname)}
            except Exception as exc:  # noqa: BLE001 - reported as a finding
                findings.append(f"virtual interface {ifname}: {exc}")
        for ifname, want in expect.items():
            try:
                have = tc.ours(pod.netns, ifname)
            except Exception as exc:  # noqa: BLE001 - reported as a finding
                findings.append(f"cannot read tc filters on {ifname}: {exc}")
                continue
            for parent, prog in want.items():
                hook = "ingress" if parent == tc.INGRESS else "egress"
                if have.get(parent) != prog:
                    findings.append(f"tc {hook} program on {ifname} is "
                                    f"{have.get(parent) or 'missing'}, expected {prog}")
        return findings

    def _check_node(self) -> list[str]:
        try:
            cg = cgroup.open_cgroup(self.cgroup_path)
        except FileNotFoundError as exc:
            return [str(exc)]
        try:
            attached = cgroup.attached(cg, loader.CGROUP_ATTACH_TYPES, loader.OUR_NAMES)
            names = {a.name for a in attached}
        except OSError as exc:
            return [f"cannot query programs on {self.cgroup_path}: {exc}"]
        finally:
            os.close(cg)
        return [f"{p.name} is not attached to {self.cgroup_path} (run setup_node)"
                for p in loader.CGROUP_PROGS if p.name not in names]
