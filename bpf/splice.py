"""Load the kernel-splice program (bcc) and pin its maps for ztunnel.

Role: the node agent calls :func:`load_splice` at start.  It compiles ``bpf/splice.c``, attaches
the ``SK_SKB`` stream-verdict program to the ``amb_splice`` sockhash (``BPF_PROG_ATTACH`` with
the map as target) and pins both maps under ``pin_dir``.  ztunnel (``ambient/splicemap.py``)
opens the pins and fills the maps; the program lives as long as the map it is attached to, so
nothing of this process needs to stay alive.

Invariants:
- Idempotent: pins that already hold the same program (same tag, attached, redirecting through
  the pinned peer map) and the same layout and size are reused untouched, so running splices
  keep going across agent restarts.  Anything else is replaced: a new pair is pinned under
  temporary names and renamed over the old pins (ztunnel re-opens on the inode change; running
  splices keep their old maps until they end).
- :func:`unload_splice` removes only our two pins (and ``pin_dir`` if it is then empty).
- bcc is imported lazily (``unavailable_reason`` can then say what is missing).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from ambient.bpfmap import obj_get, obj_pin, prog_info, prog_info_by_id
from ambient.splicemap import (
    DEFAULT_MAX_ENTRIES,
    PEER_MAP,
    SK_SKB_STREAM_VERDICT,
    SPLICE_MAP,
    VERDICT_PROG,
    attached_verdicts,
    pin_problem,
)
from bpf import kernel_src, loader

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "splice.c")
PROG_SK_SKB = 14
PINS = (PEER_MAP, SPLICE_MAP)


def unavailable_reason() -> str | None:
    """Why this process cannot load the splice, or None (checked without compiling)."""
    if os.geteuid() != 0:
        return "loading eBPF programs needs root (CAP_BPF, CAP_NET_ADMIN)"
    return loader.bcc_missing()


def render_source(max_entries: int) -> str:
    if not 2 <= max_entries <= 1 << 24:
        raise ValueError(f"kernel splice max entries {max_entries} must be in 2..16777216")
    with open(SOURCE) as f:
        return f.read().replace("AMB_SPLICE_MAX_ENTRIES", str(int(max_entries)))


def _pinned_tag(pin_dir: str, max_entries: int) -> bytes | None:
    """The tag of the verdict program on usable pins of this size, or None."""
    try:
        sfd = obj_get(os.path.join(pin_dir, SPLICE_MAP))
    except OSError:
        return None
    try:
        try:
            pfd = obj_get(os.path.join(pin_dir, PEER_MAP))
        except OSError:
            return None
        try:
            if pin_problem(sfd, pfd, max_entries) is not None:
                return None
            return prog_info_by_id(attached_verdicts(sfd)[0]).tag
        finally:
            os.close(pfd)
    except OSError:
        return None
    finally:
        os.close(sfd)


def load_splice(pin_dir: str, *, max_entries: int = DEFAULT_MAX_ENTRIES,
                kernel_src_dir: str = kernel_src.DEFAULT_DIR) -> bool:
    """Make sure a working kernel splice is pinned in ``pin_dir``.

    Returns True when it was (re)created, False when the pinned one was reused.  Raises
    RuntimeError (bcc's failures), OSError or ValueError with what went wrong.
    """
    loader.check_pin_dir(pin_dir)
    loader.ensure_bpffs(pin_dir)
    if not os.environ.get("BCC_KERNEL_SOURCE"):  # an operator's own tree wins
        os.environ["BCC_KERNEL_SOURCE"] = kernel_src.ensure(kernel_src_dir)
    from bcc import BPF, libbcc  # lazy: see module docstring

    b: Any = BPF(text=render_source(max_entries).encode())
    try:
        fn = b.load_func(VERDICT_PROG.encode(), PROG_SK_SKB)
        if _pinned_tag(pin_dir, max_entries) == prog_info(fn.fd).tag:
            return False
        fds = {name: libbcc.lib.bpf_table_fd(b.module, name.encode()) for name in PINS}
        if min(fds.values()) < 0:
            raise RuntimeError(f"bcc did not create the maps of {SOURCE}")
        BPF.attach_func(fn, fds[SPLICE_MAP], SK_SKB_STREAM_VERDICT)
        for name in PINS:  # peer map first: ztunnel checks the pair when the splice map moves
            tmp = os.path.join(pin_dir, f"{name}_new")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            obj_pin(fds[name], tmp)
            os.rename(tmp, os.path.join(pin_dir, name))
        return True
    finally:
        b.cleanup()


def unload_splice(pin_dir: str) -> list[str]:
    """Unpin the splice maps (running splices keep theirs until they end); returns errors."""
    errors = []
    for name in (SPLICE_MAP, PEER_MAP, f"{SPLICE_MAP}_new", f"{PEER_MAP}_new"):
        try:
            os.unlink(os.path.join(pin_dir, name))
        except FileNotFoundError:
            pass
        except OSError as e:
            errors.append(f"unpinning {pin_dir}/{name}: {e}")
    with contextlib.suppress(OSError):  # not empty: the capture maps live there too
        os.rmdir(pin_dir)
    return errors
