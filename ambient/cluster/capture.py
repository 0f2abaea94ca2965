"""In-pod traffic capture for the local cluster: a compatibility layer over ``cni.capture``.

Role: the local cluster (``mesh.py``) and older tests call these functions with an ``ip
netns`` *name*; the rules, their rendering and the apply/remove/check logic live in
:mod:`cni.capture.iptables` (contract C.3).  This module only converts names and options to
a :class:`cni.capture.base.PodCapture` and delegates; it will go once ``mesh.py`` uses
``cni.capture.make_backend`` directly.

Invariants: as in :mod:`cni.capture.iptables` (idempotent apply and remove, remove never
raises half-way; DNS capture not rendered yet).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ambient.netns import netns_path
from cni.capture.base import PROBE_SNAT_IP, CaptureError, PodCapture
from cni.capture.common import ROUTE_ARGS, RULE_ARGS, run
from cni.capture.iptables import IPTABLES_SAVE, IptablesBackend, render_rules

__all__ = ["CaptureConfig", "CaptureError", "apply_capture", "dump_rules", "remove_capture",
           "render_iptables_rules", "render_policy_routing"]


@dataclass(frozen=True)
class CaptureConfig:
    probe_snat_ip: str = PROBE_SNAT_IP
    inbound_capture: bool = True  # False = the "bypass-inbound-capture" variant
    virtual_interfaces: tuple[str, ...] = field(default=())


def _pod(netns: str, config: CaptureConfig | None = None) -> PodCapture:
    c = config or CaptureConfig()
    return PodCapture(uid=netns, name=netns, namespace="local", netns=netns_path(netns),
                      inbound_capture=c.inbound_capture, probe_snat_ip=c.probe_snat_ip,
                      virtual_interfaces=c.virtual_interfaces)


def render_iptables_rules(config: CaptureConfig | None = None) -> str:
    """The in-pod ruleset in ``iptables-restore`` format (see ``cni.capture.iptables``)."""
    return render_rules(_pod("-", config))


def render_policy_routing() -> list[list[str]]:
    """The ``ip`` argument lists (after ``ip -n <pod>``) for the inbound policy routing."""
    return [["rule", "add", *RULE_ARGS], ["route", "add", *ROUTE_ARGS]]


def apply_capture(netns: str, config: CaptureConfig | None = None) -> None:
    """Program capture in the pod netns named ``netns`` (idempotent); raises CaptureError."""
    IptablesBackend().apply(_pod(netns, config))


def remove_capture(netns: str, strict: bool = True) -> list[str]:
    """Remove our chains, jumps and policy routing from ``netns``; idempotent.

    Returns the errors met; raises CaptureError with all of them if ``strict`` and any.
    """
    errors = IptablesBackend().remove(_pod(netns))
    if strict and errors:
        raise CaptureError("; ".join(errors))
    return errors


def dump_rules(netns: str) -> str:
    """``iptables-save`` of the pod netns (for debugging and tests)."""
    p = run(netns_path(netns), [IPTABLES_SAVE])
    if p.returncode != 0:
        raise CaptureError(f"iptables-save in {netns}: {p.stderr.strip()}")
    return p.stdout

