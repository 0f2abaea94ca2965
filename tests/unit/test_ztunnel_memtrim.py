"""The proxies' malloc settings (ambient.malloc): periodic trim, and TLS read buffers served
from the heap instead of a fresh mmap each."""

from __future__ import annotations

import asyncio
import ctypes

import pytest

from ambient.malloc import trim_periodically
from ztunnel.config import SettingsError, from_env

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_trim_gives_freed_heap_pages_back() -> None:
    # 400 blocks of 64 KiB (below glibc's mmap threshold: they live on the heap), touched,
    # then all freed but the last: the heap's top stays in use, so free() alone keeps the
    # ~25 MB mapped.  One trim pass must return most of it.
    blocks = [libc.malloc(64 << 10) for _ in range(400)]
    assert all(blocks)
    for b in blocks:
        ctypes.memset(b, 1, 64 << 10)
    for b in blocks[:-1]:
        libc.free(b)
    before = _rss_kb()

    async def one_pass() -> None:
        task = asyncio.create_task(trim_periodically(0.01))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(one_pass())
        assert before - _rss_kb() > 10_000, (before, _rss_kb())
    finally:
        libc.free(blocks[-1])


@pytest.mark.parametrize(("raw", "want"), [(None, 10.0), ("0", 0.0), ("30s", 30.0)])
def test_memory_trim_interval_setting(raw: str | None, want: float) -> None:
    env = {} if raw is None else {"MEMORY_TRIM_INTERVAL": raw}
    assert from_env(env).memory_trim_interval_s == want


def test_memory_trim_interval_rejects_nonsense() -> None:
    with pytest.raises(SettingsError, match="MEMORY_TRIM_INTERVAL"):
        from_env({"MEMORY_TRIM_INTERVAL": "soon"})


_PROBE = """
import ctypes, sys
from ambient.malloc import tune_for_proxy
if sys.argv[1] == "tuned":
    assert tune_for_proxy()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
p = libc.malloc(256 * 1024)
heap = [line.split()[0] for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")]
lo, hi = (int(x, 16) for x in heap[0].split("-"))
print("heap" if lo <= p < hi else "mmap")
"""


@pytest.mark.parametrize(("mode", "where"), [("default", "mmap"), ("tuned", "heap")])
def test_tls_read_sized_blocks_come_from_the_heap_once_tuned(mode: str, where: str) -> None:
    # A fresh interpreter each: glibc's dynamic threshold depends on the process's history.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == where, out.stderr
