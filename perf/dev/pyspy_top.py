"""Summarise py-spy ``--format raw`` (collapsed stack) files: where the samples go.

Prints the top functions by self samples (the leaf frame) and by inclusive samples (anywhere
on the stack), as a share of all samples.  Usage:
``python -m perf.dev.pyspy_top FILE [FILE ...] [--top 25]``
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^)]*?)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    """``func (path/to/mod.py:123)`` -> ``func (mod.py)``; other frames unchanged."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    return f"{m['func']} ({Path(m['file']).name})"


def summarise(lines: list[str]) -> tuple[int, Counter[str], Counter[str]]:
    total = 0
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [frame_name(f) for f in stack.split(";")]
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    return total, own, incl


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    for path in args.files:
        total, own, incl = summarise(path.read_text().splitlines())
        print(f"== {path} ({total} samples)")
        print("  self:")
        for name, n in own.most_common(args.top):
            print(f"    {100 * n / max(total, 1):5.1f}%  {name}")
        print("  inclusive:")
        for name, n in incl.most_common(args.top):
            print(f"    {100 * n / max(total, 1):5.1f}%  {name}")


if __name__ == "__main__":
    main()
