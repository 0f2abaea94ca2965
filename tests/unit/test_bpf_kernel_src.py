"""The bcc kernel-source stand-in: its layout (pure plan) and an idempotent build in a tmp dir."""

from __future__ import annotations

import os

import pytest

from bpf import kernel_src


def _by_path(entries):
    return {e.path: e for e in entries}


def test_plan_layout_x86():
    plan = _by_path(kernel_src.plan(["types.h", "bpf.h", "if_ether.h"], machine="x86_64"))
    assert plan["include/uapi/linux/types.h"].target == "/usr/include/linux/types.h"
    assert plan["include/uapi/linux/if_ether.h"].kind == "link"
    # bcc brings its own bpf.h: ours must be an empty stub, never the libc-dev header
    assert plan["include/uapi/linux/bpf.h"].kind == "file"
    assert "#define" not in plan["include/uapi/linux/bpf.h"].content
    assert plan["include/uapi/asm-generic"].target == "/usr/include/asm-generic"
    assert plan["arch/x86/include/uapi/asm"].target == "/usr/include/x86_64-linux-gnu/asm"
    assert plan["include/generated/uapi"].kind == "dir"
    assert plan["arch/x86/include/generated/uapi"].kind == "dir"
    assert "CONFIG_BPF_SYSCALL" in plan["include/linux/kconfig.h"].content
    assert "typedef __u32 u32;" in plan["include/linux/kconfig.h"].content
    assert plan["include/linux/log2.h"].content == ""
    assert "PAGE_SIZE" in plan["arch/x86/include/asm/page.h"].content


def test_plan_stamp_is_last_and_arm64_uses_its_triplet():
    entries = kernel_src.plan(["types.h"], machine="aarch64", include="/inc")
    assert entries[-1].path == kernel_src.STAMP_NAME
    plan = _by_path(entries)
    assert plan["arch/arm64/include/uapi/asm"].target == "/inc/aarch64-linux-gnu/asm"


def test_plan_unknown_machine_says_what_to_do():
    with pytest.raises(RuntimeError, match="linux-headers"):
        kernel_src.plan(["types.h"], machine="s390x")


def _fake_include(tmp_path):
    inc = tmp_path / "include"
    for d in ("linux", "asm-generic", "x86_64-linux-gnu/asm", "aarch64-linux-gnu/asm"):
        (inc / d).mkdir(parents=True)
    for h in ("types.h", "bpf.h", "in.h"):
        (inc / "linux" / h).write_text(f"/* {h} */\n")
    return str(inc)


def test_ensure_builds_once_and_is_idempotent(tmp_path):
    inc = _fake_include(tmp_path)
    root = str(tmp_path / "ks")
    assert kernel_src.ensure(root, include=inc) == root
    assert kernel_src.is_complete(root)
    assert os.readlink(os.path.join(root, "include/uapi/linux/in.h")) == f"{inc}/linux/in.h"
    assert not os.path.islink(os.path.join(root, "include/uapi/linux/bpf.h"))
    marker = os.path.join(root, "marker")
    open(marker, "w").close()
    kernel_src.ensure(root, include=inc)  # complete: reused untouched
    assert os.path.exists(marker)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".bcc-kernel-src-")] == []


def test_ensure_replaces_a_half_built_tree(tmp_path):
    inc = _fake_include(tmp_path)
    root = tmp_path / "ks"
    (root / "include").mkdir(parents=True)  # a crash before the stamp was written
    kernel_src.ensure(str(root), include=inc)
    assert kernel_src.is_complete(str(root))


def test_ensure_without_uapi_headers_says_what_to_install(tmp_path):
    with pytest.raises(RuntimeError, match="linux-libc-dev"):
        kernel_src.ensure(str(tmp_path / "ks"), include=str(tmp_path / "none"))
