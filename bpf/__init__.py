"""bpf: the eBPF capture programs (``capture.c``) and their bcc loader.

- ``kernel_src``: the uapi-only kernel-source stand-in bcc compiles against (no headers here).
- ``loader``: compile once per process, load programs, pinned maps, bpffs, netns cookies.
- ``cgroup``: attach/detach/query cgroup programs through the raw syscall (crash takeover).
- ``tc``: clsact filters inside a pod netns (pyroute2).

The capture backend that drives them is ``cni.capture.ebpf``; ztunnel reads the pinned
original-destination map through ``ambient.bpfmap`` without bcc.
"""
