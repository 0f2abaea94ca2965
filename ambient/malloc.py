"""glibc malloc settings for the proxies' processes (ztunnel, waypoint).

Role: two small, measured fixes to how glibc's allocator meets a proxy's allocation pattern
(``perf/README.md``, round 3):

* :func:`tune_for_proxy`: every TLS read through uvloop allocates a 256 KiB ``bytes`` (CPython's
  ``SSLObject.read(256 KiB)``) and shrinks it to what arrived.  That size is above glibc's
  initial mmap threshold (128 KiB), and because the shrunken block is what gets freed, the
  dynamic threshold never rises: each read costs mmap + mremap + munmap and fresh page faults
  (strace showed three extra system calls per request on one ztunnel).  A fixed 1 MiB mmap
  threshold serves those buffers from the heap; a fixed 8 MiB trim threshold keeps the heap
  from shrinking and growing on every read.
* :func:`trim_periodically`: with the heap kept, freed pages go back to the kernel every
  so often (``malloc_trim``), so RSS still falls after bulk traffic.

Both are no-ops (and say so) where the C library is not glibc.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging

log = logging.getLogger("ambient.malloc")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20
TRIM_THRESHOLD = 8 << 20


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt  # noqa: B018 - glibc only
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def tune_for_proxy() -> bool:
    """Apply the thresholds above; False (nothing changed) when not on glibc."""
    libc = _libc()
    if libc is None:
        log.info("not glibc: malloc thresholds left as they are")
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    return libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok


async def trim_periodically(interval: float) -> None:
    """Every ``interval`` s, hand the heap's free pages back to the kernel (``malloc_trim``;
    a pass over a proxy-sized heap takes about a millisecond)."""
    libc = _libc()
    if libc is None:
        log.info("not glibc: no periodic malloc_trim")
        return
    trim = libc.malloc_trim
    trim.argtypes = [ctypes.c_size_t]
    while True:
        await asyncio.sleep(interval)
        trim(0)
