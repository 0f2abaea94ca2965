"""Turn raw fuzzer bytes into structured inputs, deterministically and without raising.

Role: one harness serves both Hypothesis (which hands it ``st.binary()`` or bytes it built
from a structured strategy) and atheris/libFuzzer (which mutates bytes coverage-guided).  A
``ByteSource`` reads choices from the bytes; once they run out every read returns its
smallest value, so any byte string maps to exactly one input and shrinking stays meaningful.

Invariants: no method raises; every loop is bounded by the remaining bytes or a fixed count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class ByteSource:
    """A cursor over fuzzer bytes that answers small questions."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def u8(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        return self.u8() << 8 | self.u8()

    def int(self, lo: int, hi: int) -> int:
        """An integer in ``lo..hi`` (inclusive)."""
        span = hi - lo + 1
        raw = self.u16() if span > 256 else self.u8()
        if span > 65536:
            raw = raw << 16 | self.u16()
        return lo + raw % span

    def flag(self) -> bool:
        return bool(self.u8() & 1)

    def choice(self, items: Sequence[T]) -> T:
        return items[self.u8() % len(items)]

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + max(0, n)]
        self.pos += len(out)
        return out

    def blob(self, max_len: int = 64) -> bytes:
        return self.take(self.int(0, max_len))

    def text(self, max_len: int = 32) -> str:
        return self.blob(max_len).decode("utf-8", "replace")

    def rest(self) -> bytes:
        return self.take(self.left)


#: Words that make odd-but-plausible Kubernetes/CNI/mesh values.
WORDS = (
    "", "a", "default", "ns", "web", "10.0.0.1", "10.0.0.1/24", "fd00::1", "::", "0.0.0.0",
    "80", "-1", "65536", "http", "TCP", "UDP", "true", "null", "*", "/", "a/b", "spiffe://x",
    "cluster.local", "istio-waypoint", "ambient", "\u0000", "\udcff", "é", "x" * 300,
)


def json_like(src: ByteSource, keys: Sequence[str], depth: int = 4) -> Any:
    """A JSON/YAML-shaped value whose map keys come mostly from ``keys``."""
    kind = src.u8() % (9 if depth > 0 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return src.flag()
    if kind == 2:
        return src.choice((0, 1, -1, 80, 65535, 65536, 2**31, 2**63, 10**30, 0.5, float("nan")))
    if kind == 3:
        return src.choice(WORDS)
    if kind == 4:
        return src.text()
    if kind == 5:
        return src.int(0, 70000)
    if kind == 6:
        return [json_like(src, keys, depth - 1) for _ in range(src.int(0, 4))]
    out: dict[Any, Any] = {}
    for _ in range(src.int(0, 6)):
        key: Any = src.choice(keys) if src.u8() % 8 else json_like(src, keys, 0)
        try:
            out[key] = json_like(src, keys, depth - 1)
        except TypeError:  # an unhashable key: YAML can produce those, dicts cannot
            pass
    return out


def mutate(src: ByteSource, data: bytes, max_edits: int = 4) -> bytes:
    """``data`` with a few byte edits (replace, insert, delete, truncate) chosen by ``src``."""
    buf = bytearray(data)
    for _ in range(src.int(0, max_edits)):
        op = src.u8() % 4
        at = src.int(0, max(0, len(buf) - 1)) if buf else 0
        if op == 0 and buf:
            buf[at] = src.u8()
        elif op == 1:
            buf[at:at] = src.blob(8)
        elif op == 2 and buf:
            del buf[at : at + src.int(1, 8)]
        elif op == 3:
            del buf[at:]
    return bytes(buf)
