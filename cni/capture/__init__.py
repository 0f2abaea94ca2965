"""Capture backends: iptables, nftables and eBPF behind one interface (see ``base``).

Role: pick and build a backend by name.  ``ebpf`` is imported lazily: it pulls in bcc, and
its module may be absent from a build; asking for it then raises a CaptureError that says so.
The node-side kubelet probe SNAT is separate (:mod:`cni.capture.probe`) and is used with any
backend.
"""

from __future__ import annotations

import importlib
from typing import Any

from cni.capture.base import BACKENDS, CaptureBackend, CaptureError, PodCapture

__all__ = ["BACKENDS", "CaptureBackend", "CaptureError", "PodCapture", "default_backend_name",
           "make_backend"]


def _backend_class(name: str) -> Any:
    if name == "iptables":
        from cni.capture.iptables import IptablesBackend
        return IptablesBackend
    if name == "nftables":
        from cni.capture.nftables import NftablesBackend
        return NftablesBackend
    if name == "ebpf":
        try:
            module = importlib.import_module("cni.capture.ebpf")
        except ImportError as exc:
            raise CaptureError(f"the eBPF capture backend cannot be loaded ({exc}); use "
                               "capture backend 'iptables' or 'nftables'") from exc
        cls = getattr(module, "EbpfBackend", None)
        if cls is None:
            raise CaptureError("cni.capture.ebpf has no EbpfBackend; use capture backend "
                               "'iptables' or 'nftables'")
        return cls
    raise CaptureError(f"unknown capture backend {name!r}: choose one of {', '.join(BACKENDS)}")


def make_backend(name: str, **options: Any) -> CaptureBackend:
    """Build the backend called ``name`` with backend-specific ``options``."""
    cls = _backend_class(name)
    try:
        backend: CaptureBackend = cls(**options)
    except TypeError as exc:
        raise CaptureError(f"capture backend {name!r} does not accept options "
                           f"{sorted(options)}: {exc}") from exc
    return backend


def default_backend_name(**ebpf_options: Any) -> str:
    """``ebpf`` when it can run on this machine, else ``iptables``.

    ``ebpf_options`` are passed to the eBPF backend for the probe; without a ``cgroup_path``
    the cgroup2 mount root is used (the backend only inspects it here, attaches nothing).
    """
    try:
        if "cgroup_path" not in ebpf_options:
            from ambient.cluster.cgroups import cgroup2_mount

            ebpf_options = {**ebpf_options, "cgroup_path": cgroup2_mount()}
        reason = make_backend("ebpf", **ebpf_options).unavailable_reason()
    except Exception:  # noqa: BLE001 - any failure to build eBPF means "use iptables"
        return "iptables"
    return "ebpf" if reason is None else "iptables"
