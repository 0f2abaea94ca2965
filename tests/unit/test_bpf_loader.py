"""Pure parts of the eBPF loader: mount lookup, pin-dir checks, source rendering, constants."""

from __future__ import annotations

import pytest

from bpf import loader, tc

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:26 / /sys rw,nosuid shared:7 - sysfs sysfs rw
41 30 0:35 / /sys/fs/cgroup rw shared:9 - tmpfs tmpfs rw,mode=755
48 41 0:42 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw
49 30 0:43 / /sys/fs/bpf rw shared:11 - bpf bpf rw
50 22 0:44 / /sys/fs/bpfx rw shared:12 - tmpfs tmpfs rw
"""


@pytest.mark.parametrize(("path", "fstype"), [
    ("/sys/fs/bpf", "bpf"),
    ("/sys/fs/bpf/ambient", "bpf"),
    ("/sys/fs/bpfx/ambient", "tmpfs"),  # a prefix of the name is not a parent directory
    ("/sys/fs/cgroup/unified/ambtest/pod", "cgroup2"),
    ("/sys/fs/cgroup/cpu", "tmpfs"),
    ("/home", "ext4"),
])
def test_fs_type_at(path, fstype):
    assert loader.fs_type_at(path, MOUNTINFO) == fstype


def test_fs_type_at_later_mount_on_same_point_wins():
    info = MOUNTINFO + "60 30 0:50 / /sys/fs/bpf rw shared:20 - tmpfs none rw\n"
    assert loader.fs_type_at("/sys/fs/bpf/x", info) == "tmpfs"


@pytest.mark.parametrize("bad", ["relative/dir", "/sys/fs/bpf/a b", '/sys/fs/bpf/"x',
                                 "/sys/fs/bpf/../etc", "/sys/fs/bpf/a\nb", ""])
def test_check_pin_dir_rejects(bad):
    with pytest.raises(ValueError, match="plain absolute path"):
        loader.check_pin_dir(bad)


def test_render_source_substitutes_pin_dir():
    src = loader.render_source("/sys/fs/bpf/ambtest-1/")
    assert "AMB_PIN_DIR" not in src
    for name in loader.MAPS:
        assert f'"/sys/fs/bpf/ambtest-1/{name}"' in src


def test_program_names_fit_the_kernel_name_limit():
    # The kernel keeps 15 characters; stale programs are recognised by these exact names.
    for name in loader.OUR_NAMES:
        assert len(name) <= 15
        assert name.startswith(tc.NAME_PREFIX)
        assert f"int {name}(" in loader.render_source("/sys/fs/bpf/x")


def test_attach_and_program_type_constants_match_bcc():
    import bcc  # the project venv sees Debian's python3-bpfcc
    assert loader.CGROUP_INET4_CONNECT == bcc.BPFAttachType.CGROUP_INET4_CONNECT
    assert loader.CGROUP_INET4_GETPEERNAME == bcc.BPFAttachType.CGROUP_INET4_GETPEERNAME
    assert loader.CGROUP_SOCK_OPS == bcc.BPFAttachType.CGROUP_SOCK_OPS
    assert loader.PROG_SCHED_CLS == bcc.BPF.SCHED_CLS
    assert loader.PROG_SOCK_OPS == bcc.BPF.SOCK_OPS
    assert loader.PROG_CGROUP_SOCK_ADDR == bcc.BPF.CGROUP_SOCK_ADDR
