"""The one interface every capture backend implements (iptables, nftables, eBPF).

Role: the node agent decides *what* to capture; a backend decides *how*.  Backends are
interchangeable: the same pod, captured by any of them, behaves the same way (contract C.3):

- outbound: every TCP connection the pod's applications open to a non-loopback address
  other than the pod's own IP reaches ztunnel's in-pod listener on 15001, and ztunnel can
  recover the original destination;
- inbound: every TCP connection arriving at the pod, except to port 15008 and except from
  the kubelet probe-SNAT address 169.254.7.127, reaches ztunnel's listener on 15006, with
  the original destination recoverable from the accepted socket;
- sockets that carry ztunnel's mark 1337 (0x539/0xfff) are never captured;
- replies of the application to a connection ztunnel opened with a spoofed (original)
  source address are routed back to ztunnel (connmark 0x111 + ``ip rule fwmark 0x111/0xfff
  pref 32764 lookup 100`` + ``local 0.0.0.0/0 dev lo table 100``);
- when no ztunnel listens, captured connections fail (refused or dropped): never plaintext.

Invariants for implementations:
- ``apply`` is idempotent (applying twice leaves one copy of everything) and leaves the
  pod captured or raises :class:`CaptureError` (the caller then fails the pod closed).
- ``remove`` is idempotent, tolerates a missing netns, never raises half-way, and returns
  the errors it met (missing pieces are not errors).
- ``check`` returns a list of human-readable drift findings; empty means "as applied".
- ``setup_node``/``teardown_node`` own node-wide state (loaded programs, shared maps,
  pins); ``teardown_node`` after ``remove`` of every pod leaves the kernel as it was found.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol

OUTBOUND_PORT = 15001
INBOUND_PLAINTEXT_PORT = 15006
INBOUND_HBONE_PORT = 15008
ZTUNNEL_MARK = 0x539  # SO_MARK 1337, matched under mask 0xfff
MARK_MASK = 0xFFF
CONNMARK = 0x111  # InpodTProxyMark
ROUTE_TABLE = 100  # RouteTableInbound
RULE_PREF = 32764
PROBE_SNAT_IP = "169.254.7.127"
BACKENDS = ("iptables", "nftables", "ebpf")


class CaptureError(RuntimeError):
    """Capture could not be applied; the message says which step failed and what to do."""


@dataclass(frozen=True)
class PodCapture:
    """What a backend needs to know about one pod."""

    uid: str
    name: str
    namespace: str
    netns: str  # path: /var/run/netns/<name> or /proc/<pid>/ns/net
    ips: tuple[str, ...] = ()  # the pod's IPv4 addresses (from the CNI result)
    interfaces: tuple[str, ...] = ("eth0",)  # the pod's network interfaces (not lo)
    inbound_capture: bool = True  # False: annotation ambient.istio.io/bypass-inbound-capture
    probe_snat_ip: str = PROBE_SNAT_IP
    virtual_interfaces: tuple[str, ...] = field(default=())  # istio.io/reroute-virtual-interfaces


class CaptureBackend(Protocol):
    """A way of capturing a pod's traffic; see the module docstring for the contract."""

    name: ClassVar[str]  # one of BACKENDS

    def unavailable_reason(self) -> str | None:
        """None when this backend can run on this machine, else why not and what to do."""
        ...

    def setup_node(self) -> None:
        """Prepare node-wide state (idempotent)."""
        ...

    def teardown_node(self) -> list[str]:
        """Remove node-wide state; returns the errors met."""
        ...

    def apply(self, pod: PodCapture) -> None:
        """Capture ``pod`` (idempotent); raises CaptureError."""
        ...

    def remove(self, pod: PodCapture) -> list[str]:
        """Stop capturing ``pod`` (idempotent, missing netns tolerated); returns errors."""
        ...

    def check(self, pod: PodCapture) -> list[str]:
        """Drift findings for ``pod``; empty when everything is in place."""
        ...
