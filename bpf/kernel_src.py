"""A stand-in kernel source tree that lets bcc compile networking programs without headers.

Role: bcc wants kernel headers (``/lib/modules/$(uname -r)/build``) even for programs that use
only uapi types.  Our machines have BTF but no headers and no module loading, so we build a tiny
tree from the uapi headers that ``linux-libc-dev`` installs and point ``BCC_KERNEL_SOURCE`` at
it.  Layout (relative to the tree root):

- ``include/uapi/linux/*``: symlinks to ``/usr/include/linux/*``, except ``bpf.h``, which is an
  empty stub (bcc injects its own ``bpf.h`` with a different include guard; the libc-dev copy
  would redefine every type);
- ``include/uapi/asm-generic`` -> ``/usr/include/asm-generic``;
  ``arch/<arch>/include/uapi/asm`` -> ``/usr/include/<triplet>/asm``;
- empty ``include/generated/uapi`` and ``arch/<arch>/include/generated/uapi``;
- ``include/linux/kconfig.h``: defines ``CONFIG_BPF_SYSCALL`` and the kernel's short integer
  typedefs; ``include/linux/log2.h``: empty; ``arch/<arch>/include/asm/page.h``: page size.

Invariants:
- ``plan`` is pure: it returns what to create (table-tested); ``ensure`` realises it.
- ``ensure`` is idempotent and safe against concurrent callers: it builds in a private temp dir
  and renames it into place; a tree with the current stamp is reused untouched.
- Programs compiled against this tree must include only ``<uapi/linux/...>`` headers and touch
  no kernel-internal struct: right for networking programs, wrong for tracing programs.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
from dataclasses import dataclass

DEFAULT_DIR = "/run/ambient/bcc-kernel-src"
STAMP_NAME = ".ambient-stamp"
STAMP = "ambient bcc kernel-src stand-in v1\n"

KCONFIG_H = """\
/* ambient: stand-in for the kernel's kconfig.h (uapi-only networking programs). */
#ifndef __AMBIENT_KCONFIG_H
#define __AMBIENT_KCONFIG_H
#define CONFIG_BPF_SYSCALL 1
#include <linux/types.h>
typedef __u8 u8;
typedef __s8 s8;
typedef __u16 u16;
typedef __s16 s16;
typedef __u32 u32;
typedef __s32 s32;
typedef __u64 u64;
typedef __s64 s64;
typedef unsigned long size_t;
typedef unsigned long uintptr_t;
typedef _Bool bool;
#define true 1
#define false 0
#ifndef NULL
#define NULL ((void *)0)
#endif
#endif
"""

PAGE_H = """\
/* ambient: stand-in for asm/page.h. */
#ifndef __AMBIENT_PAGE_H
#define __AMBIENT_PAGE_H
#define PAGE_SHIFT 12
#define PAGE_SIZE (1UL << PAGE_SHIFT)
#endif
"""

_ARCH = {"x86_64": ("x86", "x86_64-linux-gnu"), "aarch64": ("arm64", "aarch64-linux-gnu")}


@dataclass(frozen=True)
class Entry:
    """One thing to create: a directory, a file with ``content``, or a symlink to ``target``."""

    path: str  # relative to the tree root
    kind: str  # "dir" | "file" | "link"
    content: str = ""
    target: str = ""


def arch_names(machine: str | None = None) -> tuple[str, str]:
    """(kernel arch dir, multiarch triplet) for ``platform.machine()``-style names."""
    m = machine or platform.machine()
    try:
        return _ARCH[m]
    except KeyError:
        raise RuntimeError(f"no bcc kernel-src stand-in recipe for machine {m!r}; install "
                           "linux-headers for the running kernel instead") from None


def plan(linux_headers: list[str], *, include: str = "/usr/include",
         machine: str | None = None) -> list[Entry]:
    """What the tree holds, given the names of the files in ``<include>/linux``.  Pure."""
    arch, triplet = arch_names(machine)
    entries = [
        Entry("include/uapi/linux", "dir"),
        Entry("include/generated/uapi", "dir"),
        Entry(f"arch/{arch}/include/generated/uapi", "dir"),
        Entry(f"arch/{arch}/include/uapi", "dir"),
        Entry(f"arch/{arch}/include/asm", "dir"),
        Entry("include/linux", "dir"),
        Entry("include/uapi/asm-generic", "link", target=f"{include}/asm-generic"),
        Entry(f"arch/{arch}/include/uapi/asm", "link", target=f"{include}/{triplet}/asm"),
        Entry("include/linux/kconfig.h", "file", content=KCONFIG_H),
        Entry("include/linux/log2.h", "file", content=""),
        Entry(f"arch/{arch}/include/asm/page.h", "file", content=PAGE_H),
        Entry("include/uapi/linux/bpf.h", "file", content="/* ambient: bcc brings its own */\n"),
    ]
    for name in sorted(linux_headers):
        if name == "bpf.h":
            continue
        entries.append(Entry(f"include/uapi/linux/{name}", "link",
                             target=f"{include}/linux/{name}"))
    entries.append(Entry(STAMP_NAME, "file", content=STAMP))  # last: marks a complete tree
    return entries


def realise(root: str, entries: list[Entry]) -> None:
    """Create ``entries`` under ``root`` (which must exist)."""
    for e in entries:
        p = os.path.join(root, e.path)
        if e.kind == "dir":
            os.makedirs(p, exist_ok=True)
            continue
        os.makedirs(os.path.dirname(p), exist_ok=True)
        if e.kind == "link":
            os.symlink(e.target, p)
        else:
            with open(p, "w") as f:
                f.write(e.content)


def is_complete(root: str) -> bool:
    try:
        with open(os.path.join(root, STAMP_NAME)) as f:
            return f.read() == STAMP
    except OSError:
        return False


def ensure(root: str = DEFAULT_DIR, *, include: str = "/usr/include") -> str:
    """Build the stand-in tree at ``root`` unless a complete one is there; return ``root``."""
    if is_complete(root):
        return root
    linux_dir = os.path.join(include, "linux")
    if not os.path.isfile(os.path.join(linux_dir, "types.h")):
        raise RuntimeError(f"{linux_dir}/types.h is missing: install the uapi headers "
                           "(apt-get install linux-libc-dev) so bcc can compile")
    entries = plan(os.listdir(linux_dir), include=include)
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".bcc-kernel-src-", dir=parent)
    try:
        realise(tmp, entries)
        if os.path.lexists(root) and not is_complete(root):
            shutil.rmtree(root, ignore_errors=True)  # a half-built tree from a crash
        try:
            os.rename(tmp, root)
        except OSError:
            if not is_complete(root):  # lost a race to a complete tree: fine; else re-raise
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return root
